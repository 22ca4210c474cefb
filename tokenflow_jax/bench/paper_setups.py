"""The paper's evaluation setups (docs/REFERENCE.md, section 2) replayed on the simulator.

    python -m tokenflow_jax.paper_setups [--setups faithful|current] [--full] [--kernels naive|roofline]
        [--jobs 1] [--markdown PATH] [--json PATH] [--rate-mix SPEC]
    python -m tokenflow_jax.paper_setups --ablation [--kernels roofline]
    python -m tokenflow_jax.paper_setups --setups multi-device --tensor-parallel-size 4

Each setup runs through `EngineCore` + `SimExecutor` under every policy, via `tokenflow_jax.sim.replay.replay`
(the command line is in `bench.paper_cli`). `--setups faithful` (the default) runs Table 1 as the paper ran it
(`bench.faithful`: H200 at mem-frac 0.3, Poisson and gamma arrivals long enough for a steady queue, the
paper's baselines) at 20 tok/s and prints one table per setup with the bounds (`bench.bounds`) and the paper's
stated figure. `--setups current` runs the earlier setups (H200 at 0.9 of memory, short Poisson runs) with
ratios to fcfs: a representative subset (every workload at 20 tok/s and the 15:0.4,20:0.6 mix on Llama-3-8B,
the H200 bursts on Qwen2.5-32B); `--full` adds 25 and 30 tok/s everywhere. `--ablation` reruns the RTX 4090
long burst with parts of TokenFlow switched off (`bench.ablation`).
`--tensor-parallel-size N` runs every chosen setup on N GPUs (`sim.tensor_parallel`); `--setups multi-device` are
the setups whose weights one GPU cannot hold (`multi_device_setups`), with ratios to fcfs.
`--rate-mix` replays every chosen setup at one mix instead, e.g. `20:0.5,none:0.5` (half the requests
rate-less); with rate-less requests the report adds the streams and the rate-less requests apart
(`mixed_traffic_table`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from tokenflow_jax import workloads
from tokenflow_jax.bench.bounds import StepCosts, workload_bounds
from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.metrics import summarize
from tokenflow_jax.scheduler.registry import make_policy
from tokenflow_jax.sim.executor import SimExecutor
from tokenflow_jax.sim.profiles import SimProfile, builtin_profile
from tokenflow_jax.sim.replay import replay

RATE_MIXES = ("20", "25", "30", "15:0.4,20:0.6")
SUBSET_RATES = ("20", "15:0.4,20:0.6")
POLICIES = ("fcfs", "tokenflow", "sglang", "andes")
FAITHFUL_POLICIES = ("tokenflow", "sglang", "sglang-chunked", "fcfs", "andes")
MAX_MODEL_LEN = 16384  # long H200 outputs are 4096 +- 1024 tokens: draws reach past 8192
TARGETS = "effective throughput >= 1.8x fcfs, P99 TTFT <= 0.2x, token throughput >= 0.97x, rebuffer increase <= 10%"


@dataclasses.dataclass(frozen=True)
class PaperSetup:
    gpu: str  # h200 | rtx4090
    model: str  # llama3-8b | qwen2.5-32b
    kind: str  # burst | poisson | gamma
    num_requests: int
    lengths: str  # short (512 in / 1024 out) | long (1024 / 2048)
    request_rate: float = math.inf
    output_scale: float = 1.0  # the paper doubles outputs on the H200
    mem_frac: float | None = None  # share of GPU memory for weights + KV (SGLang's --mem-fraction-static)
    burstiness: float = 1.0  # gamma shape of the inter-arrivals (1: Poisson)
    duration_s: float | None = None  # arrivals span this long (num_requests = rate x duration)
    tensor_parallel_size: int = 1  # GPUs the model is split over (`sim.tensor_parallel`)

    @property
    def name(self) -> str:
        if self.kind == "burst":
            arrivals = "burst"
        elif self.kind == "poisson":
            arrivals = f"poisson {self.request_rate:g}/s"
        else:
            arrivals = f"gamma {self.request_rate:g}/s k={self.burstiness:g}"
        memory = "" if self.mem_frac is None else f" mem-frac {self.mem_frac:g}"
        span = "" if self.duration_s is None else f" over {self.duration_s:g} s"
        devices = f" tp{self.tensor_parallel_size}" if self.tensor_parallel_size > 1 else ""
        return f"{self.gpu} {self.model}{memory} {arrivals} {self.num_requests}{span} {self.lengths}{devices}"

    def profile(self, kernels: str) -> str:
        return (f"{self.gpu}-{self.model}" + ("-roofline" if kernels == "roofline" else "")
                + (f"-tp{self.tensor_parallel_size}" if self.tensor_parallel_size > 1 else ""))  # fmt: skip

    def sim_profile(self, kernels: str) -> SimProfile:
        """The profile, with the KV pool `mem_frac` of each GPU's memory leaves after the weights (host tier 4x)."""
        if self.mem_frac is None:
            return builtin_profile(self.profile(kernels))
        return builtin_profile(self.profile(kernels), gpu_memory_utilization=self.mem_frac)

    def specs(self, rates: str, seed: int = 0) -> list[workloads.RequestSpec]:
        prompt, output = workloads.paper_lengths(self.lengths)
        output = output.scaled(self.output_scale)
        if self.kind == "burst":
            return workloads.burst(self.num_requests, prompt=prompt, output=output, rates=rates, seed=seed)
        return workloads.gamma(self.num_requests, self.request_rate, self.burstiness, prompt=prompt, output=output,
                               rates=rates, seed=seed)  # fmt: skip


