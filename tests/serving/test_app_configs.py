"""Apps with different configs on one in-process engine: API key (401), queue limit (503 + Retry-After),
paced streams, and the per-app metrics registry."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest

from tests.serving.conftest import (
    InProcessApps,
    assert_openai_error,
    http_request,
    metric_values,
    wait_for_idle_pages,
)

PROMPT = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}


@pytest.fixture(autouse=True)
def idle_engine_around_each_test(apps: InProcessApps) -> None:
    """The module's apps share one engine: each test finds it idle and leaves it so."""
    apps.wait_for_idle()
    yield
    apps.wait_for_idle()


def test_api_key_is_required_on_v1_only(apps: InProcessApps) -> None:
    url = apps.serve(api_key="s3cret")
    assert_openai_error(http_request(url, "POST", "/v1/completions", PROMPT), 401)
    reply = http_request(url, "POST", "/v1/completions", PROMPT, headers={"Authorization": "Bearer wrong"})
    assert assert_openai_error(reply, 401)["code"] == "invalid_api_key"
    assert reply.headers["www-authenticate"] == "Bearer"
    assert_openai_error(http_request(url, "GET", "/v1/models", headers={"Authorization": "s3cret"}), 401)
    assert http_request(url, "GET", "/health").status == 200
    assert http_request(url, "GET", "/metrics").status == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_full_queue_answers_503_with_retry_after(apps: InProcessApps) -> None:
    url = apps.serve(max_queue=1, retry_after_s=2)

    async def run() -> None:
        long = {"prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/completions", json=long) as first:
                await first.content.readuntil(b"\n\n")  # admitted and generating
                async with session.post(f"{url}/v1/completions", json=PROMPT) as second:
                    assert second.status == 503
                    assert second.headers["Retry-After"] == "2"
                    error = (await second.json())["error"]
                    assert error["type"] == "server_error" and error["code"] == "server_overloaded"
                first.close()

    asyncio.run(run())
    wait_for_idle_pages(url)
    assert http_request(url, "POST", "/v1/completions", PROMPT).status == 200  # room again


def test_pace_releases_tokens_at_the_stream_rate(apps: InProcessApps) -> None:
    url = apps.serve()

    async def arrival_times(pace: bool, rate: float) -> list[float]:
        body = {"prompt": "Hello", "max_tokens": 8, "stream": True, "stream_rate": rate, "pace": pace}
        times = []
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        times.append(time.monotonic())
        return times

    paced = asyncio.run(arrival_times(True, 40))
    assert len(paced) == 8
    assert paced[-1] - paced[0] >= 7 / 40 * 0.95  # one token every 1/40 s: a load can only stretch it
    # Unpaced, a 0.1 tok/s reader's tokens come as generated, not 70 s apart: a bound against pacing (8 steps of
    # the tiny model take a small fraction of it however loaded the machine), not a speed target.
    unpaced = asyncio.run(arrival_times(False, 0.1))
    assert len(unpaced) == 8 and unpaced[-1] - unpaced[0] < 7 / 0.1 * 0.95


def test_each_app_has_its_own_metrics_registry(apps: InProcessApps) -> None:
    a, b = apps.serve(), apps.serve()
    http_request(a, "POST", "/v1/completions", PROMPT)
    text_b = http_request(b, "GET", "/metrics").body.decode()
    assert 'tokenflow_http_responses_total{route="/v1/completions",status="200"}' not in text_b
    text_a = http_request(a, "GET", "/metrics").body.decode()
    assert 'tokenflow_http_responses_total{route="/v1/completions",status="200"} 1.0' in text_a


def test_a_client_that_stops_reading_does_not_slow_others(apps: InProcessApps) -> None:
    url = apps.serve()

    async def run() -> None:
        stalled = {"prompt": "z" * 40, "max_tokens": 200, "ignore_eos": True, "stream": True}
        quick = {"prompt": "Hello", "max_tokens": 8, "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/completions", json=stalled) as slow:
                await slow.content.readuntil(b"\n\n")  # then never reads again while the others run

                async def one() -> bytes:
                    async with session.post(f"{url}/v1/completions", json=quick) as resp:
                        assert resp.status == 200
                        return await resp.read()

                # Were a stalled socket to block the engine, these would never finish: the deadline fails the
                # test rather than hang it (it times nothing).
                bodies = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(8))), timeout=120)
                assert all(body.endswith(b"data: [DONE]\n\n") for body in bodies)
                slow.close()

    asyncio.run(run())
    wait_for_idle_pages(url)


def test_loadtest_script_runs_against_a_server(apps: InProcessApps, capsys: pytest.CaptureFixture[str]) -> None:
    from serving import loadtest

    url = apps.serve()
    assert loadtest.main(["--url", url, "--num-requests", "12", "--concurrency", "4", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "requests: 12 completed, 0 errors" in out and "TTFT p50" in out


def test_metrics_match_a_known_workload(apps: InProcessApps) -> None:
    """After N requests of k tokens each (ignore_eos), /metrics says exactly that: N finished by length, N first
    tokens, N (k - 1) inter-token gaps, nothing left on either KV tier."""
    url = apps.serve()
    n, k = 5, 6
    length = 'tokenflow_requests_finished_by_reason_total{reason="length"}'
    before = metric_values(url)
    for i in range(n):
        body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": k, "ignore_eos": True, "stream": i % 2 == 0}
        assert http_request(url, "POST", "/v1/completions", body).status == 200
    after = wait_for_idle_pages(url)
    assert after[length] - before[length] == n
    assert after["tokenflow_requests_finished_total"] - before["tokenflow_requests_finished_total"] == n
    assert (
        after["tokenflow_time_to_first_token_seconds_count"] - before["tokenflow_time_to_first_token_seconds_count"]
        == n
    )
    itl = "tokenflow_inter_token_latency_seconds_count"
    assert after[itl] - before[itl] == n * (k - 1)
    assert after['tokenflow_kv_pages_used{tier="device"}'] == 0 and after['tokenflow_kv_pages_used{tier="host"}'] == 0
