"""The streaming bench over data-parallel replicas (`python -m tokenflow_jax.bench --data-parallel-size M`).

Each replica is a whole engine on its own `--tensor-parallel-size` devices, its `EngineCore` stepped on its own
thread as the server's engine threads do. The workload's requests are released at their arrival times (wall
clock) and each joins the replica `scheduler.routing.pick_replica` chooses from every replica's live requests and
measured decode capacity, the server's rule. Every figure comes from `metrics.summarize`, per replica and over
the whole workload; the table shows both and results.json keeps both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

from tokenflow_jax.bench.results import SchedulerRun
from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.engine.executor import EngineExecutor
from tokenflow_jax.metrics import RequestRecord, summarize
from tokenflow_jax.request import Request
from tokenflow_jax.scheduler.registry import make_policy
from tokenflow_jax.scheduler.routing import ReplicaLoad, pick_replica
from tokenflow_jax.sim.replay import IDLE_TICK_S, spec_request
from tokenflow_jax.workloads import RequestSpec


class ReplicaWorker:
    """One replica's core on its own thread; the router hands it requests through an inbox."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._wake = threading.Condition()
        self._inbox: list[Request] = []  # guarded by _wake
        self._live: dict[str, float | None] = {}  # routed and unfinished: rate (guarded by _wake)
        self._closing = False
        self.capacity_tok_s = 0.0  # published after each step; 0 before a decode step is measured
        self.routed = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-replica", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def load(self) -> ReplicaLoad:
        with self._wake:
            rates = list(self._live.values())
        return ReplicaLoad.of(rates, self.capacity_tok_s, self.core.executor.max_num_seqs)

    def submit(self, request: Request) -> None:
        with self._wake:
            self._live[request.request_id] = request.rate
            self._inbox.append(request)
            self.routed += 1
            self._wake.notify()

    def close(self) -> None:
        """Finish what it holds, then stop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"a replica failed: {self.error}") from self.error

    def _run(self) -> None:
        core, executor = self.core, self.core.executor
        try:
            while True:
                with self._wake:
                    while not (self._inbox or self._closing or core.has_work()):
                        self._wake.wait()
                    arrived, self._inbox = self._inbox, []
                    if not arrived and self._closing and not core.has_work():
                        return
                for request in arrived:
                    core.add_request(request)
                core.step()
                finished = [rid for rid in self._live if rid in core.records]
                with self._wake:
                    for rid in finished:
                        del self._live[rid]
                if executor.decode_model.samples:
                    self.capacity_tok_s = executor.estimates().decode_capacity_tok_s
                if not core.last_step_moved:
                    time.sleep(IDLE_TICK_S)  # a policy holding everyone back: let the clock run
        except BaseException as e:  # reported by close()
            self.error = e


def build_replicas(args: argparse.Namespace, limits: dict[str, int]) -> tuple[list[EngineExecutor], frozenset[int]]:
    """One engine per device group (`engine.replicas.replica_devices`), each with `limits`' pools."""
    from tokenflow_jax.engine.llm import LLM
    from tokenflow_jax.engine.replicas import replica_devices

    pools = {k: limits[k] for k in ("page_size", "max_num_seqs", "max_batch_tokens", "max_model_len")}
    try:
        groups = replica_devices(args.data_parallel_size, args.tensor_parallel_size)
        llms = [LLM(args.model, scheduler="fcfs", kv_pages=limits["kv_pages"], host_kv_pages=limits["host_kv_pages"],
                    seed=args.seed, tensor_parallel_size=args.tensor_parallel_size, devices=devices, warmup=True,
                    progress=args.progress, **pools) for devices in groups]  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    return [llm.executor for llm in llms], frozenset(llms[0].tokenizer.eos_token_ids)