def paper_setups(models: Sequence[str] = ("llama3-8b",)) -> list[PaperSetup]:
    """H200: burst 400 short / 200 long, Poisson 5 and 10 req/s (outputs doubled); RTX 4090: burst 60 short /
    80 long, Poisson 2 and 4 req/s. Poisson runs draw as many short requests as the short burst."""
    setups = []
    for model in models:
        setups += [
            PaperSetup("h200", model, "burst", 400, "short", output_scale=2.0),
            PaperSetup("h200", model, "burst", 200, "long", output_scale=2.0),
            PaperSetup("h200", model, "poisson", 400, "short", 5.0, output_scale=2.0),
            PaperSetup("h200", model, "poisson", 400, "short", 10.0, output_scale=2.0),
        ]
        if model == "llama3-8b":  # Qwen2.5-32B's 65 GB of weights do not fit a 24 GB card
            setups += [
                PaperSetup("rtx4090", model, "burst", 60, "short"),
                PaperSetup("rtx4090", model, "burst", 80, "long"),
                PaperSetup("rtx4090", model, "poisson", 60, "short", 2.0),
                PaperSetup("rtx4090", model, "poisson", 60, "short", 4.0),
            ]
    return setups


def multi_device_setups() -> list[PaperSetup]:
    """Setups whose weights one GPU cannot hold, for `--tensor-parallel-size`: Qwen2.5-32B at the paper's H200
    mem-frac 0.3 (65.5 GB of weights in 42 GB: 2 GPUs), on RTX 4090s (24 GB: 4 GPUs), and Llama-3-70B on H200s
    (141 GB of weights: 2 GPUs). Bursts as the paper's, outputs doubled on the H200."""
    return [
        PaperSetup("h200", "qwen2.5-32b", "burst", 400, "short", output_scale=2.0, mem_frac=0.3),
        PaperSetup("rtx4090", "qwen2.5-32b", "burst", 60, "short"),
        PaperSetup("rtx4090", "qwen2.5-32b", "burst", 80, "long"),
        PaperSetup("h200", "llama3-70b", "burst", 400, "short", output_scale=2.0),
    ]


def default_plan(full: bool) -> list[tuple[PaperSetup, str]]:
    """(setup, rate mix) pairs: everything with --full, else the representative subset."""
    if full:
        return [(s, r) for s in paper_setups(("llama3-8b", "qwen2.5-32b")) for r in RATE_MIXES]
    plan = [(s, r) for s in paper_setups() for r in SUBSET_RATES]
    return plan + [(s, "20") for s in paper_setups(("qwen2.5-32b",)) if s.kind == "burst"]


def available_policies(names: Sequence[str] = POLICIES) -> list[str]:
    found = []
    for name in names:
        try:
            make_policy(name)
        except ValueError:
            continue
        found.append(name)
    return found


