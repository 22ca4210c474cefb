"""The paper's setups (docs/REFERENCE.md) and their report, on the simulator."""

from __future__ import annotations

import math

import pytest

from tokenflow_jax.bench import paper_setups as ps


def test_the_full_plan_covers_every_setup_and_rate_mix_of_the_paper():
    plan = ps.default_plan(full=True)
    names = {s.name for s, _ in plan}
    assert names == {
        *(f"h200 {m} {a}" for m in ("llama3-8b", "qwen2.5-32b")
          for a in ("burst 400 short", "burst 200 long", "poisson 5/s 400 short", "poisson 10/s 400 short")),
        *(f"rtx4090 llama3-8b {a}" for a in ("burst 60 short", "burst 80 long", "poisson 2/s 60 short",
                                             "poisson 4/s 60 short")),
    }  # fmt: skip
    assert {r for _, r in plan} == {"20", "25", "30", "15:0.4,20:0.6"} and len(plan) == 12 * 4
    h200_long = next(s for s, _ in plan if s.name == "h200 llama3-8b burst 200 long")
    specs = h200_long.specs("15:0.4,20:0.6")
    assert len(specs) == 200 and all(s.arrival == 0 for s in specs)
    # Long = input ~1024, output ~2048, doubled on the H200; 40% of readers at 15 tok/s, 60% at 20.
    assert 3600 < sum(s.output_len for s in specs) / 200 < 4600
    assert 0.3 < sum(s.rate == 15 for s in specs) / 200 < 0.5 and {s.rate for s in specs} == {15.0, 20.0}
    poisson = next(s for s, _ in plan if s.name == "rtx4090 llama3-8b poisson 4/s 60 short").specs("20")
    gaps = [b.arrival - a.arrival for a, b in zip(poisson, poisson[1:], strict=False)]
    assert len(poisson) == 60 and 0.15 < sum(gaps) / len(gaps) < 0.40  # ~1/4 s apart


def test_a_setup_runs_and_reports_one_table_with_ratios_to_fcfs():
    setup = next(s for s in ps.paper_setups() if s.name == "rtx4090 llama3-8b burst 60 short")
    runs = [ps.run_one(setup, "20", policy, "roofline") for policy in ("fcfs", "tokenflow", "sglang")]
    for run in runs:  # the same 60 requests run to their lengths under each policy
        assert run["completed"] == 60 and run["total_output_tokens"] == runs[0]["total_output_tokens"] > 50_000
    assert runs[1]["preemptions_swap"] > 0 and runs[0]["preemptions_swap"] == 0  # fcfs never swaps
    log = runs[1]["decision_log"]  # tokenflow's decisions as they ran: (live requests, seconds)
    assert len(log) == runs[1]["decision_count"] > 0 and all(0 < n <= 60 and 0 < t < 1 for n, t in log)
    assert runs[0]["decision_log"] is None  # fcfs makes no decisions of that kind
    text = ps.report(runs, [(setup, "20")], "roofline")
    assert "#### rtx4090 llama3-8b burst 60 short, rates 20 tok/s (profile rtx4090-llama3-8b-roofline)" in text
    fcfs_row = next(line for line in text.splitlines() if line.startswith("| fcfs |"))
    assert fcfs_row.split("|")[3].strip() == "1.00" and fcfs_row.split("|")[5].strip() == "1.00"
    summary = next(line for line in text.splitlines() if line.startswith("| rtx4090 llama3-8b burst 60 short | 20 |"))
    rows = ps.comparison_rows(runs)
    tf = rows[1]
    assert math.isclose(tf["effective_x"], runs[1]["effective_throughput"] / runs[0]["effective_throughput"])
    assert f"{tf['effective_x']:.2f}" == summary.split("|")[3].strip()
    assert "Against sglang (the paper's baseline)" in text


def test_decision_benchmark_times_both_states():
    fits = ps.decision_benchmark(num_requests=32, repeats=3)
    assert fits["requests"] == 32 and fits["victims"] == 0 and fits["kept"] == 32  # the H200 pool holds all
    assert 0 < fits["min_ms"] <= fits["median_ms"] <= fits["p90_ms"]
    tight = ps.decision_benchmark(num_requests=32, repeats=3, device_pages=400)
    assert tight["kept"] < 32 and tight["device_pages"] == 400  # the fill must leave requests out
    # With staggered arrivals and engine steps between decisions: the same kind of state, decided alike.
    loop = ps.decision_benchmark(num_requests=32, repeats=2, device_pages=400, staggered=True, steps_between=1)
    assert loop["requests"] == 32 and 0 < loop["kept"] < 32 and loop["min_ms"] > 0


def test_decisions_in_replay_reports_the_decisions_that_saw_that_many_live_requests():
    run = ps.decisions_in_replay("rtx4090 llama3-8b burst 60 short", "20", live=(30, 61))
    assert run["live"] == "30-60" and 0 < run["decisions"] <= run["all_decisions"]
    assert 0 < run["min_ms"] <= run["median_ms"] <= run["p90_ms"]
    with pytest.raises(ValueError, match="no decision"):
        ps.decisions_in_replay("rtx4090 llama3-8b burst 60 short", "20", live=(61, 100))  # never that many live
