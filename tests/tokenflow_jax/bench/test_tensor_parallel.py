"""`--tensor-parallel-size` on the simulator's command lines: the paper setups and the bench run a model split
over N GPUs, and a model that one GPU cannot hold fails clearly until N is large enough."""

from __future__ import annotations

import json

import pytest

from tokenflow_jax.bench import paper_cli
from tokenflow_jax.bench import schedulers as bench
from tokenflow_jax.sim.profiles import builtin_profile


def test_a_model_one_gpu_cannot_hold_runs_its_paper_setup_on_four(tmp_path) -> None:
    args = ["--setups", "multi-device", "--only", "rtx4090 qwen2.5-32b burst 60 short", "--kernels", "roofline",
            "--policies", "fcfs,tokenflow"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"burst 60 short tp2: .*32.8 GB on each of 2 GPUs\) leave no room for KV"):
        paper_cli.main([*args, "--tensor-parallel-size", "2"])
    text = paper_cli.main([*args, "--tensor-parallel-size", "4", "--json", str(tmp_path / "runs.json")])
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert {r["policy"] for r in runs} == {"fcfs", "tokenflow"}
    assert all(r["setup"] == "rtx4090 qwen2.5-32b burst 60 short tp4" and r["completed"] == 60 for r in runs)
    assert "(profile rtx4090-qwen2.5-32b-roofline-tp4)" in text
    with pytest.raises(SystemExit):  # the ablation has its own setups, on one GPU
        paper_cli.main(["--ablation", "--tensor-parallel-size", "2"])


def test_the_bench_replays_a_paper_setup_on_two_gpus(tmp_path) -> None:
    results = {}
    for n in (1, 2):
        out = tmp_path / f"tp{n}"
        bench.main(["--executor", "sim", "--paper-setup", "rtx4090 llama3-8b burst 60 short", "--sim-kernels",
                    "roofline", "--schedulers", "fcfs,tokenflow", "--tensor-parallel-size", str(n), "--no-plots",
                    "--no-progress", "--out", str(out)])  # fmt: skip
        results[n] = json.loads((out / "results.json").read_text())
    one, two = results[1]["fcfs"], results[2]["fcfs"]
    assert all(r[p]["metrics"]["completed"] == 60 for r in results.values() for p in ("fcfs", "tokenflow"))
    assert two["config"]["tensor_parallel_size"] == 2
    # Two GPUs hold the weights once between them: more than twice the pages, and faster steps.
    assert two["config"]["kv_pages"] == builtin_profile("rtx4090-llama3-8b-roofline-tp2").device_pages(16)
    assert two["config"]["kv_pages"] > 2 * one["config"]["kv_pages"]
    assert two["metrics"]["duration"] < one["metrics"]["duration"]


def test_the_bench_splits_the_engine_and_refuses_what_it_cannot_model(tmp_path) -> None:
    small = ["--num-requests", "2", "--input-len", "8:0", "--output-len", "8:0", "--no-progress", "--no-plots",
             "--out", str(tmp_path)]  # fmt: skip
    # The real engine over 2 of the 4 host devices (tests/conftest.py).
    summaries = bench.main([*small, "--schedulers", "fcfs", "--tensor-parallel-size", "2"])
    assert summaries["fcfs"]["completed"] == 2
    profile = tmp_path / "fitted.json"
    builtin_profile("h100-llama3-8b").save(profile)
    with pytest.raises(SystemExit, match="tensor parallel size 2 needs a built-in profile"):
        bench.main([*small, "--executor", "sim", "--sim-profile", str(profile), "--tensor-parallel-size", "2"])
    with pytest.raises(SystemExit):
        bench.main([*small, "--tensor-parallel-size", "0"])
