"""A short load run against a running server, measured through HTTP as a client sees it.

    python -m serving.loadtest --url http://127.0.0.1:8000 --num-requests 200 --concurrency 32

Each client streams one completion at a time (`--concurrency` clients in parallel); every SSE chunk is one
token and its arrival time is that token's time. The figures come from `tokenflow_jax.metrics.summarize`
over those client-side timings (so TTFT includes HTTP and queueing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from tokenflow_jax.metrics import RequestRecord, summarize


async def stream_one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], request_id: str, rate: float
) -> tuple[RequestRecord, str | None]:
    """One streamed completion -> (client-side record, error or None)."""
    arrival = time.monotonic()
    record = RequestRecord(request_id=request_id, arrival=arrival, rate=rate, prompt_len=0)
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                return record, f"HTTP {resp.status}: {(await resp.text())[:200]}"
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[len(b"data: ") :])
                if "error" in event:
                    return record, event["error"]["message"]
                if event.get("usage"):
                    record.prompt_len = event["usage"]["prompt_tokens"]
                if event["choices"]:
                    record.token_times.append(time.monotonic())
    except aiohttp.ClientError as e:
        return record, f"{type(e).__name__}: {e}"
    return record, None


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.num_requests):
        queue.put_nowait(i)
    records: list[RequestRecord] = []
    errors: list[str] = []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            words = " ".join(
                rng.choice(("stream", "token", "buffer", "burst", "page")) for _ in range(args.prompt_words)
            )
            body = {"model": args.model, "prompt": f"{i}: {words}", "max_tokens": args.max_tokens, "stream": True,
                    "temperature": 0.0, "ignore_eos": True, "stream_rate": args.stream_rate,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            record, error = await stream_one(session, args.url, body, f"load-{i}", args.stream_rate)
            records.append(record)
            if error:
                errors.append(error)

    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        start = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(args.concurrency)))
        wall = time.monotonic() - start
    result = summarize(records)
    result.update(wall_s=wall, errors=len(errors), error_examples=errors[:3])
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.loadtest", description="Streaming load run over HTTP.")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="tiny")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=8)
    p.add_argument("--stream-rate", type=float, default=20.0, help="tokens/s each client reads")
    p.add_argument("--api-key")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        print("error: --num-requests, --concurrency and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    result = asyncio.run(run_load(args))
    if args.json:
        per_request = {"request_ids", "ttfts", "itls", "rebuffer_per_request_s", "qoes"}
        print(json.dumps({k: v for k, v in result.items() if k not in per_request}, indent=2))
    else:
        print(f"requests: {result['completed']} completed, {result['errors']} errors in {result['wall_s']:.2f} s")
        print(f"requests/s: {result['completed'] / result['wall_s']:.2f}")
        print(f"output tokens/s: {result['total_output_tokens'] / result['wall_s']:.1f}")
        print(f"TTFT p50: {result['median_ttft_ms']:.1f} ms   p99: {result['p99_ttft_ms']:.1f} ms")
        print(f"ITL mean: {result['mean_itl_ms']:.2f} ms   p99: {result['p99_itl_ms']:.2f} ms")
        print(
            f"rebuffer total: {result['rebuffer_s']:.2f} s   effective tokens/s: {result['effective_throughput']:.1f}"
        )
        for example in result["error_examples"]:
            print(f"error: {example}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
