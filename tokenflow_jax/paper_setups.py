"""`python -m tokenflow_jax.paper_setups`, the documented command: `tokenflow_jax.bench.paper_cli` does the work."""

from tokenflow_jax.bench.paper_cli import main

if __name__ == "__main__":
    main()
