"""The engine: the front (`llm.LLM`, `async_engine.AsyncEngine`), the loop (`core.EngineCore`), the executors
that carry out plans (`paged_executor` on the page bookkeeping, `executor` on the JAX runner) and the runner."""
