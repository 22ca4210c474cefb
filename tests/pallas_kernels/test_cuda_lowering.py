"""Both Pallas kernels lower for CUDA at every served model's attention shape and at odd query groups.

Triton tiles must be powers of two; Qwen2.5-7B's 28 q / 4 kv heads (group 7) and Qwen2.5-32B's 40 / 8 (group
5) used to fail here. Decode is lowered with and without a context split, prefill at a power-of-two and an
odd token count.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest

from checkpoints.presets import model_config
from pallas_kernels import paged_decode_attention, paged_prefill_attention
from pallas_kernels.decode import padded_group
from tests.pallas_kernels.cuda_lowering import TRITON_CALL, lower_for_cuda

PAGE_SIZE = 16
NUM_PAGES = 1001  # a pool size that is no power of two
spec = jax.ShapeDtypeStruct


class AttentionShape(NamedTuple):
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: type


def preset_shape(model: str) -> AttentionShape:
    cfg = model_config(model)
    return AttentionShape(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, jnp.float32 if model == "tiny" else jnp.bfloat16
    )


SHAPES = {model: preset_shape(model) for model in ("tiny", "llama3-8b", "qwen2.5-7b", "qwen2.5-32b")}
SHAPES |= {f"group{g}": AttentionShape(2 * g, 2, 128, jnp.bfloat16) for g in (3, 5, 6, 7)}


def pool(shape: AttentionShape) -> jax.ShapeDtypeStruct:
    return spec((shape.num_kv_heads, NUM_PAGES, PAGE_SIZE, shape.head_dim), shape.dtype)


def test_odd_groups_pad_to_a_power_of_two() -> None:
    assert [padded_group(g) for g in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize(("batch", "max_pages", "num_splits"), [(1, 512, 8), (64, 64, 1)], ids=["split", "whole"])
def test_decode_lowers_for_cuda(name: str, batch: int, max_pages: int, num_splits: int) -> None:
    shape = SHAPES[name]
    q = spec((batch, shape.num_q_heads, shape.head_dim), shape.dtype)
    args = (q, pool(shape), pool(shape), spec((batch,), jnp.int32), spec((batch, max_pages), jnp.int32))
    assert TRITON_CALL in lower_for_cuda(paged_decode_attention, *args, num_splits=num_splits)


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("num_tokens", [1024, 37])
def test_prefill_lowers_for_cuda(name: str, num_tokens: int) -> None:
    shape = SHAPES[name]
    q = spec((num_tokens, shape.num_q_heads, shape.head_dim), shape.dtype)
    i32 = jnp.int32
    args = (q, pool(shape), pool(shape), spec((5,), i32), spec((4,), i32), spec((4, 128), i32))
    assert TRITON_CALL in lower_for_cuda(paged_prefill_attention, *args)
