"""HF safetensors loading (names, layout, dtype, errors) and `load_model` for presets and folders.

Numerical agreement with transformers is tested in tests/tokenflow_jax/test_model_vs_hf.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints import CheckpointError, load_hf_model, load_model, random_params
from tokenflow_jax.config import PRESETS
from tokenflow_jax.model import init_params
from tokenflow_jax.tokenizer import ByteTokenizer, HFTokenizer


def copy_with_tensors(src: Path, dst: Path, edit) -> Path:
    """Copy a single-file HF checkpoint to `dst`, rewriting its tensors dict with `edit`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_layout_and_transposes(hf_checkpoint):
    ckpt = hf_checkpoint("qwen2_sharded")
    cfg, params = load_hf_model(ckpt.path)
    sd = {k: v.numpy() for k, v in ckpt.model.state_dict().items()}
    layer = params["layers"][1]
    np.testing.assert_array_equal(layer["wq"], sd["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(layer["w_down"], sd["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(layer["bk"], sd["model.layers.1.self_attn.k_proj.bias"])
    np.testing.assert_array_equal(params["lm_head"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"])
    assert len(params["layers"]) == cfg.num_layers == 2


def test_tied_embeddings_have_no_lm_head(hf_checkpoint):
    cfg, params = load_hf_model(hf_checkpoint("llama_tied").path)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert "bq" not in params["layers"][0]


@pytest.mark.parametrize("dtype", ["bfloat16", jnp.bfloat16, "float32"])
def test_dtype_cast(hf_checkpoint, dtype):
    _, params = load_hf_model(hf_checkpoint("llama").path, dtype)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(dtype)}


def test_bfloat16_safetensors(hf_checkpoint, tmp_path):
    src = hf_checkpoint("llama").path
    path = copy_with_tensors(
        src, tmp_path / "bf16", lambda t: t.update({k: v.astype(jnp.bfloat16) for k, v in t.items()})
    )
    _, params = load_hf_model(path, "float32")
    _, reference = load_hf_model(src, "bfloat16")
    np.testing.assert_array_equal(params["embed"], reference["embed"].astype(jnp.float32))


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = copy_with_tensors(hf_checkpoint("llama").path, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_hf_model(path)


def test_missing_lm_head_when_untied(hf_checkpoint, tmp_path):
    path = copy_with_tensors(hf_checkpoint("llama").path, tmp_path / "m", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_hf_model(path)


def test_shape_mismatch_names_tensor_and_shapes(hf_checkpoint, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    path = copy_with_tensors(
        hf_checkpoint("llama").path, tmp_path / "m", lambda t: t.update({name: np.zeros((16, 64), np.float32)})
    )
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*expected \(32, 64\), got \(16, 64\)"):
        load_hf_model(path)


def test_unexpected_tensor_is_rejected(hf_checkpoint, tmp_path):
    """An o_proj bias would be silently dropped by the model: refuse instead."""
    name = "model.layers.0.self_attn.o_proj.bias"
    path = copy_with_tensors(
        hf_checkpoint("llama").path, tmp_path / "m", lambda t: t.update({name: np.zeros(64, np.float32)})
    )
    with pytest.raises(CheckpointError, match="o_proj.bias"):
        load_hf_model(path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64})
    )
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        load_hf_model(tmp_path)


def test_missing_folder_config_and_weights(tmp_path, hf_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        load_hf_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_model(tmp_path)
    shutil.copy(hf_checkpoint("llama").path / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_model(tmp_path)


def test_missing_shard(hf_checkpoint, tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(hf_checkpoint("qwen2_sharded").path, path)
    next(path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002"):
        load_hf_model(path)


def test_bad_dtype(hf_checkpoint):
    with pytest.raises(ValueError, match="float16"):
        load_hf_model(hf_checkpoint("llama").path, "float16")


# load_model: presets and folders.


def test_tiny_random_preset_is_init_params_of_the_seed():
    a, b = load_model("tiny-random", seed=0), load_model("tiny-random", seed=1)
    assert a.cfg == PRESETS["tiny-random"] and isinstance(a.tokenizer, ByteTokenizer)
    expected = init_params(PRESETS["tiny-random"], jax.random.PRNGKey(0))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.params["layers"][0]["wq"], b.params["layers"][0]["wq"])


@pytest.mark.parametrize("preset", ["llama3-8b", "qwen2.5-7b", "qwen2.5-32b"])
def test_real_presets_have_real_shapes(preset):
    """Traced only (eval_shape): materializing billions of weights is a job for the accelerator."""
    cfg = PRESETS[preset]
    shapes = jax.eval_shape(lambda: random_params(cfg, "bfloat16"))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    expected_billions = {"llama3-8b": 8.03, "qwen2.5-7b": 7.62, "qwen2.5-32b": 32.76}[preset]
    assert abs(n_params / 1e9 - expected_billions) < 0.01
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    assert shapes["layers"][0]["wk"].shape == (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim)


def test_hf_folder_uses_its_tokenizer(hf_checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path / "with_tok"
    shutil.copytree(hf_checkpoint("llama_tied").path, path)
    with pytest.warns(UserWarning, match="no tokenizer files.*byte fallback"):
        loaded = load_model(str(path), dtype="bfloat16")
    assert isinstance(loaded.tokenizer, ByteTokenizer)  # no tokenizer.json yet
    assert loaded.params["embed"].dtype == jnp.bfloat16
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    loaded = load_model(path)
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert loaded.tokenizer.encode("hello world") == [1, 2]


def test_unknown_model_lists_presets(tmp_path):
    with pytest.raises(ValueError, match="tiny.*llama3-8b"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="unknown model"):
        load_model(str(tmp_path))  # an empty folder is neither HF nor orbax
