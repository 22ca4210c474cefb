"""Requests that state no rate over the real server: with `--default-rate none`, a request whose `stream_rate` is
absent or null is rate-less; one that sets it is a stream. /metrics counts them by class; bad values and flags
get clear errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest

from tests.serving.conftest import (
    REPO_ROOT,
    ServerProcess,
    assert_openai_error,
    http_request,
    metric_values,
    start_server_process,
    stop_server_process,
    wait_for_idle_pages,
)


@pytest.fixture(scope="module")
def rateless_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server_process(tmp_path_factory.mktemp("server") / "server.log", "--default-rate", "none",
                               "--max-hold-s", "5")  # fmt: skip
    yield srv
    assert stop_server_process(srv) == 0
    assert "Traceback" not in srv.log()


def test_absent_null_and_stated_rates_are_served_and_counted_by_class(rateless_server: ServerProcess) -> None:
    url = rateless_server.base_url
    before = metric_values(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    extras = [{}, {"stream_rate": 20}]  # absent: rate-less; 20: a stream
    outs = [client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True, **extra}) for extra in extras]  # fmt: skip
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "stream_rate": None}  # null, written out: rate-less  # fmt: skip
    null = http_request(url, "POST", "/v1/completions", body)
    assert null.status == 200, null.body[:300]
    assert [o.usage.completion_tokens for o in outs] == [6, 6] and null.json()["usage"]["completion_tokens"] == 6
    assert outs[0].choices[0].text == outs[1].choices[0].text == null.json()["choices"][0]["text"]  # greedy
    after = wait_for_idle_pages(url)

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew('tokenflow_requests_finished_by_class_total{request_class="rateless"}') == 2
    assert grew('tokenflow_requests_finished_by_class_total{request_class="stream"}') == 1
    assert grew('tokenflow_generation_tokens_total{request_class="rateless"}') == 12
    assert grew('tokenflow_e2e_request_latency_seconds_count{request_class="rateless"}') == 2
    assert grew('tokenflow_e2e_request_latency_seconds_count{request_class="stream"}') == 1


@pytest.mark.parametrize("rate", [-5, 0, "fast", "20", True, [20]])
def test_a_bad_stream_rate_is_refused_naming_it(rateless_server: ServerProcess, rate: object) -> None:
    reply = http_request(rateless_server.base_url, "POST", "/v1/completions", {"prompt": "Hi", "stream_rate": rate})
    assert_openai_error(reply, 400, "stream_rate")


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--default-rate", "fast", "expected tokens/s or 'none'"),
    ("--default-rate", "-3", "--default-rate must be a positive number"),
    ("--max-hold-s", "0", "max_hold_s must be > 0"),
    ("--max-hold-s", "inf", "max_hold_s must be a finite number"),
])  # fmt: skip
def test_bad_rate_flags_are_refused_in_one_line(flag: str, value: str, says: str) -> None:
    result = subprocess.run([sys.executable, "-m", "serving", "--model", "tiny", "--port", "0", flag, value],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert says in result.stderr
