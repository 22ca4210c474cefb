"""`python -m serving --data-parallel-size 2` on the 4 CPU devices: two engine replicas behind one router, over
HTTP loopback. New requests go to the replica with the most spare decode capacity (`scheduler.routing`), and
everything a single engine does works behind the router."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.serving.conftest import (
    REPO_ROOT,
    STARTUP_TIMEOUT_S,
    ServerProcess,
    assert_openai_error,
    http_request,
    metric_values,
    start_server_process,
    stop_server_process,
    wait_for_idle_pages,
)

COMPLETIONS = "/v1/completions"
MAX_QUEUE = 6
LONG = 1000  # tokens of a request that outlives everything the test does meanwhile (~1000 decode steps)
ABORTED = 'tokenflow_requests_finished_by_reason_total{reason="abort"}'


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Long requests, few sequence slots: 8 step shapes to compile per replica (each replica compiles its own on CPU).
    srv = start_server_process(tmp_path_factory.mktemp("dp") / "server.log", "--data-parallel-size=2",
                               "--max-model-len=1024", "--max-num-seqs=4", "--max-batch-tokens=32",
                               f"--max-queue={MAX_QUEUE}", startup_timeout_s=2 * STARTUP_TIMEOUT_S)  # fmt: skip
    yield srv
    stop_server_process(srv)


def replica_values(m: dict[str, float], name: str) -> list[float]:
    return [m[f'tokenflow_replica_{name}{{replica="{i}"}}'] for i in range(2)]


def long_body(rate: float) -> dict[str, Any]:
    return {"prompt": "Once upon a time", "max_tokens": LONG, "stream": True, "ignore_eos": True, "stream_rate": rate}


async def open_streams(url: str, bodies: list[dict[str, Any]], session: aiohttp.ClientSession) -> list[Any]:
    """Start each streamed request in turn and read its first chunk (it is routed and running)."""
    responses = []
    for body in bodies:
        resp = await session.post(f"{url}{COMPLETIONS}", json=body)
        assert resp.status == 200, await resp.text()
        await resp.content.readuntil(b"\n\n")
        responses.append(resp)
    return responses


def test_too_few_devices_is_a_usage_error() -> None:
    cmd = [sys.executable, "-m", "serving", "--model", "tiny", "--data-parallel-size", "3",
           "--tensor-parallel-size", "2"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "data_parallel_size 3 x tensor_parallel_size 2 needs 6 devices, 4 available" in done.stderr
    assert "Traceback" not in done.stderr


def test_health_models_and_both_replicas_answer_alike(dp_server: ServerProcess) -> None:
    url = dp_server.base_url
    assert http_request(url, "GET", "/health").json() == {"status": "ok"}
    assert [m["id"] for m in http_request(url, "GET", "/v1/models").json()["data"]] == ["tiny"]
    before = replica_values(metric_values(url), "requests_routed_total")

    async def run(temperature: float) -> list[str]:
        body = {"prompt": "The same prompt", "max_tokens": 24, "temperature": temperature, "stream_rate": 20}
        async with aiohttp.ClientSession() as session:

            async def one() -> str:
                async with session.post(f"{url}{COMPLETIONS}", json=body) as resp:
                    assert resp.status == 200
                    return (await resp.json())["choices"][0]["text"]

            return await asyncio.gather(*(one() for _ in range(6)))

    texts = asyncio.run(run(0.0))
    m = wait_for_idle_pages(url)
    routed = [a - b for a, b in zip(replica_values(m, "requests_routed_total"), before, strict=True)]
    assert sum(routed) == 6 and min(routed) >= 1, routed  # equal streams spread over both replicas
    assert len(set(texts)) == 1, texts  # the same weights on both: greedy text is the same wherever it ran
    # Unseeded sampling draws differently wherever it runs: replicas do not repeat each other's default seeds.
    sampled = asyncio.run(run(1.0))
    assert len(set(sampled)) == len(sampled), sampled
    # The unlabelled series are the whole server: the replicas' series sum to them.
    assert sum(replica_values(m, "requests_finished_total")) == m["tokenflow_requests_finished_total"]


def test_a_fast_stream_leaves_its_replica_to_itself(dp_server: ServerProcess) -> None:
    """A 10,000 tok/s reader takes more than a replica decodes, so every 20 tok/s stream after it goes to the other
    replica, where round-robin (or the shorter queue) would send half of them to the fast stream's."""
    url = dp_server.base_url

    async def run() -> tuple[dict[str, float], dict[str, float]]:
        async with aiohttp.ClientSession() as session:
            before = metric_values(url)
            fast = await open_streams(url, [long_body(10_000)], session)
            light = {"prompt": "Hi", "max_tokens": 40, "stream": True, "stream_rate": 20}
            slow = await open_streams(url, [dict(light, seed=i) for i in range(4)], session)
            during = metric_values(url)  # the fast stream is still live: it was there for every routing
            for resp in fast + slow:
                resp.close()
        return before, during

    before, during = asyncio.run(run())
    routed = [a - b for a, b in zip(replica_values(during, "requests_routed_total"),
                                    replica_values(before, "requests_routed_total"), strict=True)]  # fmt: skip
    fast_replica = routed.index(1) if 1 in routed else None
    assert sorted(routed) == [1, 4], routed
    assert replica_values(during, "requests_unfinished")[fast_replica] == 1, "the fast stream ended too soon"
    assert replica_values(during, "stream_demand_tokens_per_second")[fast_replica] == 10_000
    wait_for_idle_pages(url)


