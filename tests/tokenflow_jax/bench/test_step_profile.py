"""`engine_bench --step-profile`: the traced decode step's operations are charged to the model's parts (the
HLO stack frames are read), and the host phases of `LLM.generate` are timed on a real run."""

from __future__ import annotations

from tests.tokenflow_jax.bench.test_vs_hf import engine_bench_help
from tokenflow_jax.bench import step_profile


def test_the_profile_charges_each_model_part_and_host_phase(capsys) -> None:
    result = step_profile.profile(batch=4, tokens=8)
    device = result["device"]
    for part in ("attention (page reads, softmax)", step_profile.OTHER, "sampling", "KV page writes"):
        assert device.get(part, 0) > 0, (part, device)
    host = result["host"]
    assert host["steps"] >= 8  # a prefill step, then one decode step per token after the first
    phases = {k: v for k, v in host.items() if k not in ("steps", "wall per step")}
    assert all(ms >= 0 for ms in phases.values()), phases
    assert phases["wait for the sampled tokens"] > 0 and phases["batch assembly (arrays for the step)"] > 0
    step_profile.print_report(result)
    assert "ms per decode step" in capsys.readouterr().out


def test_the_flag_is_on_the_engine_bench_cli() -> None:
    assert "--step-profile" in engine_bench_help()
