"""Save and restore converted params with orbax, with the ModelConfig as JSON beside them.

Layout of `directory`: `params/` (an orbax StandardCheckpointer checkpoint) and `tokenflow_config.json`.
The config file has its own name so an orbax folder is never mistaken for an HF folder (`config.json`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from tokenflow_jax.config import ModelConfig
from tokenflow_jax.model import Params

PARAMS_SUBDIR = "params"
CONFIG_FILE = "tokenflow_config.json"


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    out["eos_token_ids"] = list(cfg.eos_token_ids)
    return out


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    data = dict(data)
    scaling = data.get("rope_scaling")
    data["rope_scaling"] = tuple(sorted(scaling.items())) if scaling else None
    data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
    return ModelConfig(**data)


def is_orbax_model_dir(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / CONFIG_FILE).is_file() and (directory / PARAMS_SUBDIR).is_dir()


def read_config(directory: str | Path) -> ModelConfig:
    return config_from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))


def save_params(params: Params, cfg: ModelConfig, directory: str | Path) -> Path:
    """Write params and config under `directory` (created; an existing checkpoint there is replaced)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()  # orbax requires absolute paths
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / PARAMS_SUBDIR, params, force=True)
    checkpointer.wait_until_finished()
    (directory / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    return directory


def restore_params(directory: str | Path) -> tuple[ModelConfig, Params]:
    """Read back what `save_params` wrote, placing every array on the default device."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not is_orbax_model_dir(directory):
        raise FileNotFoundError(f"no orbax checkpoint ({CONFIG_FILE} + {PARAMS_SUBDIR}/) in {directory}")
    cfg = read_config(directory)
    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(directory / PARAMS_SUBDIR).item_metadata.tree
    # An explicit target keeps restore independent of the device the checkpoint was saved from.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored)
    return cfg, checkpointer.restore(directory / PARAMS_SUBDIR, target)
