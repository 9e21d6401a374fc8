"""llm_shard.cluster"""
