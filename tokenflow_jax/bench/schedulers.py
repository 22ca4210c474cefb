"""Streaming benchmark: one workload replayed under several schedulers on the same executor, side by side.

    python -m tokenflow_jax.bench [--model tiny] [--workload burst|poisson|gamma|chat|trace:PATH]
        [--num-requests N] [--burst-size B] [--request-rate R] [--burstiness G]
        [--input-len M:S[:MAX]] [--output-len M:S[:MAX]] [--rate R | --rate-mix SPEC] [--max-hold-s S]
        [--schedulers tokenflow,fcfs,sglang,andes] [--executor engine|sim] [--kv-pages N] [--seed S] [--out DIR]
        [--repeats N] [--num-warmups N] [--no-enable-prefix-caching | --compare-prefix-caching]
    python -m tokenflow_jax.bench --executor sim --paper-setup "h200 llama3-8b burst 400 short"
        [--sim-kernels naive|roofline] [--rate R | --rate-mix SPEC]

`--paper-setup` replays one of the paper's setups (`tokenflow_jax.paper_setups`: its workload, GPU and model
profile, and engine limits) on the simulator; `python -m tokenflow_jax.paper_setups` runs them all.

Writes DIR/results.json (per scheduler: its config, `metrics.summarize` dict, the workload's bounds and each
figure's median, min and max over `--repeats` runs), DIR/table.txt and plots (buffer occupancy per request,
TTFT CDF, effective vs token throughput). The tables show each scheduler against the bounds no scheduler can
beat on that executor (`tokenflow_jax.bench.bounds`): effective and token throughput as a fraction of their
ceilings, and the P99 TTFT floor as a fraction of the run's P99 TTFT (1 would be as good as possible).

Default setup (real engine, tiny model, CPU): a burst of 48 requests (prompt 64+-16, output 128+-32 tokens,
each read at 20 tok/s). On 2 CPU cores the tiny model decodes a batch of 16 in ~6-7 ms, ~2,000 tok/s with
the engine loop, so once a third of the burst holds the KV pool each running stream is generated ~6x faster
than it is read, about the paper's RTX 4090 ratio; the whole burst (960 tok/s of reading) would fit the
compute but not the memory. The device pool is sized so only ~1/3 of the burst's KV fits (`--kv-pages`
default), which is what separates schedulers; the host tier holds the whole burst.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenflow_jax.bench.executors import build_executor, engine_limits
from tokenflow_jax.bench.results import SchedulerRun
from tokenflow_jax.bench.spread import format_spread_table, spread_results, spreads
from tokenflow_jax.metrics import summarize
from tokenflow_jax.scheduler.interface import Executor
from tokenflow_jax.scheduler.rateless import DEFAULT_MAX_HOLD_S
from tokenflow_jax.scheduler.registry import POLICIES, make_policy
from tokenflow_jax.workloads import LengthDist, RateMix, RequestSpec, chat, make_workload, trace

DEFAULT_SCHEDULERS = "tokenflow,fcfs,sglang,andes"


# ---- workload and sizing
def workload_specs(args: argparse.Namespace) -> list[RequestSpec]:
    rates = RateMix.parse(args.rate_mix) if args.rate_mix else RateMix.single(args.rate)
    prompt, output = LengthDist.parse(args.input_len), LengthDist.parse(args.output_len)
    if args.workload.startswith("trace:"):
        limit = args.max_model_len or 256
        return trace(args.workload.removeprefix("trace:"), time_scale=args.time_scale,
                     max_requests=args.num_requests, length_scale=args.length_scale, rates=rates,
                     seed=args.seed, max_prompt_len=limit // 2, max_output_len=limit // 2)  # fmt: skip
    if args.workload == "chat":
        return chat(args.num_requests, turns=args.chat_turns, system_len=args.chat_system_len,
                    think_s=args.chat_think_time, burst_size=args.burst_size, burst_interval=args.burst_interval,
                    prompt=prompt.scaled(args.length_scale), output=output.scaled(args.length_scale), rates=rates,
                    seed=args.seed)  # fmt: skip
    specs = make_workload(args.workload, args.num_requests, request_rate=args.request_rate,
                          burstiness=args.burstiness, prompt=prompt, output=output, rates=rates, seed=args.seed,
                          length_scale=args.length_scale)  # fmt: skip
    if args.workload == "burst" and args.burst_size:
        # Several bursts of `burst_size`, `burst_interval` seconds apart.
        specs = [dataclasses.replace(s, arrival=(i // args.burst_size) * args.burst_interval)
                 for i, s in enumerate(specs)]  # fmt: skip
    return specs


def available_schedulers(names: Sequence[str]) -> list[str]:
    """The names whose policy imports; the others are skipped with a note (some are written concurrently)."""
    found = []
    for name in names:
        if name not in POLICIES:
            raise SystemExit(f"unknown scheduler {name!r}; choose from {', '.join(POLICIES)}")
        try:
            make_policy(name)
            found.append(name)
        except ValueError as e:
            print(f"note: skipping {name}: {e}")
    return found


# ---- running
def run_scheduler(executor: Executor, name: str, specs: Sequence[RequestSpec], *, eos: frozenset[int] = frozenset(),
                  preemption: str = "auto", config: dict[str, Any] | None = None, seed: int = 0,
                  time_limit: float | None = None, progress: bool = True, prefix_caching: bool | None = None,
                  label: str | None = None, estimators: dict[str, Any] | None = None) -> SchedulerRun:  # fmt: skip
    """Replay `specs` under policy `name` on an idle executor (a fresh EngineCore over it), from a cold prefix
    cache (`prefix_caching` turns it on or off; None keeps the executor's setting). With `estimators` (run label ->
    the executor's measured costs as that label's last run left them, updated here), the run starts from its own
    costs, not from those another policy's run left: each policy plans as on a server that runs it alone."""
    from tokenflow_jax.engine.core import EngineCore
    from tokenflow_jax.sim.replay import replay, spec_request

    policy = make_policy(name, **(config or {}))
    if hasattr(executor, "write_through_enabled"):
        # Baselines that only preempt by recompute run without it, like SGLang and vLLM (no host tier).
        executor.write_through_enabled = policy.uses_write_through and executor.num_host_pages > 0
    if hasattr(executor, "reset_prefix_cache"):  # a run must not hit what the previous one cached
        executor.reset_prefix_cache(prefix_caching)
    label = label or name
    own = estimators is not None and hasattr(executor, "restore_estimators")
    if own and label in estimators:
        executor.restore_estimators(estimators[label])
    core = EngineCore(executor, policy, eos_token_ids=eos, preemption=preemption)
    wall0 = time.perf_counter()
    start = executor.now()
    step_seconds: list[float] = []
    records = replay(core, specs, lambda spec, arrival: spec_request(spec, arrival, seed=seed),
                     time_limit=time_limit, progress=progress, desc=name, step_seconds=step_seconds)  # fmt: skip
    summary = summarize(records, swap_bytes_out=core.bytes_to_host, swap_bytes_in=core.bytes_to_device,
                        scheduler_times_s=core.scheduler_times_s,
                        prefix_cache=dataclasses.astuple(core.prefix_cache))  # fmt: skip
    if own:
        estimators[label] = executor.estimator_state()
    return SchedulerRun(label, records, summary, start, time.perf_counter() - wall0, step_seconds)


