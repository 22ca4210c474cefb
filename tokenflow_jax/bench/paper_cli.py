"""The command line of `python -m tokenflow_jax.paper_setups` (see `tokenflow_jax.bench.paper_setups`): the
faithful setups (`bench.faithful`), the earlier ones, the ablation (`bench.ablation`) or the decision timing."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tokenflow_jax import workloads
from tokenflow_jax.bench import paper_setups
from tokenflow_jax.bench.ablation import ablation_report, run_ablation
from tokenflow_jax.bench.faithful import FAITHFUL_RATES, faithful_plan, faithful_report
from tokenflow_jax.bench.paper_setups import (
    FAITHFUL_POLICIES,
    POLICIES,
    RATE_MIXES,
    available_policies,
    decision_benchmark,
    decisions_in_replay,
    default_plan,
    mixed_traffic_table,
    multi_device_setups,
    report,
    run_sweep,
)
from tokenflow_jax.bench.schedulers import type_positive_int


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m tokenflow_jax.paper_setups",
                                description=paper_setups.__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument(
        "--setups",
        choices=("faithful", "current", "multi-device"),
        default="faithful",
        help="Table 1 as the paper ran it, the earlier setups (H200 at 0.9 of memory, short Poisson), or the "
        "setups one GPU cannot hold (with --tensor-parallel-size)",
    )
    p.add_argument("--tensor-parallel-size", type=type_positive_int, default=1,
                   help="GPUs each setup's model is split over (Megatron tensor parallelism)")  # fmt: skip
    p.add_argument("--ablation", action="store_true", help="the RTX 4090 long burst with parts switched off")
    p.add_argument("--full", action="store_true", help="every rate mix (current: and Qwen2.5-32B everywhere it fits)")
    p.add_argument(
        "--kernels",
        choices=("naive", "roofline"),
        default="naive",
        help="cost profile: docs/REFERENCE.md naive XLA decode fit, or the HBM floor",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--policies", default=None, help="comma-separated policy names (default: the setups' own)")
    p.add_argument("--only", default="", help="keep setups whose name contains this text")
    p.add_argument("--rates", nargs="*", help="keep only these rate mixes, e.g. 20 '15:0.4,20:0.6'")
    p.add_argument("--rate-mix", help="replay every chosen setup at this mix instead, e.g. 20:0.5,none:0.5")
    p.add_argument("--markdown", type=Path, help="also write the tables to this file")
    p.add_argument("--json", type=Path, help="also write every run's summary to this file")
    p.add_argument("--decision-bench", action="store_true", help="time one tokenflow decision at 256 requests")
    args = p.parse_args(argv)
    if args.tensor_parallel_size > 1 and (args.ablation or args.decision_bench):
        p.error("--tensor-parallel-size applies to --setups, not to --ablation or --decision-bench")
    if args.decision_bench:
        # Everyone fits the H200's pool; then a pool of 4,000 pages (~2/3 of the live KV) forces a choice; each
        # after a burst (few distinct buffers) and with staggered arrivals (all distinct); the staggered ones also
        # with 3 engine steps before each decision (caches as a serving loop leaves them).
        text = json.dumps(
            {
                "fits": decision_benchmark(),
                "memory_bound": decision_benchmark(device_pages=4000),
                "fits_staggered": decision_benchmark(staggered=True),
                "memory_bound_staggered": decision_benchmark(device_pages=4000, staggered=True),
                "fits_staggered_in_loop": decision_benchmark(staggered=True, repeats=200, steps_between=3),
                "memory_bound_staggered_in_loop": decision_benchmark(
                    device_pages=4000, staggered=True, repeats=200, steps_between=3
                ),
                "in_replay": decisions_in_replay(),
                # Memory bound in a replay: Qwen2.5-32B's KV leaves the fill choosing at most decisions.
                "in_replay_memory_bound": decisions_in_replay("h200 qwen2.5-32b burst 400 short"),
            },
            indent=2,
        )
        print(text)
        return text
    t0 = time.perf_counter()
    if args.ablation:
        results = run_ablation(args.kernels, args.jobs)
        text = ablation_report(results, args.kernels)
    else:
        faithful = args.setups == "faithful"
        if args.setups == "multi-device":
            plan = [(s, r) for s in multi_device_setups() for r in (RATE_MIXES if args.full else FAITHFUL_RATES)]
        else:
            plan = faithful_plan(args.full) if faithful else default_plan(args.full)
        plan = [(dataclasses.replace(s, tensor_parallel_size=args.tensor_parallel_size), r) for s, r in plan
                if args.only in s.name and (not args.rates or r in args.rates)]  # fmt: skip
        for setup in {s.name: s for s, _ in plan}.values():  # one that does not fit fails here, not in every run
            try:
                setup.sim_profile(args.kernels)
            except ValueError as e:
                raise SystemExit(f"{setup.name}: {e}") from None
        if args.rate_mix:
            workloads.RateMix.parse(args.rate_mix)  # a bad mix fails here, not in every run
            plan = list({s.name: (s, args.rate_mix) for s, _ in plan}.values())
        names = args.policies.split(",") if args.policies else (FAITHFUL_POLICIES if faithful else POLICIES)
        results = run_sweep(plan, args.kernels, args.jobs, available_policies(names))
        if faithful:
            text = faithful_report(results, plan, args.kernels)
            if any(r["rateless_completed"] for r in results):
                text = mixed_traffic_table(results, plan) + "\n" + text
        else:
            text = report(results, plan, args.kernels)
    text += f"\n{len(results)} runs in {time.perf_counter() - t0:.0f} s wall.\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
