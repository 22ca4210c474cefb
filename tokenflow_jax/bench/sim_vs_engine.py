"""Does the simulator earn its trust? The real engine's default bench against the simulator on cost profiles
fitted to this machine's engine, figure by figure.

    python -m tokenflow_jax.bench.sim_vs_engine [--profile PATH] [--schedulers tokenflow,fcfs,sglang,andes]
        [--json PATH] [-- BENCH FLAGS...]

Without `--profile` it first fits one on isolated steps (`engine_bench --profile-out`: decode steps at two
contexts per batch, one-sequence prefills, swaps each way; the batches and contexts span the bench's). Then it
runs the bench's workload (default: its default burst; the bench flags after `--`) on the engine, recording
every step of the serving loop: the batch's terms of the cost model and the time from the previous step's
tokens to its own. It refits the step cost on those records (`sim.profiles.fit_steps`; transfers and pools as
the isolated fit), so host time per step, scheduling and prefill chunking are charged as the loop paid them,
in the same run and under the same load as the figures it is compared with (each policy on its own steps: they
run one after another, and a shared machine's speed drifts between them). The simulator then replays the
workload on each profile, and this prints, per scheduler, each figure on both and the simulator's error: TTFT
p50 and p99, effective and token throughput as relative errors (target within 15%), swap and recompute
preemption counts as relative errors where the engine's count is not 0, with the load average before and
after the engine's run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGET = 0.15
FIGURES = [  # summary key, header
    ("median_ttft_ms", "TTFT p50 ms"),
    ("p99_ttft_ms", "TTFT p99 ms"),
    ("effective_throughput", "eff tok/s"),
    ("output_throughput", "tok/s"),
    ("preemptions_swap", "swaps"),
    ("preemptions_recompute", "recomputes"),
]
# The bench's default engine: up to 32 sequences of up to 256 tokens.
FIT_FLAGS = ["--batches", "4,16,32", "--context", "192", "--swap-pages", "16,64", "--repeats", "5",
             "--offline-requests", "0"]  # fmt: skip


def fit_profile(path: Path, model: str = "tiny") -> Path:
    from tokenflow_jax.bench import engine_bench

    engine_bench.main(["--model", model, *FIT_FLAGS, "--profile-out", str(path)])
    return path


def relative_error(sim: float, engine: float) -> float:
    return sim / engine - 1 if engine else (0.0 if sim == 0 else math.inf)


class StepRecorder:
    """Records each step an executor's serving loop resolves: its batch's terms of the cost model
    (`sim.executor.batch_terms`) and the seconds from the previous step's tokens to its own (from its dispatch
    after an idle gap), as the executor times its steps for its own estimates."""

    def __init__(self, executor: Any) -> None:
        from tokenflow_jax.sim.executor import batch_terms

        self.records: list[tuple[int, int, int, float, float]] = []
        dispatched: collections.deque[tuple[int, int, int, float]] = collections.deque()
        compute, resolve = executor._compute, executor._resolve

        def recording_compute(chunks: list[Any], rows: list[Any], request_ids: list[str]) -> Any:
            dispatched.append(batch_terms(chunks))
            return compute(chunks, rows, request_ids)

        def recording_resolve(step: Any) -> dict[str, int]:
            previous = executor._last_resolved_at
            tokens = resolve(step)
            seconds = executor._last_resolved_at - max(step.dispatched_at, previous)
            self.records.append((*dispatched.popleft(), seconds))
            return tokens

        executor._compute, executor._resolve = recording_compute, recording_resolve


def run_engine(bench_flags: Sequence[str]) -> tuple[dict[str, dict[str, Any]], dict[str, list[tuple]], tuple]:
    """The bench's workload on the real engine, every scheduler once, as `python -m tokenflow_jax.bench` runs it:
    ({scheduler: summary}, {scheduler: its serving loop's step records}, load average (1 min) before and
    after)."""
    from tokenflow_jax.bench import schedulers as bench

    args = bench.build_parser().parse_args(bench_flags)
    specs = bench.workload_specs(args)
    limits = bench.engine_limits(args, specs)
    names = bench.available_schedulers([n.strip() for n in args.schedulers.split(",") if n.strip()])
    executor, eos = bench.build_executor(args, limits)
    recorder = StepRecorder(executor)
    configs = json.loads(args.scheduler_config)
    load_before = os.getloadavg()[0]
    summaries, records = {}, {}
    for name in names:
        recorder.records = records[name] = []
        run = bench.run_scheduler(executor, name, specs, eos=eos, preemption=args.preemption, seed=args.seed,
                                  config=configs.get(name), time_limit=args.time_limit, progress=False,
                                  prefix_caching=args.enable_prefix_caching)  # fmt: skip
        summaries[name] = run.summary
    return summaries, records, (load_before, os.getloadavg()[0])


ISOLATED = "fitted on isolated steps"
SERVING_LOOP = "fitted on the policy's own serving-loop steps (same run)"
COEFFICIENTS = ("step_base_s", "step_per_token_s", "step_per_context_token_s", "prefill_per_token_s",
                "prefill_per_token_pair_s")  # fmt: skip


def compare(
    profile: Path, bench_flags: Sequence[str], schedulers: str, out: Path, engine_run: dict[str, Any] | None = None
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, Any]]:
    """({ISOLATED | SERVING_LOOP: {scheduler: {figure: {engine, sim, error}}}}, what the run was: load
    averages, steps recorded and step coefficients per scheduler).

    Each policy's simulation on SERVING_LOOP uses the step cost refitted on that policy's own engine steps:
    the policies run one after another, and on a shared machine the engine's speed drifts between them.
    `engine_run` (a previous `--json` output) replays that run's engine figures and step records instead of
    running the engine again."""
    from tokenflow_jax.bench import schedulers as bench
    from tokenflow_jax.sim.profiles import fit_steps, load_profile

    common = [*bench_flags, "--no-plots", "--no-progress"]
    if engine_run is None:
        engine, records, loads = run_engine([*common, "--schedulers", schedulers])
    else:
        figures = engine_run["figures"][ISOLATED]
        engine = {name: {key: f[key]["engine"] for key, _ in FIGURES} for name, f in figures.items()}
        records, loads = engine_run["run"]["step_records"], engine_run["run"]["load_average"]
        schedulers = ",".join(engine)
    isolated = load_profile(profile)
    sims = {ISOLATED: bench.main([*common, "--schedulers", schedulers, "--executor", "sim", "--sim-profile",
                                  str(profile), "--out", str(out / "sim")])}  # fmt: skip
    sims[SERVING_LOOP] = {}
    step_costs = {ISOLATED: {k: getattr(isolated, k) for k in COEFFICIENTS}}
    for name, steps in records.items():
        loop = dataclasses.replace(isolated, name=f"{isolated.name}-serving-loop-{name}",
                                   **dict(zip(COEFFICIENTS, fit_steps(steps), strict=True)))  # fmt: skip
        path = out / f"profile_serving_loop_{name}.json"
        loop.save(path)
        step_costs[name] = {k: getattr(loop, k) for k in COEFFICIENTS}
        sims[SERVING_LOOP][name] = bench.main([*common, "--schedulers", name, "--executor", "sim", "--sim-profile",
                                               str(path), "--out", str(out / f"sim_{name}")])[name]  # fmt: skip
    tables = {kind: {name: {key: {"engine": engine[name][key], "sim": sim[name][key],
                                  "error": relative_error(sim[name][key], engine[name][key])} for key, _ in FIGURES}
                     for name in engine} for kind, sim in sims.items()}  # fmt: skip
    run = {"load_average": loads, "steps_recorded": {n: len(r) for n, r in records.items()},
           "step_costs": step_costs, "step_records": records}  # fmt: skip
    return tables, run


def format_errors(tables: dict[str, dict[str, dict[str, Any]]], run: dict[str, Any]) -> str:
    before, after = run["load_average"]
    steps = ", ".join(f"{n} {k}" for n, k in run["steps_recorded"].items())
    head = (
        f"Engine run: serving-loop steps recorded: {steps}; load average {before:.1f} before, {after:.1f} "
        "after.\nStep cost a + b*tokens + c*context + p*prefill + q*pairs (ms, us, ns, us, ns):\n"
    )
    costs = "\n".join(f"- {kind}: {1e3 * c['step_base_s']:.2f}, {1e6 * c['step_per_token_s']:.1f}, "
                       f"{1e9 * c['step_per_context_token_s']:.1f}, {1e6 * c['prefill_per_token_s']:.1f}, "
                       f"{1e9 * c['prefill_per_token_pair_s']:.2f}"
                       for kind, c in run["step_costs"].items())  # fmt: skip
    return head + costs + "\n\n" + "\n\n".join(f"simulator {kind}:\n\n" + format_table(t)
                                                 for kind, t in tables.items())  # fmt: skip


def format_table(table: dict[str, dict[str, Any]]) -> str:
    lines = ["| scheduler | " + " | ".join(f"{h}: engine / sim / error" for _, h in FIGURES) + " |",
             "|---|" + "---:|" * len(FIGURES)]  # fmt: skip
    within = total = 0
    for name, figs in table.items():
        cells = []
        for key, _ in FIGURES:
            f = figs[key]
            fmt = "{:.0f}" if "ttft" in key or "preemptions" in key else "{:.1f}"
            cells.append(f"{fmt.format(f['engine'])} / {fmt.format(f['sim'])} / {100 * f['error']:+.0f}%")
            if math.isfinite(f["error"]):
                total += 1
                within += abs(f["error"]) <= TARGET
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Within {100 * TARGET:.0f}%: {within} of {total} figures.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m tokenflow_jax.bench.sim_vs_engine", description=__doc__.split("\n")[0])
    p.add_argument("--profile", type=Path, help="a profile fitted on isolated steps (JSON); None: fit one first")
    p.add_argument("--model", default="tiny", help="model of the engine (and of the fit)")
    p.add_argument("--schedulers", default="tokenflow,fcfs,sglang,andes", help="comma-separated policy names")
    p.add_argument("--json", type=Path, help="also write the figures, errors and the engine's step records here")
    p.add_argument("--engine-run", type=Path, help="a previous --json output: refit and simulate its engine run")
    args = p.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="sim_vs_engine_"))
    engine_run = json.loads(args.engine_run.read_text()) if args.engine_run else None
    profile = args.profile
    if profile is None and engine_run is not None:  # that run's isolated fit
        profile = out / "profile.json"
        profile.write_text(json.dumps(engine_run["profile"]))
    elif profile is None:
        profile = fit_profile(out / "profile.json", args.model)
    table, run = compare(profile, ["--model", args.model, *bench_flags], args.schedulers, out, engine_run)
    print(format_errors(table, run))
    if args.json:
        args.json.write_text(json.dumps({"profile": json.loads(Path(profile).read_text()), "run": run,
                                         "figures": table}, indent=1))  # fmt: skip
    return table


if __name__ == "__main__":
    main()
