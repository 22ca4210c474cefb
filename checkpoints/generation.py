"""What a checkpoint says about generation: BOS and EOS ids, and sampling defaults for requests that set none.

Each id comes from `generation_config.json`, else `config.json`, else the tokenizer (what HF `generate` and
vLLM do); `temperature`, `top_p` and `top_k` in `generation_config.json` are the defaults a request gets for
the fields it leaves unset, as in vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tokenflow_jax.config import ModelConfig
from tokenflow_jax.sampling_params import SamplingParams

GENERATION_CONFIG = "generation_config.json"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """The checkpoint's BOS and EOS ids and its sampling defaults (only the fields it sets)."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sampling: dict[str, float | int] = dataclasses.field(default_factory=dict)

    def sampling_params(self, **fields: Any) -> SamplingParams:
        """`SamplingParams(**fields)`, with the checkpoint's default for each sampling field left out."""
        return SamplingParams(**{**self.sampling, **fields})


def read_generation_config(folder: Path | None) -> dict[str, Any]:
    path = None if folder is None else Path(folder) / GENERATION_CONFIG
    if path is None or not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def checkpoint_special_tokens(folder: Path | None, cfg: ModelConfig) -> SpecialTokens:
    """BOS and EOS as the checkpoint files say: generation_config.json, else config.json (None / () if neither)."""
    gen = read_generation_config(folder)
    bos = gen.get("bos_token_id")
    eos = _ids(gen.get("eos_token_id")) or cfg.eos_token_ids
    return SpecialTokens(cfg.bos_token_id if bos is None else int(bos), eos)


def generation_defaults(folder: Path | None, cfg: ModelConfig, tokenizer: Any) -> GenerationDefaults:
    """The checkpoint's ids (the tokenizer's where the files name none) and validated sampling defaults."""
    ids = checkpoint_special_tokens(folder, cfg)
    gen = read_generation_config(folder)
    sampling = {k: gen[k] for k in SAMPLING_FIELDS if gen.get(k) is not None}
    if "top_k" in sampling:
        sampling["top_k"] = max(int(sampling["top_k"]), 0)  # HF and vLLM write -1 or 0 for "off"
    try:
        SamplingParams(**sampling)
    except ValueError as e:
        raise ValueError(f"{Path(folder or '.') / GENERATION_CONFIG}: {e}") from e
    return GenerationDefaults(
        bos_token_id=tokenizer.bos_token_id if ids.bos_token_id is None else ids.bos_token_id,
        eos_token_ids=ids.eos_token_ids or tuple(tokenizer.eos_token_ids),
        sampling=sampling,
    )
