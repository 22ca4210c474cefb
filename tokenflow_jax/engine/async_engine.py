"""`AsyncEngine`: the LLM's EngineCore on its own thread, streaming per-request text deltas to asyncio.

The asyncio loop never waits on the device. `submit` puts a request in an inbox that the engine thread
drains (new requests, then aborts) before every step; the thread detokenizes each sampled token and hands
the deltas back to per-request `asyncio.Queue`s with one `loop.call_soon_threadsafe` per iteration.

    engine = AsyncEngine(LLM("tiny"))
    await engine.start()
    async for delta in engine.submit("Hello", SamplingParams(max_tokens=8)):
        print(delta.text, end="")
    await engine.shutdown()
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

from tokenflow_jax.engine.core import TokenEvent
from tokenflow_jax.engine.detokenize import token_text
from tokenflow_jax.engine.llm import LLM
from tokenflow_jax.estimators import DecayingPeak
from tokenflow_jax.metrics import RequestRecord, rebuffer_seconds
from tokenflow_jax.request import Request
from tokenflow_jax.sampling_params import SamplingParams
from tokenflow_jax.scheduler.routing import ReplicaLoad
from tokenflow_jax.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

# Scheduler timings kept per iteration; the core appends one per step, a server runs forever.
_SCHEDULER_TIMES_KEPT = 4096
# How long the engine thread waits when a step sampled nothing (a policy that keeps everyone paused).
_EMPTY_STEP_WAIT_S = 0.001


@dataclasses.dataclass(frozen=True)
class StreamDelta:
    """One sampled token as the client sees it. `text` is the final text it adds (may be empty: a partial
    UTF-8 character or a possible stop-string start is held back). A closing delta without a token
    (`token_id` None) ends a stream that was aborted."""

    request_id: str
    token_id: int | None
    text: str
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string), "length", "abort"
    prompt_tokens: int
    completion_tokens: int
    created_at: float = 0.0  # time.monotonic() when the engine read the token
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (usage.prompt_tokens_details)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the engine, taken by the engine thread after each iteration."""

    running: int = 0
    waiting: int = 0
    paused: int = 0
    device_pages_used: int = 0
    host_pages_used: int = 0
    device_pages_total: int = 0
    host_pages_total: int = 0
    preemptions_swap: int = 0
    preemptions_recompute: int = 0
    rebuffer_s: float = 0.0
    finished_requests: int = 0
    finished_by_reason: tuple[tuple[str, int], ...] = ()  # ("stop" | "length" | "abort" | "error", count)
    prefix_cache_queries: int = 0  # prompt tokens looked up as requests start (`core.PrefixCacheStats`)
    prefix_cache_hits: int = 0  # of those, found cached (either tier)
    prefix_cache_host_hits: int = 0  # of those, loaded back from the host tier
    decode_capacity_tok_s: float = 0.0  # what its batch decodes, tok/s (the executor's Gamma); 0 before a decode step


class EngineStopped(RuntimeError):
    """The engine was shut down (or is not started) and takes no more requests."""


class EngineError(RuntimeError):
    """The engine failed while running a request (a bug: the traceback is in the log)."""


@dataclasses.dataclass
class _Add:
    request: Request


@dataclasses.dataclass
class _Abort:
    request_id: str


@dataclasses.dataclass
class _LiveRequest:
    """Engine-thread state of one request."""

    detokenizer: IncrementalDetokenizer
    request: Request
    completion_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def cached_tokens(self) -> int:
        return max(self.request.num_cached_tokens, 0)


# What the engine thread hands to the loop each iteration: deltas or errors per request, finished records.
_Outbox = list[tuple[str, "StreamDelta | BaseException"]]


class RequestStream:
    """Async iterator over one request's `StreamDelta`s; ends after the finished delta.

    Errors the engine thread found (e.g. the prompt does not fit the model) are raised on iteration.
    `aclose()` aborts the request if it has not finished.
    """

    def __init__(self, engine: AsyncEngine, request: Request) -> None:
        self.engine = engine
        self.request_id = request.request_id
        self.prompt_tokens = len(request.prompt_ids)
        self.rate = request.rate  # tokens/s its reader takes; None: rate-less
        self.finished = False
        self._queue: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamDelta:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def ready(self) -> list[StreamDelta]:
        """Deltas already delivered, without waiting (lets a writer batch what piled up)."""
        out = []
        while not self.finished and not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, BaseException):
                self._queue.put_nowait(item)  # raised by the next __anext__
                break
            self.finished = item.finished
            out.append(item)
        return out

    def abort(self) -> None:
        if not self.finished:
            self.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


