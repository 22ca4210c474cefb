"""The streaming burst over HTTP, policy by policy, on an idle machine and with competing processes.

    python -m serving.burst_bench [--schedulers tokenflow,fcfs,sglang,andes] [--contention 0,2] [--pace]
        [--num-requests 96] [--max-tokens 96] [--server-args "--kv-pages 48"] [--repeats N] [--json FILE]

For each policy it starts the real server (`python -m serving`, the tiny model) in a subprocess, runs
`serving.loadtest`'s open-loop burst against it at each contention level (0: idle; N: N CPU-bound processes
competing for the cores), and stops it. Every figure is measured at the client. Prints one table per
contention level with ratios to fcfs; `--json` writes every summary.

With `--repeats N` the policies take turns N times (round by round, so that a machine's slow spell falls on
all of them), and each table gives the median (min-max) over the rounds, the ratios to fcfs taken round by
round; `--json` then holds a list of summaries per policy, one per round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from serving import loadtest

STARTUP_TIMEOUT_S = 600.0  # a cold compilation cache compiles every bucket first
COLUMNS = (("effective tok/s", "effective_throughput"), ("output tok/s", "output_throughput"),
           ("TTFT p50 ms", "median_ttft_ms"), ("TTFT p99 ms", "p99_ttft_ms"), ("rebuffer s", "rebuffer_s"),
           ("worst rebuffer s", "max_rebuffer_s"))  # fmt: skip


@contextlib.contextmanager
def running_server(server_args: Sequence[str], log_path: Path) -> Iterator[str]:
    """The real server in a subprocess on a free port, until the block ends; yields its URL."""
    cmd = [sys.executable, "-m", "serving", "--port", "0", *server_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        deadline, line = time.monotonic() + STARTUP_TIMEOUT_S, ""
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                line = proc.stdout.readline()
                if line.startswith("serving "):
                    break
        else:
            raise RuntimeError(f"the server did not start (see {log_path}): {' '.join(cmd)}")
        yield line.strip().rsplit(" ", 1)[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def served_model(server_args: list[str]) -> str:
    """The model id the server answers to, which its clients must send."""
    from serving.__main__ import build_parser

    parsed = build_parser().parse_args(server_args)
    return parsed.served_model_name or parsed.model


def load_args(args: argparse.Namespace, url: str, contention: int, model: str) -> argparse.Namespace:
    flags = ["--url", url, "--model", model, "--arrivals", "burst", "--num-requests", str(args.num_requests),
             "--max-tokens", str(args.max_tokens), "--prompt-words", str(args.prompt_words),
             "--stream-rate", str(args.stream_rate), "--contention", str(contention)]  # fmt: skip
    return loadtest.build_parser().parse_args([*flags, *(["--pace"] if args.pace else [])])


def warm_up(url: str, model: str) -> None:
    """A few requests first, so the first burst does not pay for anything done once."""
    loadtest.load(loadtest.build_parser().parse_args(["--url", url, "--model", model, "--num-requests", "4",
                                                      "--concurrency", "4",
                                                      "--max-tokens", "4"]))  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    """{contention level: {policy: client-side summary}}."""
    results: dict[str, dict[str, dict[str, Any]]] = {str(c): {} for c in args.contention}
    for policy in args.schedulers:
        server_args = ["--model", args.model, "--scheduler", policy, *shlex.split(args.server_args)]
        model = served_model(server_args)
        with running_server(server_args, Path(args.log_dir) / f"server-{policy}.log") as url:
            warm_up(url, model)
            for level in args.contention:
                summary = loadtest.load(load_args(args, url, level, model))
                rebuffers = summary.pop("rebuffer_per_request_s")
                summary["max_rebuffer_s"] = max(rebuffers, default=0.0)
                for key in loadtest.PER_REQUEST:
                    summary.pop(key, None)
                results[str(level)][policy] = summary
                print(f"{policy} contention={level}: {summary['completed']} done, {summary['errors']} errors, "
                      f"P99 TTFT {summary['p99_ttft_ms']:.0f} ms, rebuffer {summary['rebuffer_s']:.2f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    return results


def rounds_table(level: str, rounds: Sequence[dict[str, dict[str, Any]]]) -> str:
    """`table` over several rounds of one contention level: each column's median (min-max), and the ratios to
    fcfs taken within each round before their median (min-max)."""
    lines = header(level, f", median (min-max) of {len(rounds)} rounds")
    for policy in rounds[0]:
        cells = [spread([r[policy][key] for r in rounds], 2 if "rebuffer" in key else 1) for _, key in COLUMNS]
        ratio = extra = "-"
        if all("fcfs" in r for r in rounds):
            if all(r["fcfs"]["p99_ttft_ms"] for r in rounds):
                ratio = spread([r[policy]["p99_ttft_ms"] / r["fcfs"]["p99_ttft_ms"] for r in rounds], 2)
            extra = spread([r[policy]["rebuffer_s"] - r["fcfs"]["rebuffer_s"] for r in rounds], 2, signed=True)
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {ratio} | {extra} |")
    return "\n".join(lines)


def spread(values: Sequence[float], digits: int, signed: bool = False) -> str:
    """'median (min-max)' of `values` at `digits` decimals."""
    form = f"{'+' if signed else ''}.{digits}f"
    return f"{statistics.median(values):{form}} ({min(values):{form}}-{max(values):{form}})"


def header(level: str, suffix: str = "") -> list[str]:
    """A table's title and column rows for one contention level."""
    head = f"contention {level}" + (" (idle)" if level == "0" else f" ({level} CPU-bound processes)") + suffix
    return [head, "| policy | " + " | ".join(name for name, _ in COLUMNS) + " | P99 TTFT x fcfs | rebuffer - fcfs |",
            "|---" * (len(COLUMNS) + 3) + "|"]  # fmt: skip


