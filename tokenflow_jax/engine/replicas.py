"""`EngineReplicas`: data-parallel replicas, M `AsyncEngine`s on disjoint device groups behind one front.

Each replica is a whole engine (its own model copy, KV pools, policy and engine thread) on its own
`tensor_parallel_size` devices; a new request joins the replica `scheduler.routing.pick_replica` chooses from
each replica's published load, and stays there: its stream, abort and finish go to that replica's engine.

    replicas = EngineReplicas([AsyncEngine(llm) for llm in llms])
    await replicas.start()
    stream = replicas.submit("Hello", SamplingParams(max_tokens=8), rate=20.0)
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
from collections.abc import Callable, Sequence

import jax

from tokenflow_jax.engine.async_engine import AsyncEngine, EngineStats, EngineStopped, RequestStream
from tokenflow_jax.metrics import RequestRecord
from tokenflow_jax.parallel import check_device_count
from tokenflow_jax.sampling_params import SamplingParams
from tokenflow_jax.scheduler.routing import pick_replica


def replica_devices(
    data_parallel_size: int, tensor_parallel_size: int, devices: Sequence[jax.Device] | None = None
) -> list[list[jax.Device]]:
    """The device group of each replica: replica i takes devices [i*T, (i+1)*T) of `devices` (default
    `jax.devices()`); ValueError naming the counts when there are too few."""
    for flag, n in (("data_parallel_size", data_parallel_size), ("tensor_parallel_size", tensor_parallel_size)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{flag} must be a positive integer, got {n!r}")
    available = list(jax.devices()) if devices is None else list(devices)
    what = f"data_parallel_size {data_parallel_size} x tensor_parallel_size {tensor_parallel_size}"
    check_device_count(what, data_parallel_size * tensor_parallel_size, len(available))
    t = tensor_parallel_size
    return [available[i * t : (i + 1) * t] for i in range(data_parallel_size)]


def total_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """The whole server's snapshot: every count and capacity summed over the replicas."""
    reasons: collections.Counter[str] = collections.Counter()
    for s in stats:
        reasons.update(dict(s.finished_by_reason))
    sums = {f.name: sum(getattr(s, f.name) for s in stats)
            for f in dataclasses.fields(EngineStats) if f.name != "finished_by_reason"}  # fmt: skip
    return EngineStats(**sums, finished_by_reason=tuple(sorted(reasons.items())))


class EngineReplicas:
    """Routes new requests over replicas; offers what a server uses of one `AsyncEngine` (submit, abort, stats,
    finish listeners, start and shutdown), for the whole set."""

    def __init__(self, engines: Sequence[AsyncEngine]) -> None:
        if not engines:
            raise ValueError("EngineReplicas needs at least one engine")
        self.replicas = list(engines)
        self.llm = self.replicas[0].llm  # the model every replica serves (tokenizer, limits, defaults)
        self.routed = [0] * len(self.replicas)  # requests each replica was given
        numbers = itertools.count()  # one numbering: no two replicas give the same default request id or seed
        for engine in self.replicas:
            engine.llm.request_numbers = numbers

    async def start(self) -> None:
        for engine in self.replicas:
            await engine.start()

    async def shutdown(self) -> None:
        """Abort every request on every replica and stop their engine threads."""
        await asyncio.gather(*(engine.shutdown() for engine in self.replicas))

    @property
    def is_running(self) -> bool:
        """Whether any replica takes requests: one whose engine thread died fails only its own requests, and new
        ones go to the rest (`submit`)."""
        return any(engine.is_running for engine in self.replicas)

    @property
    def failures(self) -> dict[int, str]:
        """The replicas whose engine thread died, and why."""
        return {i: engine.failure for i, engine in enumerate(self.replicas) if engine.failure is not None}

    @property
    def num_unfinished(self) -> int:
        return sum(engine.num_unfinished for engine in self.replicas)

    def submit(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams,
        *,
        rate: float | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """`AsyncEngine.submit` on the replica with the most spare decode capacity (`pick_replica`)."""
        live = [i for i, engine in enumerate(self.replicas) if engine.is_running]
        if not live:
            raise EngineStopped("the engine is not running")
        if request_id is not None and any(engine.holds(request_id) for engine in self.replicas):
            raise ValueError(f"duplicate request id {request_id!r}")
        chosen = live[pick_replica([self.replicas[i].load() for i in live])]
        stream = self.replicas[chosen].submit(prompt, sampling, rate=rate, request_id=request_id)
        self.routed[chosen] += 1
        return stream

    def abort(self, request_id: str) -> None:
        for engine in self.replicas:
            engine.abort(request_id)  # only the replica holding it acts

    def stats(self) -> EngineStats:
        return total_stats([engine.stats() for engine in self.replicas])

    def add_finish_listener(self, listener: Callable[[RequestRecord], None]) -> None:
        for engine in self.replicas:
            engine.add_finish_listener(listener)