def compare(
    executor: Executor, names: Sequence[str], specs: Sequence[RequestSpec], **kwargs: Any
) -> list[SchedulerRun]:
    """`run_scheduler` for each name in turn over the same executor and workload; with `prefix_caching` a list
    of settings, each name runs once per setting (the cache-off runs are labelled NAME/no-cache)."""
    configs = kwargs.pop("configs", None) or {}
    settings = kwargs.pop("prefix_caching", None)
    if not isinstance(settings, list):
        settings = [settings]
    return [run_scheduler(executor, n, specs, config=configs.get(n), prefix_caching=on,
                          label=n if on or on is None or len(settings) == 1 else f"{n}/no-cache", **kwargs)
            for n in names for on in settings]  # fmt: skip


# ---- reporting
COLUMNS = [  # header, summary key, format
    ("scheduler", None, "{}"),
    ("done", "completed", "{:d}"),
    ("dur s", "duration", "{:.2f}"),
    ("tok/s", "output_throughput", "{:.1f}"),
    ("eff tok/s", "effective_throughput", "{:.1f}"),
    ("TTFT ms", "mean_ttft_ms", "{:.0f}"),
    ("p99 TTFT ms", "p99_ttft_ms", "{:.0f}"),
    ("ITL ms", "mean_itl_ms", "{:.1f}"),
    ("rebuf s", "rebuffer_s", "{:.2f}"),
    ("QoE", "qoe", "{:.3f}"),
    ("pre swap", "preemptions_swap", "{:d}"),
    ("pre recomp", "preemptions_recompute", "{:d}"),
    ("swap MiB", "swap_bytes", "{:.1f}"),
    ("hit %", "prefix_cache_hit_rate", "{:.0%}"),
]
RATIOS = [("eff/fcfs", "effective_throughput"), ("p99TTFT/fcfs", "p99_ttft_ms"), ("tok/fcfs", "output_throughput")]
# With rate-less requests in the workload: the streams and the rate-less requests apart.
CLASS_COLUMNS = [
    ("scheduler", None, "{}"),
    ("streams", "stream_completed", "{:d}"),
    ("p99 TTFT ms", "p99_stream_ttft_ms", "{:.0f}"),
    ("rebuf s", "stream_rebuffer_s", "{:.2f}"),
    ("rebuf/playback", "stream_rebuffer_share", "{:.3f}"),
    ("eff tok/s", "stream_effective_throughput", "{:.1f}"),
    ("rate-less", "rateless_completed", "{:d}"),
    ("p50 E2E ms", "median_rateless_e2el_ms", "{:.0f}"),
    ("p99 E2E ms", "p99_rateless_e2el_ms", "{:.0f}"),
    ("tok/s", "rateless_output_throughput", "{:.1f}"),
]
CLASS_RATIOS = [("stream p99TTFT/fcfs", "p99_stream_ttft_ms"), ("rate-less p99E2E/fcfs", "p99_rateless_e2el_ms")]


