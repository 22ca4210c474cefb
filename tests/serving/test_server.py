"""The real `python -m serving` subprocess: OpenAI SDK and raw SSE streams, every bad input as a 400 error
object, disconnects freeing KV pages, 200 concurrent streams with random disconnects, clean SIGTERM exit."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from typing import Any

import aiohttp
import openai
import pytest

from tests.serving.conftest import (
    ServerProcess,
    assert_openai_error,
    http_request,
    metric_values,
    wait_for_idle_pages,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(autouse=True)
def idle_server_around_each_test(server: ServerProcess) -> None:
    """The module's tests share one server: each finds it idle (no request, no page held) and leaves it so."""
    wait_for_idle_pages(server.base_url)
    yield
    if server.proc.poll() is None:  # the SIGTERM test stops it
        wait_for_idle_pages(server.base_url)


def sdk(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def parse_sse(body: bytes) -> list[Any]:
    """SSE payloads in order; the final `[DONE]` is returned as the string."""
    events = body.decode().split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    out = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        payload = event[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_health_models_and_metrics(server: ServerProcess) -> None:
    assert http_request(server.base_url, "GET", "/health").json() == {"status": "ok"}
    models = http_request(server.base_url, "GET", "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert [m.id for m in sdk(server).models.list()] == ["tiny"]
    m = metric_values(server.base_url)
    for name in ("tokenflow_requests_running", "tokenflow_requests_waiting", "tokenflow_requests_paused",
                 'tokenflow_kv_pages_used{tier="device"}', 'tokenflow_kv_pages_used{tier="host"}',
                 'tokenflow_preemptions_total{mode="swap"}', 'tokenflow_preemptions_total{mode="recompute"}',
                 "tokenflow_rebuffer_seconds_total", "tokenflow_time_to_first_token_seconds_count",
                 "tokenflow_inter_token_latency_seconds_count"):  # fmt: skip
        assert name in m, name
    assert_openai_error(http_request(server.base_url, "GET", "/v1/nothing"), 404)
    assert_openai_error(http_request(server.base_url, "GET", COMPLETIONS), 405)


def test_openai_sdk_streams_completions(server: ServerProcess) -> None:
    client = sdk(server)
    whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert len(text_chunks) == whole.usage.completion_tokens  # one chunk per token
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.total_tokens == whole.usage.total_tokens
    assert whole.usage.prompt_tokens == len("Hello") + 1  # bytes + BOS
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_openai_sdk_streams_chat(server: ServerProcess) -> None:
    client = sdk(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, seed=3)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, seed=3,
                                            stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"


def test_prompt_tokens_served_from_the_prefix_cache_are_reported(server: ServerProcess) -> None:
    client = sdk(server)
    before = metric_values(server.base_url)
    prompt = "A long shared instruction that spans several pages of sixteen tokens. " * 2  # 141 tokens: 8 pages
    first = client.completions.create(model="tiny", prompt=prompt + "One", max_tokens=4, temperature=0)
    again = client.completions.create(model="tiny", prompt=prompt + "Two", max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 8 * 16
    chunks = list(client.completions.create(model="tiny", prompt=prompt + "Three", max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 8 * 16
    messages = [{"role": "system", "content": prompt}, {"role": "user", "content": "Hi"}]
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    assert chat.usage.prompt_tokens_details.cached_tokens >= 8 * 16
    after = metric_values(server.base_url)
    name = 'vllm:prefix_cache_{}_total{{model_name="tiny"}}'
    assert after[name.format("hits")] - before[name.format("hits")] >= 3 * 8 * 16
    assert after[name.format("queries")] - before[name.format("queries")] >= 5 * 141


def test_raw_sse_stream_and_stop_strings(server: ServerProcess) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}
            async with session.post(f"{server.base_url}{COMPLETIONS}", json=body) as resp:
                free_text = (await resp.json())["choices"][0]["text"]
            stop = free_text[4:6]
            body.update(stream=True, stop=[stop], stream_options={"include_usage": True})
            async with session.post(f"{server.base_url}{COMPLETIONS}", json=body) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                events = parse_sse(await resp.read())
        assert events[-1] == "[DONE]"
        usage = events[-2]["usage"]
        chunks = events[:-2]
        assert "".join(e["choices"][0]["text"] for e in chunks) == free_text[: free_text.find(stop)]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert usage["completion_tokens"] == len(chunks) < 16

    asyncio.run(run())


def test_stop_strings_in_non_streamed_and_chat_responses(server: ServerProcess) -> None:
    """A stop string cuts the text before it (the stop string itself is not returned) and finishes with "stop",
    in a non-streamed completion and in a chat completion, streamed and not."""
    client = sdk(server)
    free = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=16, temperature=0)
    free_text = free.choices[0].text
    stop = free_text[4:6]
    cut = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=16, temperature=0,
                                    stop=[stop, "never in the text"])  # fmt: skip
    assert cut.choices[0].text == free_text[: free_text.find(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < free.usage.completion_tokens

    # The tiny model's replies start with spaces; a seeded sampled one goes on to other characters.
    messages = [{"role": "user", "content": "Hi"}]
    chat = dict(model="tiny", messages=messages, max_tokens=24, temperature=0.8)
    for seed in range(1, 9):
        chat_text = client.chat.completions.create(**chat, seed=seed).choices[0].message.content
        if chat_text.strip():
            break
    chat_stop = chat_text.strip()[0]
    assert chat_text.find(chat_stop) > 0, chat_text  # the reply has text before the stop string
    whole = client.chat.completions.create(**chat, seed=seed, stop=chat_stop)
    chunks = list(client.chat.completions.create(**chat, seed=seed, stop=chat_stop, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert whole.choices[0].message.content == streamed == chat_text[: chat_text.find(chat_stop)]
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"


BAD_COMPLETIONS: list[tuple[Any, str | None]] = [
    ([1, 2], None),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [999_999]}, "prompt"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": "x" * 300}, "prompt"),
    ({"prompt": "x" * 255, "max_tokens": 1}, "prompt"),
    ({"prompt": "Hi", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": True}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": 254}, "max_tokens"),
    ({"prompt": "Hi", "temperature": -1}, "temperature"),
    ({"prompt": "Hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "Hi", "top_p": 0}, "top_p"),
    ({"prompt": "Hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "Hi", "seed": "x"}, "seed"),
    ({"prompt": "Hi", "stop": 5}, "stop"),
    ({"prompt": "Hi", "stop": ["a"] * 5}, "stop"),
    ({"prompt": "Hi", "stop": [""]}, "stop"),
    ({"prompt": "Hi", "n": 2}, "n"),
    ({"prompt": "Hi", "stream": "yes"}, "stream"),
    ({"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "Hi", "stream": True, "stream_options": {"include_usage": 1}}, "include_usage"),
    ({"prompt": "Hi", "stream_rate": 0}, "stream_rate"),
    ({"prompt": "Hi", "stream_rate": -5}, "stream_rate"),
    ({"prompt": "Hi", "stream_rate": 10_001}, "stream_rate"),
    ({"prompt": "Hi", "stream_rate": 1e9}, "stream_rate"),
    ({"prompt": "Hi", "stream_rate": "fast"}, "stream_rate"),
    ({"prompt": "Hi", "pace": "yes"}, "pace"),
    ({"prompt": "Hi", "foo": 1}, "foo"),
    ({"prompt": "Hi", "logprobs": 5}, "logprobs"),
    ({"prompt": "Hi", "messages": []}, "messages"),
]
BAD_CHATS: list[tuple[Any, str | None]] = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 300}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}, "prompt"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_rate": 20_000, "stream": True}, "stream_rate"),
]


def test_every_bad_input_is_a_400_error_object(server: ServerProcess) -> None:
    assert_openai_error(http_request(server.base_url, "POST", COMPLETIONS, raw=b"{bad"), 400)
    assert_openai_error(http_request(server.base_url, "POST", COMPLETIONS, raw=b"\xff\xfe"), 400)
    assert_openai_error(http_request(server.base_url, "POST", CHAT, raw=b""), 400)
    for path, cases in ((COMPLETIONS, BAD_COMPLETIONS), (CHAT, BAD_CHATS)):
        for body, param in cases:
            reply = http_request(server.base_url, "POST", path, body)
            assert_openai_error(reply, 400, param)
    reply = http_request(server.base_url, "POST", COMPLETIONS, {"model": "gpt-9", "prompt": "Hi"})
    assert assert_openai_error(reply, 404, "model")["code"] == "model_not_found"
    reply = http_request(server.base_url, "POST", COMPLETIONS, raw=b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    assert_openai_error(reply, 413)
    # None of that left anything behind.
    assert http_request(server.base_url, "GET", "/health").status == 200


def test_disconnect_mid_stream_frees_pages(server: ServerProcess) -> None:
    async def run() -> None:
        body = {"prompt": "y" * 60, "max_tokens": 190, "stream": True, "ignore_eos": True, "stream_rate": 5}
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"{server.base_url}{COMPLETIONS}", json=body)
            await resp.content.readuntil(b"\n\n")
            m = metric_values(server.base_url)
            assert m['tokenflow_kv_pages_used{tier="device"}'] > 0
            resp.close()  # drops the connection mid-stream

    aborted = 'tokenflow_requests_finished_by_reason_total{reason="abort"}'
    before = metric_values(server.base_url)[aborted]
    asyncio.run(run())
    m = wait_for_idle_pages(server.base_url)  # raises unless the disconnect ended the request
    assert m['tokenflow_kv_pages_used{tier="device"}'] == 0 and m['tokenflow_kv_pages_used{tier="host"}'] == 0
    assert m[aborted] == before + 1  # ended by the disconnect, not by running to its 190 tokens


async def one_stream(session: aiohttp.ClientSession, url: str, rng: random.Random, i: int) -> dict[str, Any]:
    chat = i % 3 == 0
    body: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": rng.randint(8, 16),
        "stream": True,
        "temperature": rng.choice([0.0, 0.8]),
        "seed": i,
        "stream_rate": rng.choice([10, 30, 100]),
    }
    if chat:
        body["messages"] = [{"role": "user", "content": f"request {i}: " + "ab" * rng.randint(1, 40)}]
    else:
        body["prompt"] = f"request {i}: " + "cd" * rng.randint(1, 40)
    disconnect = rng.random() < 0.2
    async with session.post(f"{url}{CHAT if chat else COMPLETIONS}", json=body) as resp:
        if resp.status != 200:
            return {"status": resp.status, "disconnect": disconnect, "body": await resp.text()}
        if disconnect:
            await resp.content.readuntil(b"\n\n")
            resp.close()
            return {"status": 200, "disconnect": True}
        events = parse_sse(await resp.read())
    finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
    return {"status": 200, "disconnect": False, "done": events[-1] == "[DONE]", "finish": finish[-1]}


def test_200_concurrent_streams_with_disconnects(server: ServerProcess) -> None:
    async def run() -> list[dict[str, Any]]:
        rng = random.Random(7)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=90)) as session:
            return await asyncio.gather(*(one_stream(session, server.base_url, rng, i) for i in range(200)))

    results = asyncio.run(run())
    assert [r for r in results if r["status"] != 200] == []
    completed = [r for r in results if not r["disconnect"]]
    assert 120 < len(completed) < 190
    assert all(r["done"] and r["finish"] in ("stop", "length") for r in completed)
    m = wait_for_idle_pages(server.base_url)
    assert m['tokenflow_kv_pages_used{tier="device"}'] == 0
    assert m['tokenflow_kv_pages_used{tier="host"}'] == 0
    assert m["tokenflow_requests_running"] == m["tokenflow_requests_waiting"] == 0
    assert not any(k.startswith("tokenflow_http_responses_total") and 'status="5' in k for k in m)
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_sigterm_mid_stream_exits_cleanly(server: ServerProcess) -> None:
    """Runs last in this module: it stops the module's server."""

    async def run() -> None:
        body = {"prompt": "Hello", "max_tokens": 200, "stream": True, "ignore_eos": True, "pace": True,
                "stream_rate": 20}  # fmt: skip
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.base_url}{COMPLETIONS}", json=body) as resp:
                await resp.content.readuntil(b"\n\n")
                server.proc.send_signal(signal.SIGTERM)
                rest = await resp.read()  # the stream ends (aborted) instead of hanging
        assert b"aborted" in rest  # the stream ends (10 s of paced tokens left) instead of running on

    asyncio.run(run())
    assert server.proc.wait(timeout=60) == 0
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert "shutting down" in log
    with pytest.raises(OSError):
        http_request(server.base_url, "GET", "/health", timeout=2)
