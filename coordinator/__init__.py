"""The coordinator: the planner, the worker pipeline on Ray, the scheduler (continuous
batching, recovery), the `LLM` engine, the HTTP server and clients, and the CLI."""