def format_table(runs: Sequence[SchedulerRun]) -> str:
    """One row per scheduler; ratio columns are relative to fcfs when it ran. With rate-less requests in the
    workload, a second table shows the streams and the rate-less requests apart."""
    table = _table(runs, COLUMNS, RATIOS)
    if any(run.summary["rateless_completed"] for run in runs):
        table += "\n\nby class:\n" + _table(runs, CLASS_COLUMNS, CLASS_RATIOS)
    return table


def _value(summary: dict[str, Any], key: str) -> float:
    if key == "swap_bytes":
        return summary[key] / 2**20
    if key == "stream_rebuffer_share":  # of the streams' playback time (L / r summed)
        return summary["stream_rebuffer_s"] / summary["stream_playback_s"] if summary["stream_playback_s"] else 0.0
    return summary[key]


def _table(runs: Sequence[SchedulerRun], columns: list, ratios: list) -> str:
    base = next((r.summary for r in runs if r.name == "fcfs"), None)
    header = [c[0] for c in columns] + ([r[0] for r in ratios] if base else [])
    rows = []
    for run in runs:
        s = run.summary
        row = [run.name] + [fmt.format(_value(s, key)) for _, key, fmt in columns[1:]]
        if base:
            row += [f"{s[key] / base[key]:.2f}" if base[key] else "-" for _, key in ratios]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]  # fmt: skip
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    out: Path, runs: Sequence[SchedulerRun], config: dict[str, Any], extra: dict[str, dict] | None = None
) -> Path:
    """results.json: per scheduler its config and first run's metrics, plus `extra[name]` (bounds, spreads)."""
    results = {run.name: {"config": {**config, "scheduler": run.name, "wall_s": run.wall_s}, "metrics": run.summary,
                          **(extra or {}).get(run.name, {})} for run in runs}  # fmt: skip
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path


