"""`engine_bench --vs-hf`: both sides generate the same greedy tokens on the bench's checkpoint, and the
report covers the three workloads with figures from one run."""

from __future__ import annotations

import math

from tokenflow_jax.bench import engine_bench, vs_hf


def test_the_comparison_runs_both_sides_on_identical_tokens(capsys) -> None:
    result = vs_hf.compare(batch=3, tokens=8, rounds=1)
    assert set(result["workloads"]) == {"fixed", "mixed", "batch 1"}
    for name, w in result["workloads"].items():
        assert w["requests"] == (1 if name == "batch 1" else 3)
        for r in w["rounds"]:
            assert r["identical"], name
            assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("hf_tok_s", "engine_tok_s", "ratio"))
    mixed = result["workloads"]["mixed"]["useful_tokens"]
    assert 3 * vs_hf.MIXED_LENGTHS[0] <= mixed <= 3 * vs_hf.MIXED_LENGTHS[1]
    vs_hf.print_report(result)
    assert "engine vs HF transformers" in capsys.readouterr().out


def test_the_flag_is_on_the_engine_bench_cli() -> None:
    help_text = engine_bench_help()
    assert "--vs-hf" in help_text and "--vs-hf-rounds" in help_text


def engine_bench_help() -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        engine_bench.main(["--help"])
    return out.getvalue()
