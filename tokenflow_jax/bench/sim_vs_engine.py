"""Does the simulator earn its trust? The real engine's default bench against the simulator on a cost profile
fitted to this machine's engine, figure by figure.

    python -m tokenflow_jax.bench.sim_vs_engine [--profile PATH] [--schedulers tokenflow,fcfs,sglang,andes]
        [--json PATH] [-- BENCH FLAGS...]

Without `--profile` it first fits one (`engine_bench --profile-out`: decode steps at two contexts per batch,
one-sequence prefills, swaps each way; the batches and contexts span the bench's). Then `python -m
tokenflow_jax.bench` runs with the given bench flags (default: its default burst) on the engine and on the
simulator, and this prints, per scheduler, each figure on both and the simulator's error: TTFT p50 and p99,
effective and token throughput as relative errors (target within 15%), swap and recompute preemption counts
as relative errors where the engine's count is not 0. It does so twice: on the profile as fitted, and with a
constant added to every step's cost, the engine's extra time per step under fcfs (`--calibrate-on`): the
host time per step that the cost model leaves out (and the machine's load at the time); the other policies'
errors are then out of sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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


def fcfs_steps(sim_flags: Sequence[str], policy: str) -> int:
    """Steps the simulator takes to serve the bench's workload under `policy` (its decisions do not depend on
    step costs when it is fcfs)."""
    from tokenflow_jax.bench import schedulers as bench

    args = bench.build_parser().parse_args([*sim_flags, "--schedulers", policy])
    specs = bench.workload_specs(args)
    executor, _ = bench.build_executor(args, bench.engine_limits(args, specs))
    bench.run_scheduler(executor, policy, specs, progress=False)
    return executor.steps


def compare(
    profile: Path, bench_flags: Sequence[str], schedulers: str, out: Path, calibrate_on: str | None = "fcfs"
) -> dict[str, dict[str, dict[str, Any]]]:
    """{"fitted" | "calibrated ...": {scheduler: {figure: {engine, sim, error}}}}.

    "fitted" runs the simulator on the profile as fitted. "calibrated" adds to every step's cost the host time
    per step that the cost model does not charge (and the machine's load while the bench ran): the engine's
    duration minus the simulator's under `calibrate_on`, over the simulator's steps there. It is fitted on that
    one policy, so the other policies' errors are out of sample."""
    from tokenflow_jax.bench import schedulers as bench
    from tokenflow_jax.sim.profiles import load_profile

    common = [*bench_flags, "--schedulers", schedulers, "--no-plots", "--no-progress"]
    engine = bench.main([*common, "--out", str(out / "engine")])
    sim_flags = [*common, "--executor", "sim", "--sim-profile", str(profile)]
    runs = {"fitted": bench.main([*sim_flags, "--out", str(out / "sim")])}
    if calibrate_on in engine:
        steps = fcfs_steps([*bench_flags, "--executor", "sim", "--sim-profile", str(profile)], calibrate_on)
        overhead = (engine[calibrate_on]["duration"] - runs["fitted"][calibrate_on]["duration"]) / steps
        fitted = load_profile(profile)
        calibrated = out / "profile_calibrated.json"
        dataclasses.replace(fitted, step_base_s=max(0.0, fitted.step_base_s + overhead)).save(calibrated)
        sim_flags[sim_flags.index(str(profile))] = str(calibrated)
        runs[f"calibrated on {calibrate_on} ({1e3 * overhead:+.2f} ms per step)"] = bench.main(
            [*sim_flags, "--out", str(out / "sim_calibrated")])  # fmt: skip
    return {kind: {name: {key: {"engine": engine[name][key], "sim": sim[name][key],
                                "error": relative_error(sim[name][key], engine[name][key])} for key, _ in FIGURES}
                   for name in engine} for kind, sim in runs.items()}  # fmt: skip


def format_errors(tables: dict[str, dict[str, dict[str, Any]]]) -> str:
    return "\n\n".join(f"simulator {kind}:\n\n" + format_table(t) for kind, t in tables.items())


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
    p.add_argument("--profile", type=Path, help="a fitted profile (JSON); None: fit one first")
    p.add_argument("--model", default="tiny", help="model of the engine (and of the fit)")
    p.add_argument("--schedulers", default="tokenflow,fcfs,sglang,andes", help="comma-separated policy names")
    p.add_argument("--json", type=Path, help="also write the figures and errors here")
    p.add_argument("--calibrate-on", default="fcfs", help="policy whose duration calibrates the step scale")
    args = p.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="sim_vs_engine_"))
    profile = args.profile or fit_profile(out / "profile.json", args.model)
    table = compare(profile, ["--model", args.model, *bench_flags], args.schedulers, out, args.calibrate_on)
    print(format_errors(table))
    if args.json:
        args.json.write_text(json.dumps({"profile": json.loads(Path(profile).read_text()), "figures": table}, indent=1))
    return table


if __name__ == "__main__":
    main()
