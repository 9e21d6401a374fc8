from llm_shard.coordinator.cli import main

main()
