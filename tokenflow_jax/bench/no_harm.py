"""Do-no-harm check of a paper-setup sweep: tokenflow against fcfs on every (setup, rate mix) pair of the `--json`
files `python -m tokenflow_jax.paper_setups` writes, with the four ratios of the rule (`paper_setups.NO_HARM`)
and PASS/FAIL per pair.

    python -m tokenflow_jax.bench.no_harm sweep.json [more.json ...]
    python -m tokenflow_jax.bench.no_harm --noise-floor 1.001 [--only TEXT] [--full] [--jobs N]

Later files replace earlier runs of the same (setup, rates, policy), so a re-run of one setup (`--only`) can be
laid over a whole sweep. Exits 1 when some pair fails, 2 when no pair has both policies.

`--noise-floor FACTOR` holds fcfs to the same rule against itself on a machine FACTOR slower (every step, from
the start), on the faithful setups: where a 0.1% slower step already moves some reader's stall by more than 10%
of its playback, the per-request clause measures which requests an overload happens to hit, not harm
(docs/DESIGN.md section 3.13).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tokenflow_jax.bench.faithful import faithful_plan
from tokenflow_jax.bench.paper_setups import NO_HARM, PaperSetup, comparison_rows, harms, run_one


def by_pair(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """(setup, rates) -> policy -> run of a sweep's `--json` runs, later runs overriding earlier ones."""
    pairs: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for run in runs:
        pairs.setdefault((run["setup"], run["rates"]), {})[run["policy"]] = run
    return pairs


def load_runs(paths: Sequence[Path]) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    """`by_pair` over the runs of several files, later files overriding earlier ones."""
    return by_pair(run for path in paths for run in json.loads(Path(path).read_text()))


def check(pairs: dict[tuple[str, str], dict[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], int]:
    """One row per pair that has fcfs and tokenflow runs: the ratios, swaps, and the rules broken; and how many
    pairs lacked one of the two."""
    rows, missing = [], 0
    for (setup, rates), runs in pairs.items():
        if "fcfs" not in runs or "tokenflow" not in runs:
            missing += 1
            continue
        fcfs, tokenflow = comparison_rows([runs["fcfs"], runs["tokenflow"]])
        rows.append({"setup": setup, "rates": rates, **tokenflow, "broken": harms(tokenflow)})
    return rows, missing


def slower_fcfs(setup: PaperSetup, rates: str, kernels: str, factor: float) -> dict[str, Any]:
    """fcfs on a machine whose every step costs `factor` times the profile's, labelled as the policy compared."""
    run = run_one(setup, rates, "fcfs", kernels, executor_options=(("slowdown", ((0.0, factor),)),))
    return {**run, "policy": "tokenflow", "slowdown": factor}


def noise_floor(plan: Sequence[tuple[PaperSetup, str]], factor: float, kernels: str, jobs: int) -> list[dict[str, Any]]:
    """fcfs at the profile's speed and `factor` slower on every pair of `plan` (the slower one in tokenflow's place,
    so that `check` holds it to the rule)."""
    tasks = [(setup, rates, kernels) for setup, rates in plan]
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        same = [pool.submit(run_one, setup, rates, "fcfs", k) for setup, rates, k in tasks]
        slower = [pool.submit(slower_fcfs, setup, rates, k, factor) for setup, rates, k in tasks]
        return [f.result() for f in (*same, *slower)]


def format_rows(rows: Sequence[dict[str, Any]], compared: str = "tokenflow") -> str:
    lines = [f"{compared} against fcfs:", "",
             "| setup | rates | tokens x | effective x | P99 TTFT x | max rebuffer increase | swaps/recomputes "
             "| do no harm |", "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        verdict = "PASS" if not r["broken"] else "FAIL: " + ", ".join(r["broken"])
        lines.append(f"| {r['setup']} | {r['rates']} | {r['output_x']:.3f} | {r['effective_x']:.3f} | "
                     f"{r['p99_ttft_x']:.3f} | {100 * r['max_rebuffer_increase']:+.1f}% | {r['preemptions']} | "
                     f"{verdict} |")  # fmt: skip
    passed = sum(not r["broken"] for r in rows)
    lines += ["", f"Do no harm ({NO_HARM}): {passed} of {len(rows)} pairs pass."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenflow_jax.bench.no_harm", description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="*", type=Path, help="--json output of python -m tokenflow_jax.paper_setups")
    p.add_argument(
        "--noise-floor",
        type=float,
        metavar="FACTOR",
        help="instead: fcfs against itself on a machine FACTOR slower (faithful setups, simulator)",
    )
    p.add_argument("--only", default="", help="with --noise-floor: keep setups whose name contains this text")
    p.add_argument("--full", action="store_true", help="with --noise-floor: every rate mix")
    p.add_argument("--kernels", choices=("naive", "roofline"), default="naive", help="with --noise-floor")
    p.add_argument("--jobs", type=int, default=1, help="with --noise-floor: runs in parallel (processes)")
    p.add_argument("--out", type=Path, help="with --noise-floor: also write its runs here (JSON)")
    args = p.parse_args(argv)
    if args.noise_floor is not None:
        if args.json:
            p.error("--noise-floor runs its own sweep: give no JSON files")
        if not 0 < args.noise_floor < float("inf"):
            p.error(f"--noise-floor must be a finite factor > 0, got {args.noise_floor!r}")
        plan = [(s, r) for s, r in faithful_plan(args.full) if args.only in s.name]
        if not plan:
            p.error(f"no faithful setup's name contains {args.only!r}")
        runs = noise_floor(plan, args.noise_floor, args.kernels, args.jobs)
        if args.out:
            args.out.write_text(json.dumps(runs))
        rows, missing = check(by_pair(runs))
        compared = f"fcfs on a machine {args.noise_floor:g}x slower"
    else:
        if not args.json:
            p.error("give the --json files of a sweep, or --noise-floor FACTOR")
        if missing_files := [str(f) for f in args.json if not f.is_file()]:
            p.error(f"no such file: {', '.join(missing_files)}")
        rows, missing = check(load_runs(args.json))
        compared = "tokenflow"
    print(format_rows(rows, compared))
    if missing:
        print(f"{missing} pair(s) without both an fcfs and a tokenflow run were skipped.")
    if not rows:
        return 2
    return 0 if all(not r["broken"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
