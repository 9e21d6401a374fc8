"""llm_shard.worker"""
