"""TokenFlow-JAX: streaming-aware LLM serving on JAX with Pallas kernels."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "Output", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import tokenflow_jax.metrics` stays free of JAX start-up cost.
    if name in ("LLM", "Output"):
        from tokenflow_jax.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from tokenflow_jax.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'tokenflow_jax' has no attribute {name!r}")
