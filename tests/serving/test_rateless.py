"""Requests that state no rate over the real server: with `--default-rate none`, a request whose `stream_rate` is
absent or null is rate-less; one that sets it is a stream. /metrics counts them by class; bad values and flags
get clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
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
from tokenflow_jax.workloads import RateMix


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


def test_loadtest_rate_mix_sends_rateless_requests_and_reports_each_class(
    rateless_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serving.loadtest --rate-mix 20:0.5,none:0.5` leaves stream_rate out of the requests drawn "none": the server
    counts exactly those as rate-less, and the client's summary reports each class over its own requests."""
    from serving import loadtest

    url, n, k = rateless_server.base_url, 12, 5
    drawn = RateMix.parse("20:0.5,none:0.5").sample(np.random.default_rng(7), n)
    num_rateless = drawn.count(None)
    assert 0 < num_rateless < n  # the seed draws both classes
    before = metric_values(url)
    flags = ["--url", url, "--arrivals", "burst", "--num-requests", str(n), "--max-tokens", str(k), "--seed", "7",
             "--rate-mix", "20:0.5,none:0.5"]  # fmt: skip
    assert loadtest.main([*flags, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    after = wait_for_idle_pages(url)
    finished = 'tokenflow_requests_finished_by_class_total{{request_class="{}"}}'
    assert after[finished.format("rateless")] - before[finished.format("rateless")] == num_rateless
    assert after[finished.format("stream")] - before[finished.format("stream")] == n - num_rateless
    assert (summary["completed"], summary["errors"], summary["total_output_tokens"]) == (n, 0, n * k)
    assert (summary["stream_completed"], summary["rateless_completed"]) == (n - num_rateless, num_rateless)
    assert summary["stream_playback_s"] == pytest.approx((n - num_rateless) * k / 20)  # L / r over the streams
    # A rate-less request's end-to-end latency runs from its send to its last token, past its first.
    assert summary["p99_rateless_e2el_ms"] >= summary["median_rateless_e2el_ms"] > 0
    assert summary["median_stream_ttft_ms"] > 0
    assert loadtest.main([*flags, "--num-requests", "4"]) == 0  # the table shows both classes too
    out = capsys.readouterr().out
    assert "streams: " in out and "rate-less: " in out and "E2E p50" in out


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
