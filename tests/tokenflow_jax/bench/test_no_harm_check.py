"""`python -m tokenflow_jax.bench.no_harm` on a real sweep's --json: its ratios equal those computed here from the
runs' own figures, and its verdict follows the rule."""

from __future__ import annotations

import json

import pytest

from tokenflow_jax.bench import no_harm, paper_cli

SETUP = "rtx4090 llama3-8b burst 60 short"


def test_the_check_reads_a_sweep_and_gives_the_four_ratios_and_a_verdict(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    paper_cli.main(["--policies", "fcfs,tokenflow", "--only", SETUP, "--json", str(out)])
    capsys.readouterr()
    code = no_harm.main([str(out)])
    text = capsys.readouterr().out
    runs = {r["policy"]: r for r in json.loads(out.read_text())}
    tf, fcfs = runs["tokenflow"], runs["fcfs"]
    tokens = tf["output_throughput"] / fcfs["output_throughput"]
    effective = tf["effective_throughput"] / fcfs["effective_throughput"]
    ttft = tf["p99_ttft_ms"] / fcfs["p99_ttft_ms"]
    row = next(line for line in text.splitlines() if line.startswith(f"| {SETUP} |"))
    assert f"| {tokens:.3f} | {effective:.3f} | {ttft:.3f} |" in row
    holds = tokens >= 0.97 and effective >= 0.97 and ttft <= 1.05
    worst = max((r - dict(zip(fcfs["request_ids"], fcfs["rebuffer_per_request_s"], strict=True))[rid])
                / tf["playback_s"][rid]
                for rid, r in zip(tf["request_ids"], tf["rebuffer_per_request_s"], strict=True))  # fmt: skip
    holds = holds and worst <= 0.10
    assert ("| PASS |" in row) == holds
    assert code == (0 if holds else 1)
    # A run laid over the sweep replaces the same pair's run; a pair without fcfs is skipped, not compared.
    only_tokenflow = tmp_path / "tokenflow.json"
    only_tokenflow.write_text(json.dumps([tf]))
    assert no_harm.main([str(only_tokenflow)]) == 2
    assert "skipped" in capsys.readouterr().out


def test_the_noise_floor_holds_fcfs_to_the_rule_against_itself_on_a_slower_machine(tmp_path, capsys):
    out = tmp_path / "floor.json"
    code = no_harm.main(["--noise-floor", "1.5", "--only", SETUP, "--out", str(out)])
    text = capsys.readouterr().out
    runs = json.loads(out.read_text())
    fcfs = next(r for r in runs if "slowdown" not in r)
    slower = next(r for r in runs if r.get("slowdown") == 1.5)
    assert fcfs["policy"] == "fcfs" and slower["setup"] == fcfs["setup"] == SETUP
    # A machine 1.5x slower makes 1/1.5 of the tokens (same work, every step dearer): the rule's first clause fails.
    tokens = slower["output_throughput"] / fcfs["output_throughput"]
    assert abs(tokens - 1 / 1.5) < 0.02
    row = next(line for line in text.splitlines() if line.startswith(f"| {SETUP} |"))
    assert f"| {tokens:.3f} |" in row and "FAIL" in row and code == 1
    assert "fcfs on a machine 1.5x slower against fcfs" in text
    # The same machine: fcfs equals itself, so every pair passes at 1.000x and no stall beyond itself.
    assert no_harm.main(["--noise-floor", "1", "--only", SETUP]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {SETUP} |"))
    assert "| 1.000 | 1.000 | 1.000 | +0.0% |" in row and "PASS" in row


@pytest.mark.parametrize("argv", [["--noise-floor", "0"], ["--noise-floor", "nan"], ["--noise-floor", "1.1", "x.json"],
                                  ["--noise-floor", "1.1", "--only", "no such setup"], []])  # fmt: skip
def test_bad_noise_floor_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as e:
        no_harm.main(argv)
    assert e.value.code == 2
