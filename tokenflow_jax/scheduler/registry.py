"""Policies by name."""

from __future__ import annotations

import importlib
from typing import Any

from tokenflow_jax.scheduler.interface import Policy

POLICIES = {
    "fcfs": ("tokenflow_jax.scheduler.fcfs", "FCFSPolicy"),
    "sglang": ("tokenflow_jax.scheduler.sglang", "SGLangPolicy"),
    "sglang-chunked": ("tokenflow_jax.scheduler.sglang", "SGLangChunkedPolicy"),
    "andes": ("tokenflow_jax.scheduler.andes", "AndesPolicy"),
    "tokenflow": ("tokenflow_jax.scheduler.tokenflow", "TokenFlowPolicy"),
}


def make_policy(name: str, **config: Any) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(POLICIES)}")
    module, cls = POLICIES[name]
    try:
        policy_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"scheduler {name!r} is not available: {e}") from e
    return policy_cls(**config)