def run_one(
    setup: PaperSetup,
    rates: str,
    policy: str,
    kernels: str,
    seed: int = 0,
    preemption: str = "auto",
    executor_options: tuple[tuple[str, Any], ...] = (),
) -> dict[str, Any]:
    """One replay on the simulator; the summary plus what the comparison needs, and the workload's bounds on
    this executor (`bench.bounds`). `preemption` and `executor_options` (SimExecutor keywords) switch parts of
    the system off for the ablation."""
    executor = SimExecutor(setup.sim_profile(kernels), max_model_len=MAX_MODEL_LEN, **dict(executor_options))
    core = EngineCore(executor, make_policy(policy), preemption=preemption)
    specs = setup.specs(rates, seed)
    t0 = time.perf_counter()
    records = replay(core, specs, progress=False)
    wall = time.perf_counter() - t0
    summary = summarize(records, swap_bytes_out=core.bytes_to_host, swap_bytes_in=core.bytes_to_device,
                        scheduler_times_s=core.scheduler_times_s)  # fmt: skip
    log = getattr(core.policy, "decision_log", None)
    return {
        "setup": setup.name, "rates": rates, "policy": policy, "kernels": kernels, "wall_s": wall,
        "sim_s": executor.now(), "steps": executor.steps, "held_s": executor.held_s,
        "playback_s": {r.request_id: r.output_len / r.rate for r in records if r.completed and r.rate is not None},
        "decision_count": getattr(core.policy, "decisions", None),
        "decision_log": None if log is None else list(log),  # (live requests, seconds) per tokenflow decision
        "bound": workload_bounds(specs, StepCosts.of_executor(executor)).as_dict(),
        "preemption": preemption, "executor_options": dict(executor_options), "num_requests": len(specs),
        **{k: v for k, v in summary.items() if k not in ("ttfts", "itls", "qoes")},
    }  # fmt: skip


def max_rebuffer_increase(run: dict[str, Any], baseline: dict[str, Any]) -> float:
    """Largest per-request rebuffer increase over the baseline, as a share of that request's playback time
    (L / r): 0.10 means some reader stalls 10% of its stream longer than under fcfs."""
    base = dict(zip(baseline["request_ids"], baseline["rebuffer_per_request_s"], strict=True))
    worst = 0.0
    for rid, rebuffer in zip(run["request_ids"], run["rebuffer_per_request_s"], strict=True):
        if rid in base and rid in run["playback_s"]:  # (a rate-less request has no playback, and no stall)
            worst = max(worst, (rebuffer - base[rid]) / run["playback_s"][rid])
    return worst


