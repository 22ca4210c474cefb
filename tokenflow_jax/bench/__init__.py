"""Benchmarks: the schedulers side by side (`python -m tokenflow_jax.bench`), their plots, the engine's
micro-benchmarks (`engine_bench`) and the paper's setups on the simulator (`paper_setups`)."""
