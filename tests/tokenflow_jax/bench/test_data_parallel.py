"""`python -m tokenflow_jax.bench --data-parallel-size 2` at CI size on the 4 CPU devices: every policy runs the
workload split over two replicas by the server's router, and the per-replica figures add up to the whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.tokenflow_jax.bench.test_schedulers import CI_ARGS, N

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def replicated_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("dp_bench")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.setdefault("TOKENFLOW_JAX_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tokenflow_jax_test_xla"))
    cmd = [sys.executable, "-m", "tokenflow_jax.bench", "--data-parallel-size", "2", *CI_ARGS,
           "--schedulers", "tokenflow,fcfs", "--out", str(out), "--no-plots"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), done.stdout


def test_each_policy_completes_the_workload_over_both_replicas(replicated_run: tuple[dict, str]) -> None:
    results, stdout = replicated_run
    assert list(results) == ["tokenflow", "fcfs"]
    for entry in results.values():
        total, replicas = entry["metrics"], entry["replicas"]
        assert entry["config"]["data_parallel_size"] == 2 and len(replicas) == 2
        assert total["completed"] == N and total["failed"] == 0
        assert total["total_output_tokens"] == entry["config"]["total_output_tokens"]
        # The router gave both replicas work (a burst of equal streams: the spare capacities stay close).
        assert all(r["requests_routed"] >= 1 for r in replicas)
        # Each replica's figures come from its own records; together they are the whole run's.
        for key in ("completed", "total_output_tokens", "preemptions_swap", "preemptions_recompute"):
            assert sum(r[key] for r in replicas) == total[key], key
        assert sorted(t for r in replicas for t in r["ttfts"]) == pytest.approx(sorted(total["ttfts"]))
    assert "per replica" in stdout and "tokenflow r1" in stdout and "fcfs r0" in stdout


def test_too_few_devices_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "tokenflow_jax.bench", "--data-parallel-size", "3", "--tensor-parallel-size", "2",
           *CI_ARGS, "--schedulers", "fcfs", "--no-plots", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "data_parallel_size 3 x tensor_parallel_size 2 needs 6 devices, 4 available" in done.stderr
    assert "Traceback" not in done.stderr
