"""`python -m tokenflow_jax.bench`: the schedulers side by side (see `tokenflow_jax.bench.schedulers`); with
`--data-parallel-size M`, over M engine replicas (`tokenflow_jax.bench.data_parallel`)."""

import sys

from tokenflow_jax.bench.schedulers import build_parser, main

if __name__ == "__main__":
    if build_parser().parse_known_args()[0].data_parallel_size != 1:
        from tokenflow_jax.bench.data_parallel import main
    main(sys.argv[1:])
