"""The engine's whole jitted step lowers for CUDA: every decode and prefill bucket warm-up compiles, with the
Pallas kernels, plus the page gather and scatter of every transfer size.

Run with the `LLM` defaults (bucket sizes, page size, model length) on `tiny` and on Qwen2.5-7B (group 7, the
first real model whose heads Triton could not tile) with a small pool and abstract weights, so nothing of a
real-size model is allocated.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import pytest

from checkpoints.presets import model_config
from tests.pallas_kernels.cuda_lowering import TRITON_CALL, lower_for_cuda
from tokenflow_jax.engine.llm import LLM
from tokenflow_jax.engine.runner import ModelRunner
from tokenflow_jax.kv.host_pool import PinnedHostPages
from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.model import init_params
from tokenflow_jax.parallel import make_mesh, sharded_config

LLM_DEFAULTS = {name: p.default for name, p in inspect.signature(LLM).parameters.items()}


@pytest.mark.parametrize(("model", "dtype"), [("tiny", jnp.float32), ("qwen2.5-7b", jnp.bfloat16)])
def test_every_compiled_step_lowers_for_cuda(model: str, dtype: type) -> None:
    cfg = model_config(model)
    params = jax.eval_shape(functools.partial(init_params, cfg, dtype=dtype), jax.random.PRNGKey(0))
    max_model_len = min(cfg.max_context, 2048)  # as `LLM` picks it
    runner = ModelRunner(
        cfg,
        params,
        num_pages=2 * pages_for(max_model_len, LLM_DEFAULTS["page_size"]),
        page_size=LLM_DEFAULTS["page_size"],
        max_num_seqs=LLM_DEFAULTS["max_num_seqs"],
        max_batch_tokens=LLM_DEFAULTS["max_batch_tokens"],
        max_model_len=max_model_len,
        kv_dtype=dtype,
        attention_impl="pallas",
    )
    plan = runner.compile_plan()
    assert {key[:2] for key, _, _ in plan} >= {("step", True), ("step", False), ("gather", 512), ("scatter", 512)}
    for key, jitted, args in plan:
        text = lower_for_cuda(jitted, *args)
        assert (TRITON_CALL in text) == (key[0] == "step"), key


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (XLA_FLAGS in tests/conftest.py)")
def test_tensor_parallel_steps_lower_for_cuda_with_their_collectives() -> None:
    """Qwen2.5-7B split over 4 devices (7 query heads and 1 kv head each): every step calls the Triton kernels on
    its slice, all-reduces after the row-split projections and all-gathers the vocabulary's logits."""
    cfg = sharded_config(model_config("qwen2.5-7b"), 4)
    params = jax.eval_shape(functools.partial(init_params, cfg, dtype=jnp.bfloat16), jax.random.PRNGKey(0))
    sizes = dict(num_pages=64, page_size=16, max_num_seqs=8, max_batch_tokens=64, max_model_len=256)
    runner = ModelRunner(cfg, params, **sizes, kv_dtype=jnp.bfloat16, attention_impl="pallas", mesh=make_mesh(4))
    for key, jitted, args in runner.compile_plan():
        text = lower_for_cuda(jitted, *args)
        if key[0] == "step":
            assert TRITON_CALL in text and "all_reduce" in text and "all_gather" in text, key


def test_the_pinned_host_pools_copies_lower_for_cuda_as_host_computations() -> None:
    """The pinned host pool's scatter and gather of every transfer size, at Llama-3-8B page shapes in bfloat16,
    lower for CUDA with every operand in pinned host memory and the work marked for the host (whether a GPU's
    XLA compiles them is what the tier's start-up round trip checks there)."""
    cfg = model_config("llama3-8b")
    pool = PinnedHostPages((2, cfg.num_layers, 2, cfg.num_kv_heads, 16, cfg.head_dim), jnp.bfloat16, make_mesh(1))
    plan = pool.compile_plan([1 << i for i in range(10)])
    assert {key for key, _, _ in plan} >= {("scatter", 512), ("gather", 512)}
    for key, jitted, args in plan:
        text = jitted.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert 'mhlo.memory_kind = "device"' not in text and 'memory_kind = "pinned_host"' in text, key
        op = "stablehlo.scatter" if key[0] == "scatter" else "stablehlo.gather"
        assert op in text and '_xla_compute_type = "host"' in text, key
