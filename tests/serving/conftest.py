"""Servers for the serving tests, all on the tiny model with small sizes.

`server`: the real `python -m serving` in a subprocess (stderr kept, to check for tracebacks), one per module.
`apps`: one in-process AsyncEngine on a background event loop that serves apps with different configs
(API key, queue limit) on free ports, so each config costs no extra model load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_SIZES = {"max_num_seqs": 16, "max_model_len": 256, "max_batch_tokens": 64}
STARTUP_TIMEOUT_S = 240  # a cold JAX compilation cache compiles every bucket first


def scheduler_name() -> str:
    # The TokenFlow policy may not have landed yet; the server's default needs it.
    return "tokenflow" if importlib.util.find_spec("tokenflow_jax.scheduler.tokenflow") else "fcfs"


@dataclasses.dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()


def start_server_process(log_path: Path, *extra: str, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> ServerProcess:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_SIZES.items()]
    cmd = [sys.executable, "-m", "serving", "--model", "tiny", "--port", "0", "--scheduler", scheduler_name(),
           *flags, *extra]  # fmt: skip
    log = open(log_path, "w")  # noqa: SIM115 - the child owns it for its lifetime
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    log.close()
    deadline = time.monotonic() + startup_timeout_s
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("serving "):
                return ServerProcess(proc, int(line.rsplit(":", 1)[1]), log_path)
    proc.kill()
    raise RuntimeError(f"server did not start (last line {line!r}):\n{log_path.read_text()[-3000:]}")


def stop_server_process(server: ServerProcess) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server_process(tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    stop_server_process(srv)


class InProcessApps:
    """An AsyncEngine on a background loop; `serve(**config)` starts another app on it and returns its URL."""

    def __init__(self) -> None:
        from tokenflow_jax import LLM
        from tokenflow_jax.engine.async_engine import AsyncEngine

        self.llm = LLM("tiny", scheduler=scheduler_name(), **ENGINE_SIZES)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.engine = AsyncEngine(self.llm)
        self.run(self.engine.start())
        self.runners: list[Any] = []

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, **config: Any) -> str:
        from serving.app import create_app, start_server
        from serving.config import ServerConfig

        async def start() -> tuple[Any, int]:
            return await start_server(create_app(self.engine, ServerConfig(model_name="tiny", **config)),
                                      "127.0.0.1", 0)  # fmt: skip

        runner, port = self.run(start())
        self.runners.append(runner)
        return f"http://127.0.0.1:{port}"

    def wait_for_idle(self, timeout: float = 60.0) -> None:
        """Poll until the shared engine holds no request and no page; fail if that never comes."""
        deadline = time.monotonic() + timeout
        while self.engine.num_unfinished or self.llm.executor.page_usage()[::2] != (0, 0):
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine did not go idle within {timeout} s: {self.engine.stats()}")
            time.sleep(0.05)

    def close(self) -> None:
        for runner in self.runners:
            self.run(runner.cleanup())
        self.run(self.engine.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.llm.close()


@pytest.fixture(scope="module")
def apps() -> Iterator[InProcessApps]:
    servers = InProcessApps()
    yield servers
    servers.wait_for_idle()
    servers.close()


# ---- a small blocking HTTP client for status-code checks
@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(base_url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                 raw: bytes | None = None, timeout: float = 30) -> Reply:  # fmt: skip
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def assert_openai_error(reply: Reply, status: int, param: str | None = None) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body[:300])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert error["param"] == param, error
    return error


def metric_values(base_url: str) -> dict[str, float]:
    """`name{labels}` -> value from /metrics."""
    text = http_request(base_url, "GET", "/metrics").body.decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def wait_for_idle_pages(base_url: str, timeout: float = 60.0) -> dict[str, float]:
    """Poll /metrics until no request is unfinished and both KV tiers are empty; fail if that never comes (the
    deadline is generous: it guards against a leak, it does not time anything)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metric_values(base_url)
        idle = (m['tokenflow_kv_pages_used{tier="device"}'] == 0 and m['tokenflow_kv_pages_used{tier="host"}'] == 0
                and m["tokenflow_requests_unfinished"] == 0)  # fmt: skip
        if idle:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not go idle within {timeout} s: {m}")
        time.sleep(0.05)


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # the openai SDK must not route localhost via a proxy