def run_replicated(
    executors: Sequence[EngineExecutor], name: str, specs: Sequence[RequestSpec], *, eos: frozenset[int],
    preemption: str, config: dict[str, Any] | None, seed: int, prefix_caching: bool,
) -> tuple[SchedulerRun, list[SchedulerRun]]:  # fmt: skip
    """Replay `specs` under policy `name` on every replica at once, routed as the server routes; the whole run
    and each replica's share."""
    workers = []
    for executor in executors:
        policy = make_policy(name, **(config or {}))
        executor.write_through_enabled = policy.uses_write_through and executor.num_host_pages > 0
        executor.reset_prefix_cache(prefix_caching)
        workers.append(ReplicaWorker(EngineCore(executor, policy, eos_token_ids=eos, preemption=preemption)))
    wall0 = time.perf_counter()
    for worker in workers:
        worker.start()
    t0 = executors[0].now()
    for spec in sorted(specs, key=lambda s: s.arrival):
        time.sleep(max(0.0, t0 + spec.arrival - executors[0].now()))
        chosen = pick_replica([worker.load() for worker in workers])
        workers[chosen].submit(spec_request(spec, t0 + spec.arrival, seed=seed))
    for worker in workers:
        worker.close()
    wall = time.perf_counter() - wall0
    order = {s.request_id: i for i, s in enumerate(specs)}
    shares = []
    for i, worker in enumerate(workers):
        records = sorted(worker.core.records.values(), key=lambda r: order[r.request_id])
        shares.append(_run(f"{name} r{i}", records, [worker.core], t0, wall))
    records = sorted((r for run in shares for r in run.records), key=lambda r: order[r.request_id])
    return _run(name, records, [w.core for w in workers], t0, wall), shares


def _run(label: str, records: list[RequestRecord], cores: Sequence[EngineCore], t0: float, wall: float) -> SchedulerRun:
    prefix = [sum(x) for x in zip(*(dataclasses.astuple(c.prefix_cache) for c in cores), strict=True)]
    summary = summarize(records, swap_bytes_out=sum(c.bytes_to_host for c in cores),
                        swap_bytes_in=sum(c.bytes_to_device for c in cores),
                        scheduler_times_s=[t for c in cores for t in c.scheduler_times_s],
                        prefix_cache=(prefix[0], prefix[1], prefix[2]))  # fmt: skip
    summary["requests_routed"] = len(records)
    return SchedulerRun(label, records, summary, t0, wall)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The bench at `--data-parallel-size` M: each policy over M replicas; the tables and results.json."""
    from tokenflow_jax.bench.schedulers import (
        build_parser,
        engine_limits,
        format_table,
        run_setup,
        workload_specs,
        write_results,
    )

    args = build_parser().parse_args(argv)
    if args.executor != "engine" or args.paper_setup or args.repeats != 1 or args.compare_prefix_caching:
        raise SystemExit("--data-parallel-size runs the real engine once per scheduler: no --executor sim, "
                         "--paper-setup, --repeats or --compare-prefix-caching")  # fmt: skip
    specs = workload_specs(args)
    if not specs:
        raise SystemExit("the workload is empty")
    limits = engine_limits(args, specs)
    names, out, config = run_setup(args, specs, limits)
    print(
        f"{len(specs)} requests ({args.workload}) over {args.data_parallel_size} replicas, schedulers "
        f"{', '.join(names)}, {limits['kv_pages']} device / {limits['host_kv_pages']} host KV pages per replica"
    )
    t0 = time.perf_counter()
    executors, eos = build_replicas(args, limits)
    print(f"{len(executors)} replicas ready in {time.perf_counter() - t0:.1f} s")
    configs = json.loads(args.scheduler_config)
    if args.max_hold_s is not None:
        configs = {n: {"max_hold_s": args.max_hold_s, **configs.get(n, {})} for n in names}
    totals, shares = [], []
    for name in names:
        total, replicas = run_replicated(executors, name, specs, eos=eos, preemption=args.preemption,
                                         config=configs.get(name), seed=args.seed,
                                         prefix_caching=args.enable_prefix_caching)  # fmt: skip
        totals.append(total)
        shares.extend(replicas)
    table = (f"whole workload over {len(executors)} replicas:\n{format_table(totals)}\n\n"
             f"per replica (each with the pools above):\n{format_table(shares)}")  # fmt: skip
    print(table)
    (out / "table.txt").write_text(table + "\n")
    per_replica = {t.name: {"replicas": [s.summary for s in shares if s.name.startswith(f"{t.name} r")]}
                   for t in totals}  # fmt: skip
    write_results(out, totals, config, per_replica)
    print(f"wrote {out}/ in {time.perf_counter() - t0:.1f} s total")
    return {run.name: {**run.summary, "replicas": per_replica[run.name]["replicas"]} for run in totals}