def test_total_queue_full_is_503_and_disconnects_abort_on_their_replicas(dp_server: ServerProcess) -> None:
    url = dp_server.base_url
    aborted_before = metric_values(url)[ABORTED]

    async def run() -> tuple[dict[str, float], Any]:
        async with aiohttp.ClientSession() as session:
            streams = await open_streams(url, [dict(long_body(20), seed=i) for i in range(MAX_QUEUE)], session)
            m = metric_values(url)
            overflow = http_request(url, "POST", COMPLETIONS, {"prompt": "one more", "max_tokens": 4})
            for resp in streams:
                resp.close()  # drops each connection mid-stream
        return m, overflow

    m, overflow = asyncio.run(run())
    assert all(n >= 1 for n in replica_values(m, "requests_unfinished")), m  # both replicas hold some
    assert m["tokenflow_requests_unfinished"] == MAX_QUEUE
    assert_openai_error(overflow, 503)
    assert overflow.headers["retry-after"] == "1"
    idle = wait_for_idle_pages(url)  # raises unless every disconnect freed its replica's pages on both tiers
    assert idle[ABORTED] == aborted_before + MAX_QUEUE
    for tier in ("device", "host"):
        assert [idle[f'tokenflow_replica_kv_pages_used{{replica="{i}",tier="{tier}"}}'] for i in range(2)] == [0, 0]


def test_sigterm_stops_every_replica(dp_server: ServerProcess) -> None:
    """Runs last in this module: it stops the module's server."""
    url = dp_server.base_url

    async def run() -> list[bytes]:
        async with aiohttp.ClientSession() as session:
            streams = await open_streams(url, [dict(long_body(20), seed=i) for i in range(4)], session)
            m = metric_values(url)
            assert all(n >= 1 for n in replica_values(m, "requests_unfinished")), m
            dp_server.proc.send_signal(signal.SIGTERM)
            return [await resp.read() for resp in streams]  # every stream ends instead of hanging

    rests = asyncio.run(run())
    assert all(b"aborted" in rest for rest in rests)  # each ends, aborted, instead of running its 1000 tokens
    assert dp_server.proc.wait(timeout=60) == 0
    log = dp_server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert "shutting down" in log and "replica 1 of 2" in log
