"""A load run against a running server, measured through HTTP as a client sees it.

    python -m serving.loadtest --url http://127.0.0.1:8000 --num-requests 200 --concurrency 32
    python -m serving.loadtest --arrivals burst --num-requests 96 --max-tokens 96 [--contention 2] [--pace]
    python -m serving.loadtest --arrivals burst --rate-mix 20:0.5,none:0.5   # a server run with --default-rate none

Closed loop (`--arrivals closed`, the default): `--concurrency` clients each stream one completion at a time.
Open loop: every request is sent at its own arrival time, whatever the server does: all at t = 0 (`burst`),
or Poisson / gamma arrivals at `--request-rate` (`--burstiness` as vLLM's). Every SSE chunk that carries a
choice is one token and its arrival time at the client is that token's time; each reader starts at its
first chunk and reads `--stream-rate` tokens/s. The figures come from `tokenflow_jax.metrics.summarize` over
those client-side timings (so TTFT includes HTTP and queueing), the same fields the bench reports.

`--rate-mix` draws each request's rate from a mix (the bench's syntax, `tokenflow_jax.workloads.RateMix`); a
request drawn "none" omits `stream_rate`, so it is rate-less on a server run with `--default-rate none` (an agent
or a batch job: its reader takes each token as it comes), and the summary adds the streams' figures (TTFT,
rebuffer) and the rate-less requests' (end-to-end latency) apart.

`--contention N` runs N CPU-bound processes for the whole run, as a noisy neighbour on a shared host would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import random
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
import numpy as np

from tokenflow_jax import workloads
from tokenflow_jax.metrics import RequestRecord, summarize

ARRIVALS = ("closed", "burst", "poisson", "gamma")
WORDS = ("stream", "token", "buffer", "burst", "page")


async def stream_one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], request_id: str, rate: float | None
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


def request_body(args: argparse.Namespace, i: int, rng: random.Random, rate: float | None) -> dict[str, Any]:
    """Request i; `rate` None leaves `stream_rate` out (rate-less where the server's default rate is none)."""
    words = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
    body = {"model": args.model, "prompt": f"{i}: {words}", "max_tokens": args.max_tokens, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if rate is not None:
        body["stream_rate"] = rate
    if args.pace:
        body["pace"] = True
    return body


def request_rates(args: argparse.Namespace) -> list[float | None]:
    """Each request's rate: `--stream-rate` for all, or drawn from `--rate-mix` with `--seed`."""
    if args.rate_mix is None:
        return [args.stream_rate] * args.num_requests
    return workloads.RateMix.parse(args.rate_mix).sample(np.random.default_rng(args.seed), args.num_requests)


def arrival_times(args: argparse.Namespace) -> list[float]:
    """Seconds after the start at which each request of an open-loop run is sent."""
    if args.arrivals == "burst":
        return [0.0] * args.num_requests
    burstiness = 1.0 if args.arrivals == "poisson" else args.burstiness
    specs = workloads.gamma(args.num_requests, args.request_rate, burstiness, seed=args.seed)
    return [s.arrival for s in specs]


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    rng, rates = random.Random(args.seed), request_rates(args)
    bodies = [request_body(args, i, rng, rates[i]) for i in range(args.num_requests)]
    records: list[RequestRecord] = []
    errors: list[str] = []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def send(session: aiohttp.ClientSession, i: int) -> None:
        record, error = await stream_one(session, args.url, bodies[i], f"load-{i}", rates[i])
        records.append(record)
        if error:
            errors.append(error)

    timeout = aiohttp.ClientTimeout(total=args.timeout)
    open_loop = args.arrivals != "closed"
    connector = aiohttp.TCPConnector(limit=args.num_requests if open_loop else args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        start = time.monotonic()
        if open_loop:

            async def send_at(i: int, at: float) -> None:
                await asyncio.sleep(max(0.0, start + at - time.monotonic()))
                await send(session, i)

            await asyncio.gather(*(send_at(i, at) for i, at in enumerate(arrival_times(args))))
        else:
            queue = list(range(args.num_requests))[::-1]

            async def client() -> None:
                while queue:
                    await send(session, queue.pop())

            await asyncio.gather(*(client() for _ in range(args.concurrency)))
        wall = time.monotonic() - start
    result = summarize(records)
    result.update(wall_s=wall, errors=len(errors), error_examples=errors[:3], arrivals=args.arrivals,
                  contention=args.contention, pace=args.pace, rate_mix=args.rate_mix)  # fmt: skip
    return result


def _spin(stop: Any, spinning: Any) -> None:
    """A CPU-bound loop until `stop` is set (a competing process); sets `spinning` once it runs."""
    spinning.set()
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF


SPIN_START_TIMEOUT_S = 120.0  # a spawned interpreter starts in well under a second; a deadline against a hang


@contextlib.contextmanager
def contention(num_processes: int) -> Iterator[None]:
    """`num_processes` CPU-bound processes running for the duration of the block (all of them spinning before
    it starts: a spawned process takes a while to start, longer than a short run on a loaded host)."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    spinning = [ctx.Event() for _ in range(num_processes)]
    procs = [ctx.Process(target=_spin, args=(stop, started), daemon=True) for started in spinning]
    for p in procs:
        p.start()
    try:
        for started in spinning:
            if not started.wait(SPIN_START_TIMEOUT_S):
                raise RuntimeError(f"a competing process did not start within {SPIN_START_TIMEOUT_S:g} s")
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.loadtest", description="Streaming load run over HTTP.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--model", default="tiny", help="model id sent in each request (default: %(default)s)")
    p.add_argument("--num-requests", type=int, default=200, help="requests in all (default: %(default)s)")
    p.add_argument("--arrivals", choices=ARRIVALS, default="closed",
                   help="closed: --concurrency clients, one request at a time each; burst: all at t = 0; "
                        "poisson / gamma: open-loop arrivals at --request-rate (default: %(default)s)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=32, help="clients of a closed-loop run (default: %(default)s)")
    p.add_argument("--request-rate", type=float, default=4.0,
                   help="requests/s of poisson and gamma arrivals (default: %(default)s)")  # fmt: skip
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape k (1: Poisson, < 1: burstier) (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per completion (default: %(default)s)")
    p.add_argument("--prompt-words", type=int, default=8, help="words per prompt (default: %(default)s)")
    rates = p.add_mutually_exclusive_group()
    rates.add_argument(
        "--stream-rate",
        type=float,
        default=20.0,
        help="tokens/s each client reads, sent as the request's stream_rate (default: %(default)s)",
    )
    rates.add_argument(
        "--rate-mix",
        help="RATE:WEIGHT,... each request's rate drawn from this mix instead of --stream-rate, e.g. 15:0.4,20:0.6; "
        "RATE none leaves stream_rate out: rate-less on a server run with --default-rate none (20:0.5,none:0.5)",
    )
    p.add_argument("--pace", action="store_true", help="ask the server to release tokens at the stream rate")
    p.add_argument(
        "--contention",
        type=int,
        default=0,
        help="CPU-bound processes competing for the cores during the run (default: %(default)s)",
    )
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--seed", type=int, default=0, help="prompts and arrival times (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    return p


def check(args: argparse.Namespace) -> None:
    if args.num_requests < 1 or args.concurrency < 1 or args.max_tokens < 1:
        raise ValueError("--num-requests, --concurrency and --max-tokens must be >= 1")
    if args.contention < 0 or args.prompt_words < 0:
        raise ValueError("--contention and --prompt-words must be >= 0")
    if not (math.isfinite(args.stream_rate) and args.stream_rate > 0):
        raise ValueError(f"--stream-rate must be a positive number, got {args.stream_rate}")
    if args.rate_mix is not None:
        workloads.RateMix.parse(args.rate_mix)  # a bad mix is refused before any request is sent
    if args.arrivals in ("poisson", "gamma") and not (math.isfinite(args.request_rate) and args.request_rate > 0):
        raise ValueError(f"--request-rate must be a positive number, got {args.request_rate}")
    if not (math.isfinite(args.burstiness) and args.burstiness > 0):
        raise ValueError(f"--burstiness must be a positive number, got {args.burstiness}")


def load(args: argparse.Namespace) -> dict[str, Any]:
    """One load run (with its competing processes, if asked)."""
    with contention(args.contention):
        return asyncio.run(run_load(args))


def report(result: dict[str, Any]) -> str:
    return "\n".join([
        f"requests: {result['completed']} completed, {result['errors']} errors in {result['wall_s']:.2f} s",
        f"requests/s: {result['completed'] / result['wall_s']:.2f}",
        f"output tokens/s: {result['total_output_tokens'] / result['wall_s']:.1f}",
        f"TTFT p50: {result['median_ttft_ms']:.1f} ms   p99: {result['p99_ttft_ms']:.1f} ms",
        f"ITL mean: {result['mean_itl_ms']:.2f} ms   p99: {result['p99_itl_ms']:.2f} ms",
        f"rebuffer total: {result['rebuffer_s']:.2f} s   effective tokens/s: {result['effective_throughput']:.1f}",
        *(by_class(result) if result["rateless_completed"] else []),
        *(f"error: {example}" for example in result["error_examples"]),
    ])  # fmt: skip


def by_class(result: dict[str, Any]) -> list[str]:
    """The streams' and the rate-less requests' lines of a mixed run."""
    return [
        f"streams: {result['stream_completed']}   TTFT p50: {result['median_stream_ttft_ms']:.1f} ms   "
        f"p99: {result['p99_stream_ttft_ms']:.1f} ms   rebuffer: {result['stream_rebuffer_s']:.2f} s of "
        f"{result['stream_playback_s']:.1f} s playback",
        f"rate-less: {result['rateless_completed']}   E2E p50: {result['median_rateless_e2el_ms']:.1f} ms   "
        f"p99: {result['p99_rateless_e2el_ms']:.1f} ms",
    ]


PER_REQUEST = ("request_ids", "ttfts", "itls", "rebuffer_per_request_s", "qoes")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = load(args)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k not in PER_REQUEST}, indent=2))
    else:
        print(report(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