# ---- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenflow_jax.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="tiny", help="preset or checkpoint folder (engine executor)")
    p.add_argument("--workload", default="burst", help="burst, poisson, gamma, chat or trace:PATH")
    p.add_argument("--num-requests", type=int, default=48, help="requests in the workload")
    p.add_argument("--burst-size", type=int, default=None, help="requests per burst (None: all in one)")
    p.add_argument("--burst-interval", type=float, default=10.0, help="seconds between bursts")
    p.add_argument("--request-rate", type=float, default=4.0, help="requests/s (poisson, gamma)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 is Poisson, < 1 burstier")
    p.add_argument("--input-len", default="64:16:96", help="prompt tokens MEAN[:STD[:MAX]]")
    p.add_argument("--output-len", default="128:32:160", help="output tokens MEAN[:STD[:MAX]]")
    p.add_argument("--chat-turns", type=int, default=4, help="chat: turns per conversation")
    p.add_argument("--chat-system-len", type=int, default=64, help="chat: tokens of the shared system prompt")
    p.add_argument("--chat-think-time", type=float, default=2.0, help="chat: seconds between a conversation's turns")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply every length (trace: Azure lengths)")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace: replay this many times faster")
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--rate", type=float, default=20.0, help="tokens/s every reader consumes")
    rates.add_argument(
        "--rate-mix", default=None, help="RATE:WEIGHT,... e.g. 15:0.4,20:0.6; RATE none: rate-less (20:0.5,none:0.5)"
    )
    p.add_argument("--max-hold-s", type=float, default=None,
                   help="every policy's bound on holding a rate-less request back (None: the policies' default, "
                        f"{DEFAULT_MAX_HOLD_S:g} s)")  # fmt: skip
    p.add_argument("--schedulers", default=DEFAULT_SCHEDULERS, help="comma-separated policy names")
    p.add_argument(
        "--scheduler-config", default="{}", help='JSON {name: {option: value}}, e.g. {"andes": {"interval": 4}}'
    )
    p.add_argument("--executor", choices=("engine", "sim"), default="engine", help="the real engine or the simulator")
    p.add_argument("--sim-profile", default="h100-llama3-8b", help="cost profile of the simulator")
    tp_help = "devices the model is split over (the engine's, or the simulated GPUs)"
    p.add_argument("--tensor-parallel-size", type=type_positive_int, default=1, help=tp_help)
    p.add_argument(
        "--paper-setup",
        default=None,
        help="with --executor sim: the paper setup whose name contains this text, e.g. 'rtx4090 "
        "llama3-8b burst 80 long' (its workload, profile and limits replace the workload flags)",
    )
    p.add_argument(
        "--sim-kernels",
        choices=("naive", "roofline"),
        default="naive",
        help="--paper-setup profile: this engine's naive XLA decode, or the HBM floor",
    )
    p.add_argument(
        "--sim-slowdown",
        type=parse_slowdown,
        default=(),
        help="with --executor sim: T:FACTOR,... from T s on, every step costs FACTOR times the profile's "
        "(e.g. 1:3 for a machine 3x slower after 1 s), as contention does; the policies only measure it",
    )
    p.add_argument("--kv-pages", type=int, default=None, help="usable device KV pages (None: 1/3 of the workload)")
    memory_help = "size the device KV pool to this fraction of device memory, weights included (None: --kv-pages)"
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help=memory_help)
    p.add_argument("--host-kv-pages", type=int, default=None, help="host tier pages (None: the whole workload)")
    p.add_argument("--data-parallel-size", type=int, default=1, help="engine replicas, routed as the server routes")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests decoding at once")
    p.add_argument("--max-batch-tokens", type=int, default=256, help="tokens per engine step")
    p.add_argument("--max-model-len", type=int, default=None, help="None: longest request, next power of two")
    p.add_argument(
        "--preemption",
        choices=("auto", "swap", "recompute"),
        default="auto",
        help="how preempted requests lose their KV: the policy's choice, always swap, always recompute",
    )
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV of prompt prefixes already computed, on both tiers")  # fmt: skip
    cache.add_argument("--compare-prefix-caching", action="store_true",
                       help="run every scheduler with the prefix cache on and off (NAME/no-cache)")  # fmt: skip
    p.add_argument("--time-limit", type=float, default=None, help="executor seconds per scheduler before aborting")
    p.add_argument("--seed", type=int, default=0, help="workload and sampling seed")
    p.add_argument("--repeats", type=type_positive_int, default=1,
                   help="run every scheduler this many times (in rounds); report median (min-max)")  # fmt: skip
    p.add_argument("--num-warmups", type=type_count, default=None,
                   help="untimed rounds of every scheduler before the measured ones (default: 1 on the real "
                        "engine, whose first run in a process pays one-off costs; 0 on the simulator)")  # fmt: skip
    p.add_argument("--out", default="bench_out", help="folder for results.json and the plots")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the plots")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def type_positive_int(text: str, least: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
    return value


