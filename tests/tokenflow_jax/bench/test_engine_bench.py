"""The engine benchmark runs on CPU and fits a simulator profile that the simulator then runs on."""

from __future__ import annotations

import json
import math
import statistics

from tokenflow_jax.bench import engine_bench
from tokenflow_jax.sim.executor import SimExecutor
from tokenflow_jax.sim.profiles import load_profile


def test_engine_bench_measures_and_writes_a_profile_the_simulator_loads(tmp_path) -> None:
    out, profile_path = tmp_path / "engine.json", tmp_path / "profile.json"
    engine_bench.main(["--batches", "4,8", "--context", "64", "--swap-pages", "8,16", "--repeats", "2",
                       "--offline-requests", "0", "--out", str(out), "--profile-out", str(profile_path)])  # fmt: skip
    result = json.loads(out.read_text())
    assert [d["batch"] for d in result["decode"]] == [4, 8]
    assert all(d["step_ms"] > 0 and d["step_ms_write_through"] > 0 for d in result["decode"])
    assert all(0 < d["host_batch_ms"] < d["step_ms"] for d in result["decode"])  # a part of the step
    assert all(s["d2h_GBps"] > 0 and s["h2d_GBps"] > 0 for s in result["swap"])
    profile = load_profile(profile_path)
    # tiny in float32: 2 layers x K/V x 2 KV heads x 32 dims x 4 bytes per token.
    assert profile.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4
    assert profile.step_time(8, 8 * 64) > 0 and profile.d2h_bytes_per_s > 0 and profile.h2d_bytes_per_s > 0
    sim = SimExecutor(str(profile_path), num_device_pages=64, num_host_pages=64, page_size=16, max_num_seqs=8,
                      max_batch_tokens=64, max_model_len=256)  # fmt: skip
    assert sim.estimates().decode_step_model == (profile.step_base_s, profile.step_per_token_s,
                                                  profile.step_per_context_token_s)  # fmt: skip


def test_sim_vs_engine_prints_the_simulators_error_on_every_figure(tmp_path, capsys) -> None:
    from tests.tokenflow_jax.bench.test_schedulers import CI_ARGS
    from tokenflow_jax.bench import sim_vs_engine

    profile = tmp_path / "profile.json"
    engine_bench.main(["--batches", "4,8", "--context", "64", "--swap-pages", "8,16", "--repeats", "2",
                       "--offline-requests", "0", "--profile-out", str(profile)])  # fmt: skip
    out = tmp_path / "errors.json"
    table = sim_vs_engine.main(["--profile", str(profile), "--schedulers", "fcfs,tokenflow", "--json", str(out),
                                "--", *CI_ARGS])  # fmt: skip
    assert list(table) == [sim_vs_engine.ISOLATED, sim_vs_engine.SERVING_LOOP]
    saved = json.loads(out.read_text())
    # Each policy's engine steps were recorded and refitted: a cost model of its own, every term >= 0, that
    # charges the recorded steps' total time back (exactly but for dropped compile-sized steps).
    run = saved["run"]
    assert len(run["load_average"]) == 2 and set(run["step_costs"]) == {sim_vs_engine.ISOLATED, "fcfs", "tokenflow"}
    for name in ("fcfs", "tokenflow"):
        records, cost = run["step_records"][name], run["step_costs"][name]
        assert run["steps_recorded"][name] == len(records) > 0 and all(v >= 0 for v in cost.values())
        a, *terms = (cost[k] for k in sim_vs_engine.COEFFICIENTS)
        kept = [r for r in records if r[4] <= 20 * statistics.median(s[4] for s in records)]
        predicted = sum(a + sum(c * t for c, t in zip(terms, r[:4], strict=True)) for r in kept)
        assert math.isclose(predicted, sum(r[4] for r in kept), rel_tol=0.05)
    for figures_by_policy in table.values():
        assert list(figures_by_policy) == ["fcfs", "tokenflow"]
        for figures in figures_by_policy.values():
            for key, _ in sim_vs_engine.FIGURES:
                f = figures[key]
                assert f["engine"] >= 0 and f["sim"] >= 0
                if f["engine"]:
                    assert math.isclose(f["error"], f["sim"] / f["engine"] - 1)
        # fcfs never swaps, on either executor.
        assert figures_by_policy["fcfs"]["preemptions_swap"] == {"engine": 0, "sim": 0, "error": 0.0}
    printed = capsys.readouterr().out
    assert "| fcfs |" in printed and "Within 15%:" in printed and "load average" in printed
    assert saved["profile"]["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4
    # Replaying the saved engine run (no engine) refits and simulates it to the same figures.
    assert sim_vs_engine.main(["--engine-run", str(out), "--", *CI_ARGS]) == table
