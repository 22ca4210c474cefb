"""The cost-model simulator: an executor on a virtual clock (`executor`), its GPU and model cost profiles
(`profiles`) and the replay of a workload through an engine core (`replay`). Plain host Python: no JAX."""

from tokenflow_jax.sim.executor import SimExecutor

__all__ = ["SimExecutor"]