def comparison_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per policy: the headline numbers and their ratios to fcfs."""
    base = next(r for r in runs if r["policy"] == "fcfs")

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

    return [{
        "policy": r["policy"],
        "effective_throughput": r["effective_throughput"],
        "effective_x": ratio(r["effective_throughput"], base["effective_throughput"]),
        "p99_ttft_s": r["p99_ttft_ms"] / 1e3,
        "p99_ttft_x": ratio(r["p99_ttft_ms"], base["p99_ttft_ms"]),
        "output_throughput": r["output_throughput"],
        "output_x": ratio(r["output_throughput"], base["output_throughput"]),
        "max_rebuffer_increase": max_rebuffer_increase(r, base),
        "rebuffer_s": r["rebuffer_s"],
        "preemptions": f"{r['preemptions_swap']}/{r['preemptions_recompute']}",
        "scheduler_ms": r["mean_scheduler_time_ms"],
    } for r in runs]  # fmt: skip


def format_table(title: str, rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"#### {title}", "",
             "| policy | effective tok/s | x fcfs | P99 TTFT s | x fcfs | output tok/s | x fcfs | max rebuffer increase"
             " | total rebuffer s | preemptions swap/recompute | scheduler ms/iter |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['effective_throughput']:.0f} | {r['effective_x']:.2f} | {r['p99_ttft_s']:.1f} | "
            f"{r['p99_ttft_x']:.2f} | {r['output_throughput']:.0f} | {r['output_x']:.2f} | "
            f"{100 * r['max_rebuffer_increase']:.1f}% | {r['rebuffer_s']:.0f} | {r['preemptions']} | "
            f"{r['scheduler_ms']:.2f} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


NO_HARM = (
    "token and effective throughput >= 0.97x fcfs, P99 TTFT <= 1.05x, no request rebuffering more than 10% of "
    "its playback time beyond fcfs"
)


def harms(row: dict[str, Any]) -> list[str]:
    """Which of the do-no-harm rules (`NO_HARM`) a tokenflow row breaks against fcfs."""
    broken = []
    if not row["output_x"] >= 0.97:
        broken.append(f"tokens {row['output_x']:.2f}x")
    if not row["effective_x"] >= 0.97:
        broken.append(f"effective {row['effective_x']:.2f}x")
    if not row["p99_ttft_x"] <= 1.05:
        broken.append(f"P99 TTFT {row['p99_ttft_x']:.2f}x")
    if row["max_rebuffer_increase"] > 0.10:
        broken.append(f"rebuffer +{100 * row['max_rebuffer_increase']:.0f}%")
    return broken


def meets_targets(row: dict[str, Any]) -> list[str]:
    """Which of the TokenFlow targets (`TARGETS`) a tokenflow row misses."""
    misses = []
    if not row["effective_x"] >= 1.8:
        misses.append(f"effective {row['effective_x']:.2f}x < 1.8x")
    if not row["p99_ttft_x"] <= 0.2:
        misses.append(f"P99 TTFT {row['p99_ttft_x']:.2f}x > 0.2x")
    if not row["output_x"] >= 0.97:
        misses.append(f"token throughput {row['output_x']:.2f}x < 0.97x")
    if row["max_rebuffer_increase"] > 0.10:
        misses.append(f"rebuffer +{100 * row['max_rebuffer_increase']:.0f}% > 10%")
    return misses


def decision_benchmark(
    num_requests: int = 256,
    repeats: int = 500,
    device_pages: int | None = None,
    staggered: bool = False,
    steps_between: int = 0,
) -> dict[str, Any]:
    """Seconds of one full tokenflow decision (`rebalance`) with `num_requests` live requests: about half
    running mid-stream, a quarter paused, the rest waiting. `device_pages` shrinks the device pool so that the
    fill must leave requests out (a memory-bound decision: victims, locked checks). A burst leaves the running
    requests with a few distinct buffers; `staggered` admits them a few at a time between steps (Poisson-like
    arrivals), so buffers and arrival times all differ and the ranking sorts distinct keys.

    Back to back, decisions find the CPU caches warm. In a serving loop, engine steps run between decisions and
    evict them: `steps_between` runs that many steps of a second simulated engine (fcfs, topped up with bursts of
    256 so that it always has 200 or more live requests) before each timed decision."""
    from tokenflow_jax.engine.core import EngineCore as Core
    from tokenflow_jax.scheduler.interface import SchedulerState
    from tokenflow_jax.sim.replay import spec_request

    executor = SimExecutor("h200-llama3-8b", max_num_seqs=num_requests, num_device_pages=device_pages)
    policy = make_policy("tokenflow")
    core = Core(executor, make_policy("fcfs"))
    specs = workloads.burst(num_requests, rates="15:0.4,20:0.6", seed=1)
    started = specs[: 3 * num_requests // 4]
    per_step = 3 if staggered else len(started)
    for first in range(0, len(started), per_step):
        for spec in started[first : first + per_step]:
            core.add_request(spec_request(spec, executor.now()))
        if staggered:
            core.step()
    for _ in range(60):
        core.step()
    for req in core.running[::3][: num_requests // 4]:
        executor.swap_out(req)
        req.status = type(req.status).PAUSED
    for spec in specs[3 * num_requests // 4 :]:
        core.add_request(spec_request(spec, executor.now()))
    state = SchedulerState(executor.now(), core.waiting, core.running, core.paused, core.tracker, executor)
    est = executor.estimates()
    other = Core(SimExecutor("h200-llama3-8b"), make_policy("fcfs"))
    bursts = 0
    times, victims = [], 0
    for _ in range(repeats):
        for _ in range(steps_between):
            if len(other.running) + len(other.waiting) < 200:  # keep it busy: a drained engine steps for free
                bursts += 1
                for spec in workloads.burst(256, seed=1 + bursts):
                    other.add_request(spec_request(dataclasses.replace(spec, request_id=f"{bursts}-{spec.request_id}"),
                                                   other.executor.now()))  # fmt: skip
            other.step()
        t0 = time.perf_counter()
        victims = len(policy.rebalance(state, est).victims)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"requests": len(core.requests), "running": len(state.running), "paused": len(state.paused),
            "waiting": len(state.waiting), "device_pages": executor.num_device_pages, "victims": victims,
            "kept": len(policy.decision.running), "min_ms": 1e3 * times[0], "median_ms": 1e3 * statistics.median(times),
            "p90_ms": 1e3 * times[int(0.9 * len(times))]}  # fmt: skip


def decisions_in_replay(
    setup_name: str = "h200 llama3-8b burst 400 short", rates: str = "15:0.4,20:0.6", live: tuple[int, int] = (192, 320)
) -> dict[str, Any]:
    """Seconds per tokenflow decision as they ran in a simulated replay of a paper setup (engine steps, and the
    cache misses they leave, between decisions), over the decisions that saw `live` requests (lo, hi)."""
    setup = next(s for s in paper_setups(("llama3-8b", "qwen2.5-32b")) if s.name == setup_name)
    log = run_one(setup, rates, "tokenflow", "roofline")["decision_log"]
    times = sorted(t for n, t in log if live[0] <= n < live[1])
    if not times:
        raise ValueError(f"no decision in {setup_name} saw {live[0]}-{live[1] - 1} live requests")
    return {"setup": setup_name, "rates": rates, "live": f"{live[0]}-{live[1] - 1}", "decisions": len(times),
            "all_decisions": len(log), "min_ms": 1e3 * times[0], "median_ms": 1e3 * statistics.median(times),
            "p90_ms": 1e3 * times[int(0.9 * len(times))]}  # fmt: skip


def run_sweep(plan: Sequence[tuple[PaperSetup, str]], kernels: str, jobs: int, policies: Sequence[str]) -> list[dict]:
    tasks = [(setup, rates, policy, kernels) for setup, rates in plan for policy in policies]
    results: list[dict] = []
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        futures = [pool.submit(run_one, *task) for task in tasks]
        for future in as_completed(futures):
            try:
                r = future.result()
            except Exception as e:  # one broken run should not sink the sweep
                print(f"run failed: {e!r}", file=sys.stderr)
                continue
            results.append(r)
            print(f"[{len(results)}/{len(tasks)}] {r['setup']} {r['rates']} {r['policy']}: {r['wall_s']:.0f} s wall, "
                  f"{r['sim_s']:.0f} s simulated", file=sys.stderr)  # fmt: skip
    return results


PAPER = (
    "Paper, TokenFlow vs SGLang (its best setups; per-setup figures are not published): effective throughput "
    "up to 1.825x, P99 TTFT down to 0.198x, token throughput kept"
)


def versus(rows: Sequence[dict[str, Any]], baseline: str) -> dict[str, float] | None:
    """tokenflow's effective throughput, P99 TTFT and token throughput as ratios to `baseline`'s row."""
    tf = next((r for r in rows if r["policy"] == "tokenflow"), None)
    base = next((r for r in rows if r["policy"] == baseline), None)
    if tf is None or base is None:
        return None
    keys = {"effective": "effective_throughput", "p99_ttft": "p99_ttft_s", "tokens": "output_throughput"}
    return {k: tf[v] / base[v] if base[v] else math.nan for k, v in keys.items()}


def report(results: Sequence[dict[str, Any]], plan: Sequence[tuple[PaperSetup, str]], kernels: str) -> str:
    """One table per (setup, rate mix), each followed by tokenflow against the targets and against SGLang (the
    paper's baseline), after a summary of tokenflow's ratios everywhere."""
    tables, summary, harmed, compared = [], [], [], 0
    for setup, rates in plan:
        runs = [r for r in results if r["setup"] == setup.name and r["rates"] == rates]
        if not any(r["policy"] == "fcfs" for r in runs):
            tables.append(f"#### {setup.name}, rates {rates} tok/s: no fcfs baseline (run failed)\n")
            continue
        rows = comparison_rows(runs)
        tables.append(format_table(f"{setup.name}, rates {rates} tok/s (profile {setup.profile(kernels)})", rows))
        tf = next((r for r in rows if r["policy"] == "tokenflow"), None)
        if tf is None:
            continue
        misses = meets_targets(tf)
        compared += 1
        if broken := harms(tf):
            harmed.append(f"{setup.name} at {rates}: {', '.join(broken)}")
        vs = versus(rows, "sglang")
        vs_text = ("Against sglang (the paper's baseline): effective {effective:.2f}x, P99 TTFT {p99_ttft:.2f}x, "
                   "tokens {tokens:.2f}x.".format(**vs) if vs else "No sglang run.")  # fmt: skip
        tables.append(f"tokenflow: {'meets every target' if not misses else 'misses ' + '; '.join(misses)}. "
                      f"{vs_text}\n")  # fmt: skip
        missed = ", ".join(m.split(" ")[0].replace("P99", "P99 TTFT").replace("token", "tokens") for m in misses)
        vs_cell = f"{vs['effective']:.2f} / {vs['p99_ttft']:.2f} / {vs['tokens']:.2f}" if vs else "-"
        summary.append(f"| {setup.name} | {rates} | {tf['effective_x']:.2f} | {tf['p99_ttft_x']:.2f} | "
                       f"{tf['output_x']:.2f} | {100 * tf['max_rebuffer_increase']:+.1f}% | {vs_cell} | "
                       f"{tf['preemptions']} | {missed or 'none'} |")  # fmt: skip
    if any(r["rateless_completed"] for r in results):
        tables = [mixed_traffic_table(results, plan), ""] + tables
    head = [f"### Paper setups on the simulator ({kernels} kernels)", "", f"Targets: {TARGETS}. {PAPER}.", "",
            "| setup | rates tok/s | effective x fcfs | P99 TTFT x fcfs | tokens x fcfs | max rebuffer increase | "
            "vs sglang: effective / P99 TTFT / tokens | swaps/recomputes | targets missed |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    no_harm = [f"Do no harm ({NO_HARM}): holds on {compared - len(harmed)} of {compared} setup x rate pairs.",
               *(f"- breaks on {h}" for h in harmed), ""]  # fmt: skip
    return "\n".join(head + summary + [""] + no_harm + tables)


MIXED_TARGETS = ("streams' P99 TTFT <= fcfs's, streams' rebuffer <= 10% of their playback time, rate-less P99 "
                 "end-to-end latency <= 1.2x fcfs's, token throughput >= 0.97x fcfs's")  # fmt: skip


def mixed_traffic_table(results: Sequence[dict[str, Any]], plan: Sequence[tuple[PaperSetup, str]]) -> str:
    """tokenflow against fcfs per (setup, mix), the streams and the rate-less requests apart (`MIXED_TARGETS`)."""
    lines = [f"#### Mixed traffic: streams and rate-less requests (targets: {MIXED_TARGETS})", "",
             "| setup | rates | stream P99 TTFT s (x fcfs) | stream rebuffer / playback (fcfs) "
             "| rate-less P99 E2E s (x fcfs) | tokens x fcfs | targets missed |",
             "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    note = ("The tables below count every request, rate-less ones included, in P99 TTFT and the do-no-harm rule; "
            "a rate-less request's target is its end-to-end latency, not its first token.")  # fmt: skip
    for setup, rates in plan:
        runs = {r["policy"]: r for r in results if r["setup"] == setup.name and r["rates"] == rates}
        tf, base = runs.get("tokenflow"), runs.get("fcfs")
        if tf is None or base is None:
            continue
        keys = ("p99_stream_ttft_ms", "p99_rateless_e2el_ms", "output_throughput")
        ttft_x, e2e_x, tokens_x = (tf[k] / base[k] if base[k] else math.nan for k in keys)
        share, base_share = (r["stream_rebuffer_s"] / r["stream_playback_s"] if r["stream_playback_s"] else 0.0
                             for r in (tf, base))  # fmt: skip
        missed = [name for name, ok in (("TTFT", ttft_x <= 1.0), ("rebuffer", share <= 0.10), ("E2E", e2e_x <= 1.2),
                                        ("tokens", tokens_x >= 0.97)) if not ok]  # fmt: skip
        lines.append(f"| {setup.name} | {rates} | {tf['p99_stream_ttft_ms'] / 1e3:.1f} ({ttft_x:.2f}) | "
                     f"{100 * share:.1f}% ({100 * base_share:.1f}%) | "
                     f"{tf['p99_rateless_e2el_ms'] / 1e3:.1f} ({e2e_x:.2f}) | {tokens_x:.2f} | "
                     f"{', '.join(missed) or 'none'} |")  # fmt: skip
    return "\n".join([*lines, "", note]) + "\n"