def table(level: str, by_policy: dict[str, dict[str, Any]]) -> str:
    lines = header(level)
    base = by_policy.get("fcfs")
    for policy, s in by_policy.items():
        cells = [f"{s[key]:.2f}" if "rebuffer" in key else f"{s[key]:.1f}" for _, key in COLUMNS]
        ratio = f"{s['p99_ttft_ms'] / base['p99_ttft_ms']:.2f}" if base and base["p99_ttft_ms"] else "-"
        extra = f"{s['rebuffer_s'] - base['rebuffer_s']:+.2f}" if base else "-"
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {ratio} | {extra} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.burst_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--schedulers", default="tokenflow,fcfs,sglang,andes", help="(default: %(default)s)")
    p.add_argument("--contention", default="0,2", help="CPU-bound processes per run, comma-separated "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--model", default="tiny", help="(default: %(default)s)")
    p.add_argument("--num-requests", type=int, default=96, help="(default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=96, help="(default: %(default)s)")
    p.add_argument("--prompt-words", type=int, default=6, help="(default: %(default)s: ~36 byte tokens)")
    p.add_argument("--stream-rate", type=float, default=20.0, help="(default: %(default)s)")
    p.add_argument("--pace", action="store_true", help="the server releases each stream at its rate")
    p.add_argument("--server-args", default="--kv-pages 48", help="more flags for the server "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--log-dir", default=".", help="where the server logs go (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of every policy, taken in turn; tables of "
                   "medians (default: %(default)s)")  # fmt: skip
    p.add_argument("--json", help="write every summary here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.schedulers = [s for s in args.schedulers.split(",") if s]
    try:
        args.contention = [int(c) for c in args.contention.split(",") if c]
        if not args.schedulers or not args.contention or min(args.contention) < 0 or args.repeats < 1:
            raise ValueError
    except ValueError:
        print("error: --schedulers and --contention need one or more items; contention counts >= 0; "
              "--repeats >= 1", file=sys.stderr)  # fmt: skip
        return 2
    rounds, one = [run(args) for _ in range(args.repeats)], args.repeats == 1
    for level, by_policy in rounds[0].items():
        print((table(level, by_policy) if one else rounds_table(level, [r[level] for r in rounds])) + "\n")
    if args.json:
        merged = rounds[0] if one else {
            level: {policy: [r[level][policy] for r in rounds] for policy in by_policy}
            for level, by_policy in rounds[0].items()}  # fmt: skip
        Path(args.json).write_text(json.dumps(merged, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
