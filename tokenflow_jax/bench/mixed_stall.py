"""The streams' stall in a mixed sweep beside what any schedule must stall (`bounds.stream_stall_bound`).

    python -m tokenflow_jax.paper_setups --rate-mix 20:0.5,none:0.5 --policies fcfs,tokenflow --json runs.json
    python -m tokenflow_jax.bench.mixed_stall runs.json [--markdown PATH]

Per setup: the streams' P99 TTFT, their stall as a share of their playback (total stall / total playback, and
the worst stream's), for fcfs and tokenflow; and the bound on that share for any schedule whose streams' P99
TTFT is at most fcfs's. A bound above 10% means the target "streams' rebuffer within 10% of their playback
time, P99 TTFT at most fcfs's" is infeasible on that setup; one at or under 10% shows nothing either way (it is a
relaxation, not a schedule). The bound on the total share also bounds the worst stream's (a largest ratio is at
least the ratio of the sums). A second bound adds the target's token clause: every request, the rate-less ones
too, done within fcfs's span / 0.97 (token throughput >= 0.97x fcfs's); above 10%, the stall and token targets
cannot both hold at that TTFT.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from tokenflow_jax.bench import paper_setups as ps
from tokenflow_jax.bench.bounds import StepCosts, stream_stall_bound
from tokenflow_jax.bench.faithful import faithful_setups
from tokenflow_jax.bench.no_harm import by_pair
from tokenflow_jax.sim.executor import SimExecutor

TARGET_SHARE = 0.10
TOKENS_FLOOR = 0.97  # the mixed-traffic target's token throughput, x fcfs's


def known_setups() -> dict[str, ps.PaperSetup]:
    """Every named single-device setup of `paper_setups`, by name."""
    return {s.name: s for s in ps.paper_setups(("llama3-8b", "qwen2.5-32b")) + faithful_setups()}


def setup_bound(  # noqa: ANN201
    setup: ps.PaperSetup, rates: str, kernels: str, p99_ttft_s: float, seed: int = 0, tokens_per_s: float | None = None
):
    """The stall bound of one setup's workload on its simulated executor, at a streams' P99 TTFT cap and, with
    `tokens_per_s`, a token throughput floor (every request done within total tokens / `tokens_per_s`)."""
    executor = SimExecutor(setup.sim_profile(kernels), max_model_len=ps.MAX_MODEL_LEN)
    specs = setup.specs(rates, seed)
    span_s = None if tokens_per_s is None else sum(x.output_len for x in specs) / tokens_per_s
    return stream_stall_bound(specs, StepCosts.of_executor(executor), p99_ttft_s, span_s=span_s)


def stall_rows(runs: Sequence[dict[str, Any]], setups: dict[str, ps.PaperSetup] | None = None) -> list[dict[str, Any]]:
    """One row per (setup, rates) with both policies: shares, TTFTs and the bound at fcfs's stream P99 TTFT."""
    setups = known_setups() if setups is None else setups
    rows = []
    for (name, rates), pol in by_pair(runs).items():
        if "fcfs" not in pol or "tokenflow" not in pol or not pol["fcfs"].get("stream_playback_s"):
            continue
        fcfs, tf = pol["fcfs"], pol["tokenflow"]
        cap_s = fcfs["p99_stream_ttft_ms"] / 1e3
        bound = tokens_bound = None
        if name in setups:
            bound = setup_bound(setups[name], rates, fcfs["kernels"], cap_s)
            tokens_bound = setup_bound(setups[name], rates, fcfs["kernels"], cap_s,
                                       tokens_per_s=TOKENS_FLOOR * fcfs["output_throughput"])  # fmt: skip
        shares = "-" if bound is None else f"{bound.share:.3f}, with tokens {tokens_bound.share:.3f}"
        print(f"{name} {rates}: bound {shares}", file=sys.stderr, flush=True)
        row = {"setup": name, "rates": rates, "fcfs_p99_stream_ttft_s": cap_s,
               "bound_share": None if bound is None else bound.share,
               "bound_tokens_share": None if tokens_bound is None else tokens_bound.share}  # fmt: skip
        for key, r in (("fcfs", fcfs), ("tokenflow", tf)):
            row[f"{key}_share"] = r["stream_rebuffer_s"] / r["stream_playback_s"]
            row[f"{key}_worst"] = r["stream_max_rebuffer_share"]
        row["tokenflow_p99_stream_ttft_s"] = tf["p99_stream_ttft_ms"] / 1e3
        rows.append(row)
    return rows


def verdict(row: dict[str, Any]) -> str:
    if row["bound_share"] is not None and row["bound_share"] > TARGET_SHARE:
        return "infeasible"
    if row.get("bound_tokens_share") is not None and row["bound_tokens_share"] > TARGET_SHARE:
        return f"infeasible with tokens >= {TOKENS_FLOOR:g}x fcfs"
    ttft_ok = row["tokenflow_p99_stream_ttft_s"] <= row["fcfs_p99_stream_ttft_s"]
    met = ttft_ok and row["tokenflow_share"] <= TARGET_SHARE
    return "met" if met else "missed (bound <= 10%: not shown infeasible)"


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| setup | stream P99 TTFT s fcfs / tokenflow | stall / playback fcfs (worst) | tokenflow (worst) "
             f"| bound, any schedule | with tokens >= {TOKENS_FLOOR:g}x fcfs | verdict |",
             "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        bound, tokens = ("-" if r.get(key) is None else f"{100 * r[key]:.1f}%"
                         for key in ("bound_share", "bound_tokens_share"))  # fmt: skip
        lines.append(f"| {r['setup']} | {r['fcfs_p99_stream_ttft_s']:.1f} / {r['tokenflow_p99_stream_ttft_s']:.1f} | "
                     f"{100 * r['fcfs_share']:.1f}% ({100 * r['fcfs_worst']:.0f}%) | "
                     f"{100 * r['tokenflow_share']:.1f}% ({100 * r['tokenflow_worst']:.0f}%) | {bound} | {tokens} | "
                     f"{verdict(r)} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, setups: dict[str, ps.PaperSetup] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m tokenflow_jax.bench.mixed_stall", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", help="a `paper_setups --json` file of a sweep with fcfs and tokenflow")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    with open(args.runs) as f:
        text = format_rows(stall_rows(json.load(f), setups))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
