"""The benches with rate-less requests in the workload: `--rate-mix ...,none:W` and `--max-hold-s` reach every
policy, and the table, results.json and the paper-setup report show the streams and rate-less requests apart."""

from __future__ import annotations

import json

import pytest

from tokenflow_jax.bench import paper_cli
from tokenflow_jax.bench import schedulers as bench

SIM_ARGS = ["--executor", "sim", "--num-requests", "24", "--input-len", "48:8:64", "--output-len", "64:16:96",
            "--rate-mix", "20:0.5,none:0.5", "--no-plots", "--no-progress"]  # fmt: skip


def test_the_bench_reports_streams_and_rateless_requests_apart(tmp_path, capsys) -> None:
    summaries = bench.main([*SIM_ARGS, "--schedulers", "tokenflow,fcfs,sglang,andes", "--max-hold-s", "3",
                            "--out", str(tmp_path)])  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    for name, summary in summaries.items():
        assert summary["stream_completed"] + summary["rateless_completed"] == summary["completed"] == 24
        assert 0 < summary["rateless_completed"] < 24
        assert summary["p99_rateless_e2el_ms"] >= summary["median_rateless_e2el_ms"] > 0
        assert results[name]["metrics"]["p99_stream_ttft_ms"] == summary["p99_stream_ttft_ms"]
        assert results[name]["config"]["max_hold_s"] == 3
    table = (tmp_path / "table.txt").read_text()
    assert "by class:" in table and "rate-less p99E2E/fcfs" in table
    assert "by class:" in capsys.readouterr().out


def test_a_bad_hold_bound_is_refused_by_every_policy(tmp_path) -> None:
    with pytest.raises(ValueError, match="max_hold_s"):
        bench.main([*SIM_ARGS, "--schedulers", "fcfs", "--max-hold-s", "-1", "--out", str(tmp_path)])


def test_paper_setups_replay_a_mix_and_report_it_by_class(tmp_path) -> None:
    text = paper_cli.main(
        [
            "--setups",
            "current",
            "--only",
            "rtx4090 llama3-8b burst 60 short",
            "--rate-mix",
            "20:0.5,none:0.5",
            "--policies",
            "fcfs,tokenflow",
            "--jobs",
            "1",
            "--json",
            str(tmp_path / "runs.json"),
        ]
    )
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert {(r["rates"], r["policy"]) for r in runs} == {("20:0.5,none:0.5", "fcfs"), ("20:0.5,none:0.5", "tokenflow")}
    assert "Mixed traffic: streams and rate-less requests" in text
    mixed = text[text.index("Mixed traffic") :].splitlines()
    row = next(line for line in mixed if line.startswith("| rtx4090 llama3-8b burst 60 short | 20:0.5,none:0.5 |"))
    assert row.count("|") == 8  # setup, rates, stream TTFT, rebuffer share, rate-less E2E, tokens, targets missed


def test_repeats_spread_the_class_figures_too(tmp_path) -> None:
    """With rate-less requests in the mix, `--repeats` reports each class's target as median (min-max) over the
    rounds, run by run in results.json; a workload of streams alone has none to report."""
    summaries = bench.main([*SIM_ARGS, "--schedulers", "tokenflow,fcfs", "--repeats", "2", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    for name, summary in summaries.items():
        for key in ("p99_stream_ttft_ms", "stream_rebuffer_s", "p99_rateless_e2el_ms"):
            spread = results[name]["spread"][key]
            assert len(spread["runs"]) == 2 and spread["runs"][0] == summary[key]
    table = (tmp_path / "table.txt").read_text()
    assert "stream p99 TTFT ms" in table and "rate-less p99 E2E ms" in table
    streams_only = [a for a in SIM_ARGS if a not in ("--rate-mix", "20:0.5,none:0.5")]
    bench.main([*streams_only, "--schedulers", "fcfs", "--repeats", "2", "--out", str(tmp_path / "streams")])
    assert (
        "p99_rateless_e2el_ms" not in json.loads((tmp_path / "streams" / "results.json").read_text())["fcfs"]["spread"]
    )
