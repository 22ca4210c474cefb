"""AsyncEngine: the engine thread streams the same tokens as LLM.generate, aborts free both tiers at once,
bad requests raise to the caller without killing the thread, and the thread idles without work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tokenflow_jax import LLM, SamplingParams
from tokenflow_jax.engine.async_engine import AsyncEngine, EngineError, EngineStopped, StreamDelta

PROMPTS = ["Hello", "The quick brown fox", "abc", "naïve café — 日本語 ok", "x" * 40]


@pytest.fixture(scope="module")
def llm() -> LLM:
    llm = LLM("tiny", scheduler="fcfs", max_num_seqs=16, max_model_len=256, max_batch_tokens=64)
    yield llm
    llm.close()


@pytest.fixture(autouse=True)
def clean_shared_engine(llm: LLM) -> None:
    """The module's tests share one LLM: each finds and leaves no request and no page held."""

    def check(when: str) -> None:
        assert not llm.core.requests and not llm.core.live_ids(), f"{when} the test: requests left"
        assert llm.executor.page_usage()[::2] == (0, 0), f"{when} the test: pages held"

    check("before")
    yield
    check("after")


def run_with_engine(llm: LLM, body: Callable[[AsyncEngine], Awaitable[None]]) -> None:
    async def main() -> None:
        engine = AsyncEngine(llm)
        await engine.start()
        try:
            await body(engine)
        finally:
            await engine.shutdown()

    asyncio.run(main())


async def collect(stream) -> tuple[list[int], str, StreamDelta]:
    tokens, text, last = [], "", None
    async for delta in stream:
        if delta.token_id is not None:
            tokens.append(delta.token_id)
        text += delta.text
        last = delta
    return tokens, text, last


def test_concurrent_streams_match_generate(llm: LLM) -> None:
    sampling = SamplingParams(max_tokens=12)
    expected = llm.generate(PROMPTS, sampling)

    async def body(engine: AsyncEngine) -> None:
        results = await asyncio.gather(*(collect(engine.submit(p, sampling)) for p in PROMPTS))
        for (tokens, text, last), out in zip(results, expected, strict=True):
            assert tokens == out.token_ids
            assert text == out.text
            assert last.finished and last.finish_reason == out.finish_reason
            assert last.prompt_tokens == len(out.prompt_token_ids)
            assert last.completion_tokens == len(out.token_ids)
        stats = engine.stats()
        assert stats.running == stats.waiting == stats.paused == 0
        assert stats.device_pages_used == 0 and stats.host_pages_used == 0
        assert stats.finished_requests == len(PROMPTS)

    run_with_engine(llm, body)


def test_stop_string_finishes_with_stop(llm: LLM) -> None:
    free = llm.generate(["Hello"], SamplingParams(max_tokens=12))[0].text
    stop = free[3:5]  # a stop string the greedy text is known to contain
    expected = llm.generate(["Hello"], SamplingParams(max_tokens=12, stop=(stop,)))[0]

    async def body(engine: AsyncEngine) -> None:
        tokens, text, last = await collect(engine.submit("Hello", SamplingParams(max_tokens=12, stop=(stop,))))
        assert text == expected.text == free[: free.find(stop)]
        assert last.finish_reason == "stop"
        assert len(tokens) < 12
        assert engine.stats().device_pages_used == 0

    run_with_engine(llm, body)


def test_abort_mid_stream_frees_both_tiers(llm: LLM) -> None:
    blocks = llm.executor.blocks

    async def body(engine: AsyncEngine) -> None:
        stream = engine.submit("y" * 60, SamplingParams(max_tokens=180, ignore_eos=True))
        other = engine.submit("Hello", SamplingParams(max_tokens=180, ignore_eos=True))
        seen, last = 0, None
        async for delta in stream:
            seen, last = seen + 1, delta
            if seen == 3:
                stats = engine.stats()
                assert stats.device_pages_used > 0 and stats.host_pages_used > 0  # write-through ran
                engine.abort(stream.request_id)
                other.abort()
        assert last.finish_reason == "abort" and last.token_id is None
        assert seen < 180
        _, _, last = await collect(other)
        assert last.finish_reason == "abort"
        # The closing delta is sent after the engine thread released the pages.
        assert blocks.device.num_used == 0
        assert blocks.host.num_used == 0
        assert engine.num_unfinished == 0

    run_with_engine(llm, body)


def test_validation_errors_reach_the_caller_and_the_thread_survives(llm: LLM) -> None:
    async def body(engine: AsyncEngine) -> None:
        with pytest.raises(ValueError, match="empty"):
            engine.submit([], SamplingParams())
        with pytest.raises(ValueError, match="rate"):
            engine.submit("Hi", SamplingParams(), rate=0)
        with pytest.raises(ValueError, match="model length"):
            await collect(engine.submit("z" * 300, SamplingParams(max_tokens=4)))
        with pytest.raises(ValueError, match="model length"):
            await collect(engine.submit("z" * 20, SamplingParams(max_tokens=250)))
        stream = engine.submit("Hi", SamplingParams(max_tokens=4), request_id="dup")
        with pytest.raises(ValueError, match="duplicate"):
            engine.submit("Hi", SamplingParams(max_tokens=4), request_id="dup")
        tokens, _, last = await collect(stream)
        assert len(tokens) == last.completion_tokens >= 1
        assert engine.num_unfinished == 0

    run_with_engine(llm, body)


def test_engine_thread_idles_without_work(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = []
    step = llm.core.step
    monkeypatch.setattr(llm.core, "step", lambda: steps.append(1) or step())

    async def body(engine: AsyncEngine) -> None:
        await collect(engine.submit("Hi", SamplingParams(max_tokens=2)))
        assert steps
        deadline = asyncio.get_running_loop().time() + 60
        while llm.core.has_work():  # a last step may still drain; a deadline against a hang, not a timing
            assert asyncio.get_running_loop().time() < deadline, "the engine never ran out of work"
            await asyncio.sleep(0.01)
        before = len(steps)
        await asyncio.sleep(0.3)
        assert len(steps) == before  # no step (and no spinning) without work
        assert engine._thread is not None and engine._thread.is_alive()
        await collect(engine.submit("Hi", SamplingParams(max_tokens=2)))  # and it wakes up again
        assert len(steps) > before

    run_with_engine(llm, body)


def test_shutdown_aborts_in_flight_and_refuses_new_requests(llm: LLM) -> None:
    async def main() -> None:
        engine = AsyncEngine(llm)
        await engine.start()
        stream = engine.submit("Hello", SamplingParams(max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        await engine.shutdown()
        _, _, last = await collect(stream)
        assert last.finish_reason == "abort"
        assert llm.executor.blocks.device.num_used == 0
        with pytest.raises(EngineStopped):
            engine.submit("Hello", SamplingParams())

    asyncio.run(main())


def test_a_failing_step_fails_its_requests_but_not_the_engine(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    step = llm.core.step
    failures = [RuntimeError("device fell over")]

    def flaky_step():
        if failures:
            raise failures.pop()
        return step()

    monkeypatch.setattr(llm.core, "step", flaky_step)

    async def body(engine: AsyncEngine) -> None:
        with pytest.raises(EngineError, match="device fell over"):
            await collect(engine.submit("Hello", SamplingParams(max_tokens=4)))
        assert llm.executor.blocks.device.num_used == 0 and not llm.core.requests
        tokens, _, last = await collect(engine.submit("Hello", SamplingParams(max_tokens=4)))
        assert len(tokens) == 4 and last.finish_reason == "length"

    run_with_engine(llm, body)
