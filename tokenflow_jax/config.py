"""Model configuration: HF `config.json` parsing and named presets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_ARCHITECTURE_OF = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# `dynamic` NTK equals plain RoPE up to max_position_embeddings, the longest context the engine serves.
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (Llama, Qwen2 or Mistral family)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 500000.0
    # Hashable form of HF rope_scaling: sorted (key, value) pairs, or None.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mistral's and Qwen2's sliding-window attention: equal to full attention for contexts up to the window.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def max_context(self) -> int:
        """The longest sequence the model computes as HF does: positions it was configured for, and no longer
        than a sliding window (the engine attends to the whole context)."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)

    @property
    def num_params(self) -> int:
        """Weights in the params pytree (`model.init_params`, `checkpoints.load_hf_model`)."""
        d, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = 2 * d + 2 * d * q + 2 * d * kv + 3 * d * self.intermediate_size
        per_layer += (q + 2 * kv) if self.attention_bias else 0
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return embeddings + d + self.num_layers * per_layer

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes one token occupies across all layers, per byte of element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """An HF `config.json`; ValueError naming any architecture or option the model code does not implement."""
        archs = hf.get("architectures") or []
        model_type = str(hf.get("model_type"))
        arch = archs[0] if archs else _ARCHITECTURE_OF.get(model_type, model_type)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        # transformers 5 writes the scaling (and rope_theta) as `rope_parameters` instead of `rope_scaling`.
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
        rope.pop("rope_theta", None)
        rope_type = rope.get("rope_type", rope.get("type")) or "default"
        unsupported = _unsupported_options(hf, arch, rope, rope_type)
        if unsupported:
            raise ValueError(f"{arch} with {'; '.join(unsupported)} is not implemented")
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        uses_window = arch == "MistralForCausalLM" or hf.get("use_sliding_window", False)
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rope_theta=float(rope_theta),
            rope_scaling=None if rope_type == "default" else tuple(sorted(rope.items())),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen2ForCausalLM",
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            sliding_window=hf.get("sliding_window") if uses_window else None,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))


def _unsupported_options(hf: dict[str, Any], arch: str, rope: dict[str, Any], rope_type: str) -> list[str]:
    """The options of an HF config that the model code would silently compute differently."""
    found = []
    if hf.get("hidden_act", "silu") != "silu":
        found.append(f"hidden_act {hf['hidden_act']!r} (only silu)")
    if hf.get("mlp_bias"):
        found.append("mlp_bias")
    if hf.get("attention_bias") and arch == "LlamaForCausalLM":
        found.append("attention_bias (an o_proj bias)")
    if hf.get("quantization_config"):
        found.append(f"quantization_config ({hf['quantization_config'].get('quant_method', 'unknown method')})")
    if rope_type not in ROPE_TYPES:
        found.append(f"rope_scaling type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        found.append("partial_rotary_factor")
    return found


# Byte-level vocabulary for presets: 256 bytes plus BOS (256), EOS (257) and padding up to 512.
BYTE_VOCAB_SIZE = 512
BYTE_BOS_ID = 256
BYTE_EOS_ID = 257

# Random-weight presets (byte tokenizer): `tiny-random` for tests, the real shapes for benchmarks. The default
# model `tiny` is a trained model folder with tiny-random's shapes (`checkpoints.presets.EMBEDDED_MODELS`).
# Llama-3.1's rope scaling (the 8B and 70B presets).
LLAMA31_ROPE_SCALING = tuple(
    sorted(
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }.items()
    )
)

PRESETS: dict[str, ModelConfig] = {
    "tiny-random": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        # Untied: with tied random embeddings every token's top logit is itself and greedy output repeats one
        # token, which would hide KV corruption from the tests.
        tie_word_embeddings=False,
        bos_token_id=BYTE_BOS_ID,
        eos_token_ids=(BYTE_EOS_ID,),
    ),
    "llama3-8b": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=LLAMA31_ROPE_SCALING,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
    # Llama-3.1-70B's shapes (141 GB of bf16 weights: more than one GPU holds).
    "llama3-70b": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=LLAMA31_ROPE_SCALING,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
    "qwen2.5-7b": ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        attention_bias=True,
        max_position_embeddings=32768,
        bos_token_id=151643,
        eos_token_ids=(151645, 151643),
    ),
    "qwen2.5-32b": ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_layers=64,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        attention_bias=True,
        max_position_embeddings=32768,
        bos_token_id=151643,
        eos_token_ids=(151645, 151643),
    ),
}
