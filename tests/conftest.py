"""Shared fixtures: small random HF models (Llama / Qwen2 / Mistral) saved as safetensors folders, and HF greedy
output.

`hf_checkpoint(variant)` builds (once per session) and returns an `HFCheckpoint(path, model)`. The configs use
the byte vocabulary's BOS 256 / EOS 257 with a 300-token vocab, so byte-tokenized prompts work with them.
"""

from __future__ import annotations

import os

# Four host devices (before jax starts): tensor parallelism and data-parallel replicas are tested on CPU meshes.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

HF_VOCAB_SIZE = 300
HF_BOS_ID, HF_EOS_ID = 256, 257

# original_max_position_embeddings 16 puts every frequency in the scaled or smoothed band at our positions.
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}  # fmt: skip

# Variant -> (model family, config overrides, max_shard_size for save_pretrained or None for one file).
HF_VARIANTS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "llama": ("llama", {}, None),
    "llama_tied": ("llama", {"tie_word_embeddings": True}, None),
    "llama3_rope": (
        "llama",
        {"rope_scaling": LLAMA3_ROPE_SCALING},
        None,
    ),
    "qwen2_sharded": ("qwen2", {}, "100KB"),
}


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    path: Path
    model: Any  # a transformers *ForCausalLM in eval mode, fp32 on CPU


def build_hf_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A small random HF causal LM: hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128, vocab 300.

    Weights are redrawn at unit scale (HF's 0.02 init gives near-uniform logits, so greedy ties would flake)
    and norms/biases are non-trivial so that every parameter is exercised.
    """
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    kwargs: dict[str, Any] = dict(
        vocab_size=HF_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=HF_BOS_ID,
        eos_token_id=HF_EOS_ID,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model


def save_hf_model(model: Any, path: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], HFCheckpoint]:
    """Factory: variant name (see HF_VARIANTS) -> saved HF checkpoint, built once per session."""
    cache: dict[str, HFCheckpoint] = {}

    def get(variant: str) -> HFCheckpoint:
        if variant not in cache:
            family, overrides, shard = HF_VARIANTS[variant]
            model = build_hf_model(family, **overrides)
            path = save_hf_model(model, tmp_path_factory.mktemp(f"hf_{variant}"), shard)
            cache[variant] = HFCheckpoint(path, model)
        return cache[variant]

    return get


def hf_greedy_tokens(model: Any, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """`model.generate(do_sample=False)`'s new tokens (stops after EOS like HF does)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([list(prompt_ids)]),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            pad_token_id=HF_EOS_ID,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="session")
def hf_greedy() -> Callable[[Any, Sequence[int], int], list[int]]:
    return hf_greedy_tokens


@pytest.fixture
def byte_prompts() -> list[list[int]]:
    """Byte-token prompts of different lengths (1 to 23 tokens), each starting with BOS."""
    texts = ["Hi", "The quick brown fox", "", "naïve café — 日本語 ok"]
    return [[HF_BOS_ID, *t.encode("utf-8")][:23] for t in texts]
