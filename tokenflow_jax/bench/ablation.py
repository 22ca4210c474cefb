"""The paper's ablation (docs/REFERENCE.md section 2) on the simulator: the RTX 4090 long burst (80 requests,
input ~1,024, output ~2,048 tokens, 20 tok/s readers) under tokenflow with each part switched off, by its
completion time (first arrival to last token).

- **full:** tokenflow as it runs everywhere else.
- **without offload:** no host tier to pause into: every preemption is a recompute (`preemption="recompute"`)
  and nothing is written through.
- **without write-through:** no host copy is kept while a request runs (`write_through=False`, and
  `swap_out_copies_whole_kv`: none is kept once it is loaded back either): a pause copies the request's whole KV
  at that moment, its pages stay held and the next step waits until that copy lands (as in the paper's system;
  the engine would gather them aside on the device), and its reload waits for that copy.
- **without evict-load overlap:** evictions and loads share one copy timeline, serialised with compute
  (`overlap_transfers=False`): a load waits for every eviction queued before it, and a step for the swap-outs
  and loads issued before it.

`steps held s` in the table is the time compute waited for those transfers.

The paper's figures (its Figure on the RTX 4090 long burst): full 66.0 s; without offload 127.3 s; without
write-through 82.8 s; without evict-load overlap 74.4 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tokenflow_jax.bench.paper_setups import PaperSetup, run_one

SETUP = PaperSetup("rtx4090", "llama3-8b", "burst", 80, "long")
RATES = "20"
# name: (preemption mode, SimExecutor switches, the paper's completion time in seconds)
VARIANTS: dict[str, tuple[str, tuple[tuple[str, Any], ...], float]] = {
    "full": ("auto", (), 66.0),
    "without offload": ("recompute", (("write_through", False),), 127.3),
    "without write-through": ("auto", (("write_through", False), ("swap_out_copies_whole_kv", True)), 82.8),
    "without evict-load overlap": ("auto", (("overlap_transfers", False),), 74.4),
}


def run_variant(name: str, kernels: str, setup: PaperSetup = SETUP, seed: int = 0) -> dict[str, Any]:
    preemption, options, _ = VARIANTS[name]
    run = run_one(setup, RATES, "tokenflow", kernels, seed, preemption=preemption, executor_options=options)
    return {**run, "variant": name}


def run_ablation(kernels: str, jobs: int = 1, setup: PaperSetup = SETUP) -> list[dict[str, Any]]:
    """Every variant once (with `jobs` processes); fcfs on the same setup as the reference."""
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(run_variant, v, kernels, setup) for v in VARIANTS]
        fcfs = pool.submit(run_one, setup, RATES, "fcfs", kernels)
        return [f.result() for f in futures] + [{**fcfs.result(), "variant": "fcfs (reference)"}]


def ablation_report(results: Sequence[dict[str, Any]], kernels: str) -> str:
    full = next(r for r in results if r["variant"] == "full")
    lines = [f"### Ablation: {full['setup']} at {RATES} tok/s, tokenflow with parts switched off ({kernels} kernels)",
             "", "| variant | completion s | x full | paper s | paper x full | effective tok/s | P99 TTFT s | "
             "output tok/s | swaps / recomputes | swap GB | steps held s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        paper = VARIANTS.get(r["variant"], (None, None, None))[2]
        paper_cells = f"{paper:.1f} | {paper / VARIANTS['full'][2]:.2f}" if paper else "- | -"
        lines.append(
            f"| {r['variant']} | {r['duration']:.1f} | {r['duration'] / full['duration']:.2f} | {paper_cells} | "
            f"{r['effective_throughput']:.0f} | {r['p99_ttft_ms'] / 1e3:.2f} | {r['output_throughput']:.0f} | "
            f"{r['preemptions_swap']} / {r['preemptions_recompute']} | {r['swap_bytes'] / 1e9:.1f} | "
            f"{r['held_s']:.1f} |"
        )  # fmt: skip
    lines.append(f"| bound | >= {full['bound']['min_duration_s']:.1f} | | | | <= "
                 f"{full['bound']['effective_throughput']:.0f} | >= {full['bound']['p99_ttft_s']:.2f} | <= "
                 f"{full['bound']['output_throughput']:.0f} | | | |")  # fmt: skip
    return "\n".join(lines) + "\n"
