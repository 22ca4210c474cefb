"""Cross-platform lowering for CUDA on a machine without a GPU: the check that a Pallas kernel (and any jitted
function that calls one) still lowers to Triton, where Triton's power-of-two rule on tile sizes is enforced."""

from __future__ import annotations

from typing import Any

import jax
import pytest

TRITON_CALL = "__gpu$xla.gpu.triton"


def abstract(tree: Any) -> Any:
    """Shapes and dtypes only, so lowering a real-size model allocates nothing."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def lower_for_cuda(jitted: Any, *args: Any, **static: Any) -> str:
    """The StableHLO text of `jitted(*args, **static)` lowered for CUDA (never compiled)."""
    try:
        lowered = jitted.trace(*abstract(args), **static).lower(lowering_platforms=("cuda",))
    except RuntimeError as e:
        if "No supported GPU devices found" not in str(e):
            raise
        # Some jax versions read the compute capability from a real GPU before lowering Pallas to Triton.
        pytest.skip(f"this jax ({jax.__version__}) cannot lower Pallas to Triton without a GPU")
    return lowered.as_text()
