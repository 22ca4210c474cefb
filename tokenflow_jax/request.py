"""A request's host-side state: tokens, status and where its KV lives. No device arrays here (device page ids
are a stdlib int32 `array`)."""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from array import array

from tokenflow_jax.kv.pages import page_ids
from tokenflow_jax.sampling_params import SamplingParams

# Stands in `output_ids` for a token the device sampled and the host has not read yet (one step at most).
PENDING_TOKEN = -1


def stream_rate(value: object) -> float | None:
    """A reader's rate from user input: a finite number of tokens/s > 0, or None for a request that states no rate
    (rate-less: an agent or a batch job, served at whatever the streams leave spare). Anything else is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"stream rate must be a number of tokens/s > 0 or None (no rate), got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"stream rate must be a finite number of tokens/s > 0, got {value!r}")
    return float(value)


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # no KV on device; starts (or restarts after recompute-preemption) with a prefill
    RUNNING = "running"  # KV on device, scheduled every iteration
    PAUSED = "paused"  # preempted by swap: KV only in the host tier, resumes by swap-in
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request. `num_computed` tokens of `prompt_ids + output_ids` have KV on the device.

    A step computes `all_ids[num_computed : num_computed + n]`; when that reaches the last known token the
    step samples the next one (so decode is the n = 1 case and recompute is a longer prefill).
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    rate: float | None  # tokens/s its reader consumes; None: states no rate (rate-less)
    arrival: float
    seed: int = 0
    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0
    # Tokens whose KV the host tier holds (write-through progress); maintained by the executor.
    num_host_synced: int = 0
    device_pages: array = dataclasses.field(default_factory=page_ids)  # int32 (`page_ids`)
    host_pages: list[int] = dataclasses.field(default_factory=list)
    preemptions_swap: int = 0
    preemptions_recompute: int = 0
    admitted_order: int = -1  # when it last entered RUNNING (baselines preempt the latest)
    finish_reason: str | None = None
    num_cached_tokens: int = -1  # prompt tokens its first start found in the prefix cache (-1: not started)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        # (`num_tokens` written out: every policy asks this of every request every iteration)
        return len(self.prompt_ids) + len(self.output_ids) - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed > 1

    def token_slice(self, start: int, stop: int) -> list[int]:
        # Slices of each list, never their concatenation: a decode step asks this of every request, every step.
        p = len(self.prompt_ids)
        if stop <= p:
            return self.prompt_ids[start:stop]
        if start >= p:
            return self.output_ids[start - p : stop - p]
        return self.prompt_ids[start:] + self.output_ids[: stop - p]

    @property
    def remaining_output(self) -> int:
        return self.sampling.max_tokens - len(self.output_ids)
