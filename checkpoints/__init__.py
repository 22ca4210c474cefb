"""HF safetensors loading, orbax save/restore of converted params, and model presets."""

from checkpoints.hf import CheckpointError, load_hf_config, load_hf_model, resolve_dtype
from checkpoints.orbax_io import restore_params, save_params
from checkpoints.presets import LoadedModel, load_model, model_source, random_params

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "load_hf_config",
    "load_hf_model",
    "load_model",
    "model_source",
    "random_params",
    "resolve_dtype",
    "restore_params",
    "save_params",
]