def type_count(text: str) -> int:
    return type_positive_int(text, least=0)


def parse_slowdown(text: str) -> tuple[tuple[float, float], ...]:
    """'T:FACTOR,...' -> ((T, FACTOR), ...)."""
    try:
        pairs = tuple((float(t), float(f)) for t, f in (item.split(":") for item in text.split(",") if item))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T:FACTOR,... (seconds:multiplier), got {text!r}") from None
    if any(not (f > 0 and t >= 0) for t, f in pairs):
        raise argparse.ArgumentTypeError(f"times must be >= 0 and factors > 0, got {text!r}")
    return pairs


def paper_setup_run(args: argparse.Namespace) -> tuple[list[RequestSpec], Executor, dict[str, int]]:
    """(specs, simulator, limits) of the one paper setup `--paper-setup` names."""
    from tokenflow_jax.bench.faithful import every_setup
    from tokenflow_jax.bench.paper_setups import MAX_MODEL_LEN
    from tokenflow_jax.sim.executor import SimExecutor

    if args.executor != "sim":
        raise SystemExit("--paper-setup runs on the simulator: add --executor sim")
    setups = every_setup()
    matches = [s for s in setups if args.paper_setup in s.name]
    matches = [s for s in matches if s.name == args.paper_setup] or matches
    if len(matches) != 1:
        names = "\n  ".join(s.name for s in setups)
        raise SystemExit(f"--paper-setup {args.paper_setup!r} matches {len(matches)} setups; one of:\n  {names}")
    setup = dataclasses.replace(matches[0], tensor_parallel_size=args.tensor_parallel_size)
    specs = setup.specs(args.rate_mix or f"{args.rate:g}", args.seed)
    try:
        ex = SimExecutor(setup.sim_profile(args.sim_kernels), max_model_len=MAX_MODEL_LEN, slowdown=args.sim_slowdown)
    except ValueError as e:  # a model the simulated GPUs cannot hold, heads N cannot split
        raise SystemExit(f"error: {e}") from e
    limits = {k: getattr(ex, k) for k in ("max_model_len", "page_size", "max_num_seqs", "max_batch_tokens")}
    limits.update(kv_pages=ex.num_device_pages, host_kv_pages=ex.num_host_pages)
    print(f"paper setup: {setup.name} (profile {setup.profile(args.sim_kernels)})")
    return specs, ex, limits


