"""Replay a workload against an engine core: submit each request at its arrival time, step while there is work.

Time is the executor's clock (`executor.now()`), so the same loop drives the real engine in wall-clock time and
the simulator in virtual time. A spec's arrival is seconds after the replay starts; the request's recorded
arrival is that intended time, so a submission delayed by a running step still counts against its TTFT.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.metrics import RequestRecord
from tokenflow_jax.request import Request
from tokenflow_jax.sampling_params import SamplingParams
from tokenflow_jax.workloads import RequestSpec

PROMPT_VOCAB = 256  # byte tokens: valid for the byte-level tiny model and for any real vocabulary
IDLE_TICK_S = 0.005  # how far the clock moves when a step did nothing (a policy may hold everyone back)
STALL_LIMIT_S = 60.0  # executor seconds without progress and nothing left to arrive: the policy is stuck

MakeRequest = Callable[[RequestSpec, float], Request]


def prompt_ids(spec: RequestSpec, seed: int = 0, vocab_size: int = PROMPT_VOCAB) -> list[int]:
    """Random token ids of the spec's prompt length, the same for a given (seed, request id) on every run; a
    spec made of segments gets each segment's own ids, so specs that share a segment share its tokens."""
    if spec.segments:
        return [int(t) for key, n in spec.segments
                for t in np.random.default_rng([seed, 1 << 32, key]).integers(0, vocab_size, n)]  # fmt: skip
    rng = np.random.default_rng([seed, zlib.crc32(spec.request_id.encode())])
    return [int(t) for t in rng.integers(0, vocab_size, spec.prompt_len)]


def spec_request(spec: RequestSpec, arrival: float, *, seed: int = 0) -> Request:
    """The request a spec stands for: random prompt, exactly `output_len` greedy tokens, read at `spec.rate`."""
    return Request(
        request_id=spec.request_id,
        prompt_ids=prompt_ids(spec, seed),
        sampling=SamplingParams(max_tokens=spec.output_len, ignore_eos=True),
        rate=spec.rate,
        arrival=arrival,
        seed=seed,
    )


def replay(
    core: EngineCore,
    specs: Sequence[RequestSpec],
    make_request: MakeRequest | None = None,
    *,
    time_limit: float | None = None,
    progress: bool = True,
    desc: str | None = None,
    step_seconds: list[float] | None = None,
) -> list[RequestRecord]:
    """Run `specs` through `core` and return their records in spec order.

    `make_request(spec, arrival)` builds each request (default: `spec_request`). With `time_limit` (executor
    seconds after the start) the run stops there: live requests are aborted and keep the tokens they got;
    requests not yet submitted are returned as failed records (no tokens). With `step_seconds`, each step that
    yields tokens appends the seconds from its start to its tokens' time (the real engine's step floor for
    `tokenflow_jax.bench.bounds`).
    """
    from tqdm import tqdm

    make_request = make_request or spec_request
    ex = core.executor
    pending = sorted(specs, key=lambda s: s.arrival)
    t0 = ex.now()
    deadline = None if time_limit is None else t0 + time_limit
    bar = tqdm(total=len(pending), desc=desc or core.policy.name, unit="req", disable=not progress, leave=False)
    next_spec, stalled_since = 0, None
    while next_spec < len(pending) or core.has_work():
        now = ex.now()
        if deadline is not None and now >= deadline:
            break
        # `now >= t0 + arrival`, not `now - t0 >= arrival`: idle_until(t0 + arrival) must make it true exactly.
        while next_spec < len(pending) and now >= t0 + pending[next_spec].arrival:
            spec = pending[next_spec]
            core.add_request(make_request(spec, t0 + spec.arrival))
            next_spec += 1
        next_arrival = t0 + pending[next_spec].arrival if next_spec < len(pending) else None
        if not core.has_work():
            ex.idle_until(next_arrival)
            continue
        finished = len(core.records)
        events = core.step()
        if step_seconds is not None and events:
            step_seconds.append(events[0].time - now)
        bar.update(len(core.records) - finished)
        if core.last_step_moved:
            stalled_since = None
            continue
        # Nothing moved: let the clock run (the simulator's does not advance on an empty step).
        now = ex.now()
        stalled_since = now if stalled_since is None else stalled_since
        if next_arrival is None and now - stalled_since > STALL_LIMIT_S:
            raise RuntimeError(f"policy {core.policy.name} made no progress for {STALL_LIMIT_S} s "
                               f"with {len(core.requests)} requests live")  # fmt: skip
        ex.idle_until(now + IDLE_TICK_S if next_arrival is None else min(next_arrival, now + IDLE_TICK_S))
    bar.close()
    for rid in core.live_ids():
        core.abort(rid)
    records = dict(core.records)
    for spec in pending[next_spec:]:
        records[spec.request_id] = RequestRecord(spec.request_id, t0 + spec.arrival, spec.rate, spec.prompt_len)
    return [records[s.request_id] for s in specs if s.request_id in records]