class AsyncEngine:
    """Runs `llm.core` on a dedicated thread; everything public is called from the asyncio loop."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.core = llm.core
        self.executor = llm.executor
        self._wake = threading.Condition()
        self._inbox: list[_Add | _Abort] = []  # guarded by _wake
        self._stopping = False  # guarded by _wake
        self.failure: str | None = None  # why the engine thread died, if it did (not set by a shutdown)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}  # loop side: unfinished requests
        self._finish_listeners: list[Callable[[RequestRecord], None]] = []
        self.delivery_lag = DecayingPeak()  # how far behind the engine clients get tokens, s
        # Engine-thread side.
        self._live: dict[str, _LiveRequest] = {}
        self._finished_preemptions_swap = 0
        self._finished_preemptions_recompute = 0
        self._finished_rebuffer_s = 0.0
        self._finished_count = 0
        self._finished_by_reason: collections.Counter[str] = collections.Counter()
        self._stats = self._snapshot()  # replaced whole by the engine thread: readers see one snapshot

    # ---- lifecycle
    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tokenflow-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Abort every request (their streams end with finish_reason "abort") and stop the engine thread."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.to_thread(thread.join)
        await asyncio.sleep(0)  # run the final deliveries the thread scheduled

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- requests
    def submit(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams,
        *,
        rate: float | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request; iterate the returned stream for its deltas. Bad prompts and rates raise
        ValueError here; limits the engine checks (model length) raise on the first iteration."""
        if not self.is_running:
            raise EngineStopped("the engine is not running")
        if request_id is not None and request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        # No rate: the engine's default (which may be None: rate-less).
        request = self.llm.make_request(prompt, sampling, rate=... if rate is None else rate, request_id=request_id)
        if request.request_id in self._streams:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        stream = RequestStream(self, request)
        self._post(_Add(request))
        self._streams[request.request_id] = stream  # deliveries run on this loop, after this call returns
        return stream

    def abort(self, request_id: str) -> None:
        """Finish the request; the engine thread frees its pages on both tiers before its next step."""
        if request_id in self._streams:
            self._post(_Abort(request_id))

    def holds(self, request_id: str) -> bool:
        """Whether `request_id` was submitted here and has not finished."""
        return request_id in self._streams

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished (queued, waiting, running or paused)."""
        return len(self._streams)

    def stats(self) -> EngineStats:
        return self._stats

    def load(self) -> ReplicaLoad:
        """What a data-parallel router weighs: the published capacity and the rates of the unfinished requests
        (counted here, on the loop, from the moment they are submitted)."""
        rates = [stream.rate for stream in self._streams.values()]
        return ReplicaLoad.of(rates, self._stats.decode_capacity_tok_s, self.executor.max_num_seqs)

    def report_delivery(self, delta: StreamDelta) -> None:
        """A server wrote `delta` to its client just now: fold the lag into what the policy sees (the engine thread
        reads one float; no lock needed)."""
        if delta.created_at:
            self.core.delivery_lag_s = self.delivery_lag.add(max(0.0, time.monotonic() - delta.created_at))

    def add_finish_listener(self, listener: Callable[[RequestRecord], None]) -> None:
        """Call `listener(record)` on the loop for every request that ends (finished or aborted)."""
        self._finish_listeners.append(listener)

    def _post(self, command: _Add | _Abort) -> None:
        with self._wake:
            if self._stopping:
                if isinstance(command, _Add):
                    raise EngineStopped("the engine is shutting down")
                return
            self._inbox.append(command)
            self._wake.notify()

    # ---- loop side: deliveries from the engine thread
    def _deliver(self, outbox: _Outbox, records: list[RequestRecord]) -> None:
        for request_id, item in outbox:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if isinstance(item, BaseException) or item.finished:
                del self._streams[request_id]
            stream._queue.put_nowait(item)
        for record in records:
            for listener in self._finish_listeners:
                try:
                    listener(record)
                except Exception:
                    logger.exception("finish listener failed")

    # ---- engine thread
    def _run(self) -> None:
        try:
            self._serve_forever()
        except BaseException as e:  # a bug: no stream may be left waiting on a dead thread
            logger.exception("engine thread died")
            self.failure = f"{type(e).__name__}: {e}"
            with self._wake:
                self._stopping = True
                commands, self._inbox = self._inbox, []
            outbox: _Outbox = [(c.request.request_id, EngineError(f"engine thread died: {e}"))
                               for c in commands if isinstance(c, _Add)]  # fmt: skip
            records: list[RequestRecord] = []
            self._fail_all(EngineError(f"engine thread died: {e}"), outbox, records)
            self._publish(outbox, records)

    def _serve_forever(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self._stopping or self.core.has_work()):
                    self._wake.wait()  # idle: nothing to do until a submit, abort or shutdown
                commands, self._inbox = self._inbox, []
                stopping = self._stopping
            outbox: _Outbox = []
            records: list[RequestRecord] = []
            for command in commands:
                self._apply(command, outbox, records)
            if stopping:
                for request_id in list(self._live):
                    self._end(request_id, "abort", outbox, records)
                self._publish(outbox, records)
                return
            sampled = False
            if self.core.has_work():
                try:
                    events = self.core.step()
                    for event in events:
                        self._on_token(event, outbox, records)
                    sampled = bool(events)
                except Exception as e:
                    logger.exception("engine step failed; failing every in-flight request")
                    self._fail_all(EngineError(f"engine step failed: {e}"), outbox, records)
            self._publish(outbox, records)
            if not sampled and self.core.has_work():
                with self._wake:
                    if not self._inbox and not self._stopping:
                        self._wake.wait(_EMPTY_STEP_WAIT_S)

    def _apply(self, command: _Add | _Abort, outbox: _Outbox, records: list[RequestRecord]) -> None:
        if isinstance(command, _Abort):
            if command.request_id in self._live:
                self._end(command.request_id, "abort", outbox, records)
            return
        request = command.request
        try:
            detokenizer = IncrementalDetokenizer(self.llm.tokenizer, request.sampling.stop, request.prompt_ids)
            self.core.add_request(request)
        except ValueError as e:  # the caller's mistake (too long for the model, duplicate id)
            outbox.append((request.request_id, e))
            return
        except Exception as e:
            logger.exception("could not add %s", request.request_id)
            outbox.append((request.request_id, EngineError(f"could not add the request: {e}")))
            return
        self._live[request.request_id] = _LiveRequest(detokenizer, request)

    def _on_token(self, event: TokenEvent, outbox: _Outbox, records: list[RequestRecord]) -> None:
        live = self._live.get(event.request_id)
        if live is None:
            return
        live.completion_tokens += 1
        text, finished, reason = token_text(self.core, event, live.detokenizer)
        outbox.append((event.request_id, StreamDelta(
            event.request_id, event.token_id, text, finished, reason if finished else None,
            live.prompt_tokens, live.completion_tokens, time.monotonic(), live.cached_tokens,
        )))  # fmt: skip
        if finished:
            self._retire(event.request_id, records, reason or "stop")

    def _end(self, request_id: str, reason: str, outbox: _Outbox, records: list[RequestRecord]) -> None:
        """Finish a request the engine did not end itself (abort) and close its stream."""
        live = self._live[request_id]
        self.core.finish(request_id, reason)
        outbox.append((request_id, StreamDelta(
            request_id, None, "", True, reason, live.prompt_tokens, live.completion_tokens, 0.0, live.cached_tokens,
        )))  # fmt: skip
        self._retire(request_id, records, reason)

    def _fail_all(self, error: BaseException, outbox: _Outbox, records: list[RequestRecord]) -> None:
        for request_id in set(self._live) | set(self.core.live_ids()):
            try:
                self.core.finish(request_id, "abort")
            except Exception:
                logger.exception("could not release %s", request_id)
                self.core.forget(request_id)
            outbox.append((request_id, error))
            self._retire(request_id, records, "error")

    def _retire(self, request_id: str, records: list[RequestRecord], reason: str) -> None:
        """Fold a finished request into the running totals; the core's record is dropped (a server runs
        forever)."""
        self._live.pop(request_id, None)
        record = self.core.pop_record(request_id)
        if record is None:
            return
        self._finished_count += 1
        self._finished_by_reason[reason] += 1
        self._finished_preemptions_swap += record.preemptions_swap
        self._finished_preemptions_recompute += record.preemptions_recompute
        if record.token_times and record.rate is not None:
            self._finished_rebuffer_s += rebuffer_seconds(record.token_times, record.rate)
        records.append(record)

    def _publish(self, outbox: _Outbox, records: list[RequestRecord]) -> None:
        self.core.trim_scheduler_times(_SCHEDULER_TIMES_KEPT)
        self._stats = self._snapshot()
        if not (outbox or records) or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, outbox, records)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _decode_capacity(self) -> float:
        measured = self.executor.decode_model.samples  # before any decode step the estimate is a guess
        return self.executor.estimates().decode_capacity_tok_s if measured else 0.0

    def _snapshot(self) -> EngineStats:
        live = self.core.stats()
        device_used, device_total, host_used, host_total = self.executor.page_usage()
        return EngineStats(
            running=live.running,
            waiting=live.waiting,
            paused=live.paused,
            device_pages_used=device_used,
            host_pages_used=host_used,
            device_pages_total=device_total,
            host_pages_total=host_total,
            preemptions_swap=self._finished_preemptions_swap + live.preemptions_swap,
            preemptions_recompute=self._finished_preemptions_recompute + live.preemptions_recompute,
            rebuffer_s=self._finished_rebuffer_s + live.rebuffer_s,
            finished_requests=self._finished_count,
            finished_by_reason=tuple(sorted(self._finished_by_reason.items())),
            prefix_cache_queries=self.core.prefix_cache.queries,
            prefix_cache_hits=self.core.prefix_cache.hits,
            prefix_cache_host_hits=self.core.prefix_cache.host_hits,
            decode_capacity_tok_s=self._decode_capacity(),
        )