def run_setup(
    args: argparse.Namespace, specs: Sequence[RequestSpec], limits: dict[str, int]
) -> tuple[list[str], Path, dict[str, Any]]:
    """(the schedulers that import, the output folder, made, and the run's config for results.json)."""
    names = available_schedulers([n.strip() for n in args.schedulers.split(",") if n.strip()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**{k: v for k, v in vars(args).items() if k not in ("plots", "progress")}, **limits,
              "num_specs": len(specs), "total_output_tokens": sum(s.output_len for s in specs)}  # fmt: skip
    return names, out, config


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.data_parallel_size != 1:
        raise SystemExit("--data-parallel-size: run python -m tokenflow_jax.bench (bench.data_parallel.main)")
    executor = None
    if args.paper_setup is not None:
        specs, executor, limits = paper_setup_run(args)
    else:
        specs = workload_specs(args)
        if not specs:
            raise SystemExit("the workload is empty")
        limits = engine_limits(args, specs)
    names, out, config = run_setup(args, specs, limits)
    print(
        f"{len(specs)} requests ({args.workload}), schedulers {', '.join(names)}, executor {args.executor}, "
        f"{limits['kv_pages']} device / {limits['host_kv_pages']} host KV pages of {args.page_size} tokens"
    )
    t0 = time.perf_counter()
    executor, eos = (executor, frozenset()) if executor is not None else build_executor(args, limits)
    print(f"executor ready in {time.perf_counter() - t0:.1f} s")
    configs = json.loads(args.scheduler_config)
    if args.max_hold_s is not None:  # every policy takes it
        configs = {n: {"max_hold_s": args.max_hold_s, **configs.get(n, {})} for n in names}
    caching = [True, False] if args.compare_prefix_caching else args.enable_prefix_caching
    # Each round runs every scheduler once, so a drift of the machine spreads over all of them alike. The first
    # run in a process is slower whatever its policy (on the CPU engine the default burst's first P99 TTFT is
    # 1.5-2x the next ones'): untimed rounds take that cost, not the first policy in the list.
    from tokenflow_jax.sim.executor import SimExecutor

    simulated = isinstance(executor, SimExecutor)  # also under --paper-setup: deterministic, no warm-up
    warmups = args.num_warmups if args.num_warmups is not None else int(not simulated)
    estimators: dict[str, Any] = {}  # each policy's own measured costs, from its last run (`run_scheduler`)
    rounds = [compare(executor, names, specs, eos=eos, preemption=args.preemption, seed=args.seed,
                      estimators=estimators,
                      configs=configs, time_limit=args.time_limit, progress=args.progress,
                      prefix_caching=caching) for _ in range(warmups + args.repeats)][warmups:]  # fmt: skip
    runs = rounds[0]
    bounds = None
    # The bounds hold for runs that complete every request and compute every prompt token at least once
    # (a workload whose prompts share segments lets a prefix cache skip some).
    if args.time_limit is None and not any(s.segments for s in specs):
        from tokenflow_jax.bench.bounds import bench_bounds

        bounds = bench_bounds(executor, specs, [run.step_seconds for rnd in rounds for run in rnd])
    figures = spreads(rounds, bounds)
    table = format_table(runs) + "\n\n" + format_spread_table(figures, bounds, args.repeats)
    print(table)
    (out / "table.txt").write_text(table + "\n")
    write_results(out, runs, config, spread_results(figures, bounds))
    if args.plots:
        from tokenflow_jax.bench.plots import save_plots

        save_plots(runs, out)
    print(f"wrote {out}/ in {time.perf_counter() - t0:.1f} s total")
    return {run.name: run.summary for run in runs}


if __name__ == "__main__":
    main()
