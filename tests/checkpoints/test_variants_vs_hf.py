"""Checkpoint variants as users have them, each through the whole engine against HF transformers on CPU.

Each variant is a small random model saved with `save_pretrained` (sharded, bf16 or fp16 weights, tied
embeddings, every rope scaling type, Qwen2 biases, a Mistral config); transformers loads the same folder in
float32 as the reference. `LLM(folder)` must give HF's greedy tokens (20, float32), ending where HF ends.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from checkpoints import CheckpointError, load_hf_config
from tests.conftest import HF_BOS_ID, LLAMA3_ROPE_SCALING, build_hf_model, save_hf_model
from tokenflow_jax import LLM
from tokenflow_jax.model import rope_frequencies
from tokenflow_jax.sampling_params import SamplingParams

N_TOKENS = 20
PROMPTS = [[HF_BOS_ID, *b"The quick brown fox"], [HF_BOS_ID, *b"Hi"], [HF_BOS_ID, *"naïve café".encode()]]
ENGINE = dict(scheduler="fcfs", page_size=4, max_num_seqs=4, max_batch_tokens=16, max_model_len=64, warmup=False)

# Variant -> (family, config overrides, weight dtype for save_pretrained, max_shard_size).
VARIANTS: dict[str, tuple[str, dict[str, Any], str, str | None]] = {
    "sharded": ("llama", {}, "float32", "60KB"),
    "bf16_weights": ("llama", {}, "bfloat16", None),
    "fp16_weights": ("llama", {}, "float16", None),
    "tied_embeddings": ("llama", {"tie_word_embeddings": True}, "float32", None),
    "rope_linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "float32", None),
    "rope_dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "float32", None),
    "rope_llama3": (
        "llama",
        {"rope_scaling": LLAMA3_ROPE_SCALING},
        "float32",
        None,
    ),  # fmt: skip
    # As Qwen2.5 configures it ({"type": "yarn", ...}), with a short original context so the ramp bites.
    "rope_yarn_qwen2": (
        "qwen2",
        {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
        "float32",
        None,
    ),
    "qwen2_biases": ("qwen2", {}, "float32", None),
    # Mistral's explicit head_dim (q/k/v width != hidden size) and a sliding window longer than the context.
    "mistral": ("mistral", {"head_dim": 32, "sliding_window": 128}, "float32", None),
}


def hf_greedy_from_folder(path: Path, prompt: list[int]) -> list[int]:
    """transformers' greedy tokens from the saved folder in float32, stopping where its generation config says."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=N_TOKENS,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def variant_folder(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            import torch

            family, overrides, dtype, shard = VARIANTS[name]
            model = build_hf_model(family, **overrides).to(getattr(torch, dtype))
            cache[name] = save_hf_model(model, tmp_path_factory.mktemp(name), shard)
        return cache[name]

    return get


def engine_greedy(path: Path, prompts: list[list[int]]) -> list[tuple[list[int], str | None]]:
    with pytest.warns(UserWarning, match="no tokenizer files"):
        llm = LLM(str(path), **ENGINE)
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=N_TOKENS))
    finally:
        llm.close()
    return [(o.token_ids, o.finish_reason) for o in outs]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_hf(variant, variant_folder):
    path = variant_folder(variant)
    for prompt, (tokens, reason) in zip(PROMPTS, engine_greedy(path, PROMPTS), strict=True):
        expected = hf_greedy_from_folder(path, prompt)
        assert tokens == expected, (variant, prompt)
        assert reason == ("length" if len(expected) == N_TOKENS else "stop")


def test_variants_are_what_they_say(variant_folder):
    """Guards for the parity test: each folder really is its variant, and each rope scaling changes RoPE."""
    sharded = variant_folder("sharded")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    for name, dtype in [("bf16_weights", "BF16"), ("fp16_weights", "F16")]:
        header = (variant_folder(name) / "model.safetensors").read_bytes()[8:2000].decode(errors="ignore")
        assert f'"dtype":"{dtype}"' in header
    assert load_hf_config(variant_folder("tied_embeddings")).tie_word_embeddings
    assert load_hf_config(variant_folder("qwen2_biases")).attention_bias
    assert load_hf_config(variant_folder("mistral")).head_dim * 4 != 64
    for name in ["rope_linear", "rope_llama3", "rope_yarn_qwen2"]:
        cfg = load_hf_config(variant_folder(name))
        scaled, scale = rope_frequencies(cfg)
        plain, _ = rope_frequencies(dataclasses.replace(cfg, rope_scaling=None))
        assert not np.allclose(scaled, plain, rtol=1e-3) or scale != 1.0, name
    assert rope_frequencies(load_hf_config(variant_folder("rope_yarn_qwen2")))[1] > 1.0


def test_contexts_beyond_what_hf_computes_are_refused(variant_folder):
    """Dynamic NTK rescales past max_position_embeddings and a sliding window masks past its width: neither is
    implemented, so the engine refuses such contexts instead of computing them differently."""
    with pytest.raises(ValueError, match="max_position_embeddings 256"):
        LLM(str(variant_folder("rope_dynamic")), **{**ENGINE, "max_model_len": 512})
    with pytest.raises(ValueError, match="sliding_window 128"):
        LLM(str(variant_folder("mistral")), **{**ENGINE, "max_model_len": 200})


def _edit_config(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "longrope"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu'"),
        (lambda c: c.update(mlp_bias=True), "mlp_bias"),
        (lambda c: c.update(attention_bias=True), "attention_bias"),
        (lambda c: c.update(quantization_config={"quant_method": "awq"}), "quantization_config \\(awq\\)"),
        (lambda c: c.update(architectures=["GemmaForCausalLM"]), "GemmaForCausalLM"),
    ],
)
def test_unsupported_options_are_named(variant_folder, tmp_path, edit, named):
    path = _edit_config(variant_folder("sharded"), tmp_path / "edited", edit)
    with pytest.raises(CheckpointError, match=named):
        load_hf_config(path)
    with pytest.raises(ValueError, match=named):
        LLM(str(path), **ENGINE)


@pytest.mark.parametrize("as_list", [False, True])
def test_eos_is_where_the_checkpoint_says(variant_folder, tmp_path, as_list):
    """generation_config.json names an EOS that greedy decoding reaches mid-way (config.json names another):
    the engine stops there, as transformers does."""
    src = variant_folder("qwen2_biases")
    free_run = hf_greedy_from_folder(src, PROMPTS[0])
    eos = next(t for i, t in enumerate(free_run) if i >= 3 and t not in free_run[:i])
    path = tmp_path / "eos"
    path.mkdir()
    for f in src.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = [HF_BOS_ID + 40, eos] if as_list else eos
    (path / "generation_config.json").write_text(json.dumps(generation))
    expected = hf_greedy_from_folder(path, PROMPTS[0])
    assert expected == free_run[: free_run.index(eos) + 1]  # precondition: HF stops at the new EOS
    ((tokens, reason),) = engine_greedy(path, PROMPTS[:1])
    assert tokens == expected and reason == "stop"
