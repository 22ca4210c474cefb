"""orbax save/restore of converted params: bit-identical round trips, config preserved, usable by load_model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_hf_model, load_model, random_params, restore_params, save_params
from tokenflow_jax.config import PRESETS


def assert_bit_identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_round_trip(tmp_path, dtype):
    cfg = PRESETS["tiny-random"]
    params = random_params(cfg, dtype, seed=3)
    save_params(params, cfg, tmp_path / "ckpt")
    restored_cfg, restored = restore_params(tmp_path / "ckpt")
    assert restored_cfg == cfg
    assert_bit_identical(restored, params)


def test_hf_converted_round_trip_and_load_model(tmp_path, hf_checkpoint):
    """A Qwen2 (biases, untied head) and a Llama-3 rope-scaled config survive the JSON config file."""
    for variant in ("qwen2_sharded", "llama3_rope"):
        cfg, params = load_hf_model(hf_checkpoint(variant).path)
        save_params(params, cfg, tmp_path / variant)
        loaded = load_model(str(tmp_path / variant))
        assert loaded.cfg == cfg
        assert_bit_identical(loaded.params, params)
    assert load_model(tmp_path / "llama3_rope", dtype="bfloat16").params["embed"].dtype == jnp.bfloat16


def test_save_overwrites(tmp_path):
    cfg = PRESETS["tiny-random"]
    save_params(random_params(cfg, seed=0), cfg, tmp_path)
    second = random_params(cfg, seed=1)
    save_params(second, cfg, tmp_path)
    assert_bit_identical(restore_params(tmp_path)[1], second)


def test_restore_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="orbax"):
        restore_params(tmp_path)
