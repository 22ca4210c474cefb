"""Do-no-harm check of a paper-setup sweep: tokenflow against fcfs on every (setup, rate mix) pair of the `--json`
files `python -m tokenflow_jax.paper_setups` writes, with the four ratios of the rule (`paper_setups.NO_HARM`)
and PASS/FAIL per pair.

    python -m tokenflow_jax.bench.no_harm sweep.json [more.json ...]

Later files replace earlier runs of the same (setup, rates, policy), so a re-run of one setup (`--only`) can be
laid over a whole sweep. Exits 1 when some pair fails, 2 when no pair has both policies.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenflow_jax.bench.paper_setups import NO_HARM, comparison_rows, harms


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


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| setup | rates | tokens x | effective x | P99 TTFT x | max rebuffer increase | swaps/recomputes "
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
    p.add_argument("json", nargs="+", type=Path, help="--json output of python -m tokenflow_jax.paper_setups")
    args = p.parse_args(argv)
    if missing_files := [str(f) for f in args.json if not f.is_file()]:
        p.error(f"no such file: {', '.join(missing_files)}")
    rows, missing = check(load_runs(args.json))
    print(format_rows(rows))
    if missing:
        print(f"{missing} pair(s) without both an fcfs and a tokenflow run were skipped.")
    if not rows:
        return 2
    return 0 if all(not r["broken"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
