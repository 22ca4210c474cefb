"""Data-parallel replicas when one engine thread dies (in-process server on two CPU devices, over HTTP loopback):
the requests on that replica end with the error, the other replica keeps serving every new request, and /health
and /metrics name the replica that is down; once both are down the server answers 503 with why."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import jax
import pytest

from tests.serving.conftest import ENGINE_SIZES, assert_openai_error, http_request, metric_values, scheduler_name

COMPLETIONS = "/v1/completions"
UP = 'tokenflow_replica_up{{replica="{}"}}'
ROUTED = 'tokenflow_replica_requests_routed_total{{replica="{}"}}'


class ReplicaServer:
    """Two engines, one per CPU device, behind one in-process server on a background loop."""

    def __init__(self) -> None:
        from serving.app import create_app, start_server
        from serving.config import ServerConfig
        from tokenflow_jax import LLM
        from tokenflow_jax.engine.async_engine import AsyncEngine
        from tokenflow_jax.engine.replicas import EngineReplicas

        self.llms = [LLM("tiny", scheduler=scheduler_name(), devices=[d], warmup=False, **ENGINE_SIZES)
                     for d in jax.devices()[:2]]  # fmt: skip
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-replicas-loop", daemon=True)
        self.thread.start()
        self.engine = EngineReplicas([AsyncEngine(llm) for llm in self.llms])
        self.run(self.engine.start())
        app = create_app(self.engine, ServerConfig(model_name="tiny"))
        self.runner, port = self.run(start_server(app, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{port}"

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        from serving.app import stop_server

        self.run(stop_server(self.runner, self.engine))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        for llm in self.llms:
            llm.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ReplicaServer]:
    srv = ReplicaServer()
    yield srv
    srv.close()


def break_engine(server: ReplicaServer, i: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make replica i's engine thread fail where no step catches it: its loop's next look for work raises."""

    def lost() -> bool:
        raise RuntimeError(f"device {i} lost")

    monkeypatch.setattr(server.engine.replicas[i].core, "has_work", lost)


async def stream_until_error(url: str, server: ReplicaServer, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """Open a long stream, break the replica that holds it once its first chunk is in; return that replica and the
    stream's last event."""
    body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True, "stream_rate": 20}
    async with aiohttp.ClientSession() as session, session.post(f"{url}{COMPLETIONS}", json=body) as resp:
        assert resp.status == 200
        first = json.loads((await resp.content.readuntil(b"\n\n")).decode().removeprefix("data: "))
        holder = [i for i, e in enumerate(server.engine.replicas) if e.holds(first["id"])]
        assert len(holder) == 1, holder
        break_engine(server, holder[0], monkeypatch)
        events = (await asyncio.wait_for(resp.read(), 120)).decode().strip().split("\n\n")
    return holder[0], events[-2] if events[-1] == "data: [DONE]" else events[-1]


def complete(url: str, n: int) -> list[Any]:
    return [http_request(url, "POST", COMPLETIONS, {"prompt": f"Hi {k}", "max_tokens": 6, "ignore_eos": True})
            for k in range(n)]  # fmt: skip


def test_a_dead_replica_fails_its_own_requests_and_the_other_serves(
    server: ReplicaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.url
    assert http_request(url, "GET", "/health").json() == {"status": "ok"}
    assert [metric_values(url)[UP.format(i)] for i in range(2)] == [1, 1]

    dead, last = asyncio.run(stream_until_error(url, server, monkeypatch))
    live = 1 - dead
    error = json.loads(last.removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and f"device {dead} lost" in error["message"], error

    health = http_request(url, "GET", "/health")
    assert health.status == 200
    body = health.json()
    assert body["status"] == "degraded" and body["replicas"] == 2 and body["replicas_running"] == 1, body
    assert [f["replica"] for f in body["failed"]] == [dead] and f"device {dead} lost" in body["failed"][0]["error"]

    before = metric_values(url)
    replies = complete(url, 4)
    assert [r.status for r in replies] == [200] * 4, [r.body[:200] for r in replies]
    assert all(r.json()["usage"]["completion_tokens"] == 6 for r in replies)
    after = metric_values(url)
    assert after[UP.format(dead)] == 0 and after[UP.format(live)] == 1
    assert after[ROUTED.format(live)] - before[ROUTED.format(live)] == 4
    assert after[ROUTED.format(dead)] == before[ROUTED.format(dead)]

    # The last replica down too: nothing serves, and the server says why.
    break_engine(server, live, monkeypatch)
    dying = http_request(url, "POST", COMPLETIONS, {"prompt": "Hi", "max_tokens": 4})
    assert_openai_error(dying, 500)
    assert f"device {live} lost" in dying.json()["error"]["message"]
    health = http_request(url, "GET", "/health")
    assert health.status == 503
    assert health.json()["status"] == "failed" and len(health.json()["errors"]) == 2, health.json()
    assert_openai_error(http_request(url, "POST", COMPLETIONS, {"prompt": "Hi", "max_tokens": 4}), 503)
