"""Load an HF Llama / Qwen2 / Mistral safetensors folder into the params pytree of `tokenflow_jax.model`, and
write params back as such a folder.

HF stores linear weights `[out, in]`; the model multiplies `x @ w`, so every projection is transposed to
`[in, out]`. Tensors are read one at a time (memory-mapped), moved to the default device in their
stored dtype, then transposed and cast there, so the host never holds a second copy of the model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokenflow_jax.config import ModelConfig
from tokenflow_jax.model import Params

SUPPORTED_DTYPES = ("float32", "bfloat16")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
# Tensors some checkpoints carry that the model recomputes or never uses.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A model folder that cannot be turned into params: missing, malformed or unsupported."""


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """'float32' | 'bfloat16' | a numpy/jax dtype -> jnp.dtype; anything else is a ValueError."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}") from e
    if resolved.name not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
    return resolved


def load_hf_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"no config.json in model folder {path}")
    try:
        return ModelConfig.from_json_file(config_file)
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"malformed {config_file}: {e!r}") from e
    except ValueError as e:  # unsupported architecture or rope scaling
        raise CheckpointError(f"{config_file}: {e}") from e


def hf_tensor_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """HF tensor name -> (path in the params pytree, HF shape, whether to transpose to [in, out])."""
    d, f, hd, v = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layout: dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]] = {
        "model.embed_tokens.weight": (("embed",), (v, d), False),
        "model.norm.weight": (("final_norm",), (d,), False),
    }
    if not cfg.tie_word_embeddings:
        layout["lm_head.weight"] = (("lm_head",), (v, d), True)
    for i in range(cfg.num_layers):
        p, at = f"model.layers.{i}.", ("layers", str(i))
        layout |= {
            p + "input_layernorm.weight": ((*at, "attn_norm"), (d,), False),
            p + "post_attention_layernorm.weight": ((*at, "mlp_norm"), (d,), False),
            p + "self_attn.q_proj.weight": ((*at, "wq"), (q, d), True),
            p + "self_attn.k_proj.weight": ((*at, "wk"), (kv, d), True),
            p + "self_attn.v_proj.weight": ((*at, "wv"), (kv, d), True),
            p + "self_attn.o_proj.weight": ((*at, "wo"), (d, q), True),
            p + "mlp.gate_proj.weight": ((*at, "w_gate"), (f, d), True),
            p + "mlp.up_proj.weight": ((*at, "w_up"), (f, d), True),
            p + "mlp.down_proj.weight": ((*at, "w_down"), (d, f), True),
        }
        if cfg.attention_bias:
            layout |= {
                p + "self_attn.q_proj.bias": ((*at, "bq"), (q,), False),
                p + "self_attn.k_proj.bias": ((*at, "bk"), (kv,), False),
                p + "self_attn.v_proj.bias": ((*at, "bv"), (kv,), False),
            }
    return layout


def _tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index_file = path / SAFETENSORS_INDEX
    if index_file.is_file():
        with open(index_file) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file} has no weight_map")
        missing_shards = sorted({s for s in weight_map.values() if not (path / s).is_file()})
        if missing_shards:
            raise CheckpointError(f"shards listed in {index_file} are missing: {', '.join(missing_shards)}")
        return {name: path / shard for name, shard in weight_map.items()}
    single = path / SAFETENSORS_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in model folder {path}")


@contextlib.contextmanager
def _open_shards(files: set[Path]) -> Iterator[dict[Path, Any]]:
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        # safetensors' numpy reader returns bf16 as ml_dtypes.bfloat16, which jax accepts as is.
        yield {p: stack.enter_context(safe_open(str(p), framework="numpy")) for p in sorted(files)}


@jax.jit(static_argnums=(1, 2))
def _to_param(x: jax.Array, transpose: bool, dtype: jnp.dtype) -> jax.Array:
    return (x.T if transpose else x).astype(dtype)


def load_hf_model(path: str | Path, dtype: Any = "float32") -> tuple[ModelConfig, Params]:
    """Read an HF model folder into (config, params) on the default device, weights cast to `dtype`.

    Raises CheckpointError for a missing folder/config/tensor, a shape mismatch, an unsupported architecture,
    or tensors the model would silently ignore (e.g. o_proj biases, MLP biases).
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)
    cfg = load_hf_config(path)
    layout = hf_tensor_layout(cfg)
    files = _tensor_files(path)
    missing = [name for name in layout if name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {missing[0]!r}{more} in {path}")
    unused = [
        n
        for n in files
        if n not in layout
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    ]
    if unused:
        raise CheckpointError(f"unsupported model variant: unexpected tensors {sorted(unused)[:5]} in {path}")

    layers: list[dict[str, jax.Array]] = [{} for _ in range(cfg.num_layers)]
    params: Params = {"layers": layers}
    with _open_shards({files[n] for n in layout}) as handles:
        for name, (tree_path, shape, transpose) in layout.items():
            handle = handles[files[name]]
            got = tuple(handle.get_slice(name).get_shape())
            if got != shape:
                raise CheckpointError(f"shape mismatch for {name!r}: expected {shape}, got {got}")
            value = _to_param(jnp.asarray(handle.get_tensor(name)), transpose, dtype)
            if tree_path[0] == "layers":
                layers[int(tree_path[1])][tree_path[2]] = value
            else:
                params[tree_path[0]] = value
    return cfg, params


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` transformers reads as `cfg` (and `ModelConfig.from_hf_dict` reads back as `cfg`)."""
    return {
        "architectures": [cfg.architecture],
        "model_type": _MODEL_TYPES[cfg.architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling_dict,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "sliding_window": cfg.sliding_window,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
        "torch_dtype": "float32",
    }


def save_hf_model(cfg: ModelConfig, params: Params, path: str | Path) -> Path:
    """Write `params` as an HF folder (`config.json` + float32 `model.safetensors`) under `path` (created)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (tree_path, _, transpose) in hf_tensor_layout(cfg).items():
        value = params["layers"][int(tree_path[1])][tree_path[2]] if tree_path[0] == "layers" else params[tree_path[0]]
        value = np.asarray(value, dtype=np.float32)
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    save_file(tensors, str(path / SAFETENSORS_FILE), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    return path
