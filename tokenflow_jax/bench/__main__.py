"""`python -m tokenflow_jax.bench`: the schedulers side by side (see `tokenflow_jax.bench.schedulers`)."""

from tokenflow_jax.bench.schedulers import main

if __name__ == "__main__":
    main()
