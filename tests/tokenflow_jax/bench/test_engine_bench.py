"""The engine benchmark runs on CPU and fits a simulator profile that the simulator then runs on."""

from __future__ import annotations

import json

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
