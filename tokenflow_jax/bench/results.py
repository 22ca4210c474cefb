"""One scheduler's pass over a workload, as the bench reports and plots it."""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenflow_jax.metrics import RequestRecord


@dataclasses.dataclass
class SchedulerRun:
    """One scheduler's pass over the workload."""

    name: str
    records: list[RequestRecord]
    summary: dict[str, Any]
    start: float  # executor time at which the workload started (plots count from it)
    wall_s: float
    step_seconds: list[float] = dataclasses.field(default_factory=list)  # per token-yielding step (bench.bounds)
