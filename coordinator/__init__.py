"""llm_shard.coordinator"""
