"""`python -m tokenflow_jax.engine_bench`, the documented command: `tokenflow_jax.bench.engine_bench` does the work."""

from tokenflow_jax.bench.engine_bench import main

if __name__ == "__main__":
    raise SystemExit(main())
