"""Realistic bugs, planted one at a time in a copy of the tree: the suite must catch every one.

    python tools/mutants.py [--only NAME] [--list]

Each mutant replaces one exact piece of source text (the run stops if the text is gone: the list must follow
the code) and runs the tests that should catch it in a copy of the committed tree (`git archive HEAD`), with
that copy first on PYTHONPATH. A mutant the tests do not catch is a hole in the suite; the run exits 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that must fail


MUTANTS = [
    Mutant("sampling ignores temperature", "tokenflow_jax/sampling.py",
           "scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]", "scaled = logits",
           ("tests/tokenflow_jax/test_sampling.py",)),
    Mutant("sampling ignores top-k", "tokenflow_jax/sampling.py",
           "k = jnp.where((top_k > 0) & (temperature > 0), jnp.minimum(top_k, vocab), vocab)",
           "k = jnp.full_like(top_k, vocab)",
           ("tests/tokenflow_jax/test_sampling.py",)),
    Mutant("sampling ignores top-p", "tokenflow_jax/sampling.py",
           "keep_sorted = mass_before < top_p[:, None]", "keep_sorted = mass_before < 2.0",
           ("tests/tokenflow_jax/test_sampling.py",)),
    Mutant("a disconnect no longer aborts", "tokenflow_jax/engine/async_engine.py",
           "        if not self.finished:\n            self.engine.abort(self.request_id)",
           "        pass",
           ("tests/serving/test_server.py", "-k", "disconnect")),
    Mutant("the reader never waits a period", "tokenflow_jax/reader.py",
           "return generated if previous_read is None else max(generated, previous_read + period)",
           "return generated if previous_read is None else max(generated, previous_read)",
           ("tests/tokenflow_jax/test_metrics.py", "tests/tokenflow_jax/test_tracker.py")),
    Mutant("token weights ramp the wrong way", "tokenflow_jax/reader.py",
           "ramp = unread - tau2", "ramp = tau2 - unread",
           ("tests/tokenflow_jax/test_metrics.py",)),
    Mutant("write-through syncs the smallest buffers first", "tokenflow_jax/scheduler/budget.py",
           "key=unread.__getitem__, reverse=True)", "key=unread.__getitem__, reverse=False)",
           ("tests/tokenflow_jax/scheduler/test_budget.py",)),
    Mutant("a swap the host cannot hold is not reported", "tokenflow_jax/engine/paged_executor.py",
           "fallbacks = [rid for rid in plan.swap_out if not self.swap_out(requests[rid])]",
           "fallbacks = [rid for rid in plan.swap_out if not self.swap_out(requests[rid]) and False]",
           ("tests/tokenflow_jax/sim/test_executor.py",)),
    Mutant("the admission gate ignores mu", "tokenflow_jax/scheduler/tokenflow/decision.py",
           "Gate(est, cfg.mu, lead_s, ", "Gate(est, 1.0, lead_s, ",
           ("tests/tokenflow_jax/scheduler/tokenflow",)),
    Mutant("the gate charges a swap nothing for the steps its copies stretch",
           "tokenflow_jax/scheduler/tokenflow/decision.py",
           "churn_per_page(snap, est, cfg.rotation_share))", "0.0)",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_decision.py",
            "tests/tokenflow_jax/scheduler/tokenflow/test_no_harm.py")),
    Mutant("a swap's per-page cost takes the jitter every step shares", "tokenflow_jax/estimators.py",
           "self.value = max((sums[3] - sums[0] * sums[1] / n) / spread, 0.0)",
           "self.value = max(sums[3] / sums[2], 0.0)",
           ("tests/tokenflow_jax/test_estimators.py", "tests/tokenflow_jax/sim/test_executor.py")),
    Mutant("overloaded newcomers enter by the Gamma of now", "tokenflow_jax/scheduler/tokenflow/decision.py",
           "entry_level = floor if overloaded else", "entry_level = capacity if overloaded else",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_policy.py",
            "tests/tokenflow_jax/scheduler/tokenflow/test_decision.py")),
    Mutant("overloaded newcomers take room the started streams will need back",
           "tokenflow_jax/scheduler/tokenflow/decision.py",
           "entering = entering[: lent_room(", "entering = entering[: len(entering) or lent_room(",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_policy.py",)),
    Mutant("a newcomer that joins an overload takes room it would be starved in",
           "tokenflow_jax/scheduler/tokenflow/decision.py",
           "starved = ((lag > cfg.overload_entry_fraction * playback) & joined)[held:]", "starved = (lag < 0)[held:]",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_policy.py", "-k", "joins_an_overload")),
    Mutant("overloaded newcomers wait for the overload's end however deep the started streams' buffers",
           "tokenflow_jax/scheduler/tokenflow/decision.py",
           "return newcomers[~(enter | overload_fed(snap, newcomers, spare_rate, entry_fraction, entry_share))]",
           "return newcomers[~enter]",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_policy.py", "-k", "leave_it_fed")),
    Mutant("a crowded device lends a burst's newcomers room the overload would starve them in",
           "tokenflow_jax/scheduler/tokenflow/decision.py",
           "joined |= float(snap.pages.sum()) > snap.num_device_pages", "joined |= False",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_no_harm.py", "-k", "long_burst_at_30")),
    Mutant("overloaded newcomers are held out of room however short their queue",
           "tokenflow_jax/scheduler/tokenflow/decision.py",
           "free_room.size - fitting >= fitting - held or", "True or",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_policy.py",)),
    Mutant("short of pages while overloaded, the latest admitted yields", "tokenflow_jax/scheduler/tokenflow/policy.py",
           "return max(running, key=lambda r: (r.arrival, r.request_id))", "return running[-1]",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_policy.py",)),
    Mutant("the allocator hands out the null page", "tokenflow_jax/kv/page_pool.py",
           "self._free = list(range(num_pages - 1, 0, -1))", "self._free = list(range(num_pages - 2, -1, -1))",
           ("tests/tokenflow_jax/kv/test_page_pool.py",)),
    Mutant("the unread buffer counts one token too many", "tokenflow_jax/tracker.py",
           "return generated - bisect.bisect_right(self._read_times, now)",
           "return generated - bisect.bisect_right(self._read_times, now) + 1",
           ("tests/tokenflow_jax/test_tracker.py",)),
    Mutant("a swap-out forgets the unsynced tail", "tokenflow_jax/kv/block_manager.py",
           "        req.num_host_synced = req.num_computed\n        if last <= first:",
           "        req.num_host_synced = req.num_computed\n        last = first\n        if last <= first:",
           ("tests/tokenflow_jax/engine/test_engine.py", "-k", "preempted")),
    Mutant("swap-in restores the pages in the wrong order", "tokenflow_jax/kv/block_manager.py",
           "return PageCopy(req.request_id, req.host_pages[len(cached) : n], new)",
           "return PageCopy(req.request_id, req.host_pages[len(cached) : n][::-1], new)",
           ("tests/tokenflow_jax/engine/test_engine.py", "-k", "preempted")),
    Mutant("write-through counts the page being filled as full", "tokenflow_jax/kv/block_manager.py",
           "full = req.num_computed // self.page_size", "full = pages_for(req.num_computed, self.page_size)",
           ("tests/tokenflow_jax/engine/test_engine.py", "-k", "preempted")),
    Mutant("page count rounds down", "tokenflow_jax/kv/pages.py",
           "return -(-num_tokens // page_size)", "return num_tokens // page_size",
           ("tests/tokenflow_jax/engine/test_engine.py", "-k", "preempted")),
    Mutant("the tracker's columns miss new tokens", "tokenflow_jax/tracker.py",
           "self._data[NUM_GENERATED * capacity + row] += 1.0", "self._data[NUM_GENERATED * capacity + row] += 0.0",
           ("tests/tokenflow_jax/test_tracker.py", "tests/tokenflow_jax/scheduler/tokenflow")),
    Mutant("sampling ignores the seed", "tokenflow_jax/sampling.py",
           "jax.random.fold_in(jax.random.PRNGKey(s), t)", "jax.random.fold_in(jax.random.PRNGKey(0), t)",
           ("tests/tokenflow_jax/engine/test_seeds.py", "-k", "unseeded")),
    Mutant("the sampling key follows the batch row, not the request's step", "tokenflow_jax/engine/paged_executor.py",
           "req.seed, len(req.output_ids)))", "req.seed, len(rows)))",
           ("tests/tokenflow_jax/engine/test_seeds.py", "-k", "fcfs-swap")),
    Mutant("a rate-less request held back max_hold_s still sits the step out",
           "tokenflow_jax/scheduler/tokenflow/rateless_step.py",
           "if step_s + extra_s <= cap_s or tier == 0:", "if step_s + extra_s <= cap_s:",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_rateless_step.py",)),
    Mutant("rate-less requests share every step with the streams", "tokenflow_jax/scheduler/tokenflow/rateless_step.py",
           "if step_s > cap_s:  # the streams alone", "if True:  # the streams alone",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_rateless_step.py",)),
    Mutant("newcomers beyond the room start as fcfs starts them", "tokenflow_jax/scheduler/tokenflow/config.py",
           "wait_beyond_room: bool = True", "wait_beyond_room: bool = False",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_no_harm.py", "-k", "too_late_for_fcfs_way")),
    Mutant("overloaded, equal urgency no longer goes by fcfs's order", "tokenflow_jax/scheduler/tokenflow/config.py",
           "overload_fcfs_order: bool = True", "overload_fcfs_order: bool = False",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_no_harm.py", "-k", "stall_falls_where_fcfs_puts_it")),
    Mutant("where copies stretch the steps, every stream still writes through",
           "tokenflow_jax/scheduler/tokenflow/policy.py",
           "if est.swap_step_per_page_s <= 0:\n            return None", "if True:\n            return None",
           ("tests/tokenflow_jax/scheduler/test_budget.py", "-k", "stretch")),
    Mutant("every started stream paused at once reads as no overload", "tokenflow_jax/scheduler/tokenflow/decision.py",
           "if not snap.holding_kv:  # nothing started yet", "if not snap.num_running:  # nothing started yet",
           ("tests/tokenflow_jax/scheduler/tokenflow/test_policy.py", "-k", "paused_at_once")),
    Mutant("the decode step model clips a negative slope instead of fitting without it",
           "tokenflow_jax/engine/step_model.py",
           "for terms in NNLS_SUBSETS:\n            coef = np.linalg.lstsq(x[:, terms], y, rcond=None)[0]\n"
           "            if (coef < 0).any():\n                continue",
           "for terms in NNLS_SUBSETS[:1]:\n            coef = np.linalg.lstsq(x[:, terms], y, rcond=None)[0]\n"
           "            coef = np.maximum(coef, 0.0)",
           ("tests/tokenflow_jax/engine/test_engine.py", "-k", "non_negative")),
    Mutant("the bench starts each policy from the costs the previous policy's run left",
           "tokenflow_jax/bench/schedulers.py",
           "if own and label in estimators:", "if False:",
           ("tests/tokenflow_jax/bench/test_schedulers.py", "-k", "own_last_run")),
]  # fmt: skip


def copy_of_head(dest: Path) -> None:
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run(mutant: Mutant) -> tuple[bool, float]:
    """(caught, seconds): plant the mutant in a fresh copy and run its tests there."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        copy = Path(tmp)
        copy_of_head(copy)
        target = copy / mutant.path
        source = target.read_text()
        if source.count(mutant.old) != 1:
            raise SystemExit(f"{mutant.name}: the text to replace is not in {mutant.path} exactly once")
        target.write_text(source.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(copy)}
        t0 = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
                                cwd=copy, env=env, capture_output=True, text=True)  # fmt: skip
        return result.returncode != 0, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run the mutants whose name contains this text")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path} -> {' '.join(m.tests)}")
        return 0
    missed = []
    for m in chosen:
        caught, seconds = run(m)
        print(f"{'caught' if caught else 'MISSED'}  {m.name}  ({' '.join(m.tests)}, {seconds:.0f} s)", flush=True)
        if not caught:
            missed.append(m.name)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutants caught")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
