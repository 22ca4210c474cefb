"""First use of `python -m serving`: it says what it does while it starts, every flag says its default, and a
model the device cannot hold is refused in one line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from serving.__main__ import build_parser
from tests.serving.conftest import REPO_ROOT, ServerProcess


def test_start_up_is_logged_before_serving(server: ServerProcess) -> None:
    log = server.log()
    loading = log.index("loading tiny (float32)")
    compiling = log.index("compiling the engine's step shapes")
    compiled = re.search(r"compiled (\d+) step shapes in [\d.]+ s", log)
    assert compiled and int(compiled.group(1)) > 0, log
    assert loading < compiling < compiled.start()


def test_every_flag_says_what_it_does_and_its_default() -> None:
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and "default" in action.help, action.option_strings


def test_a_model_too_big_for_the_device_is_refused_in_one_line() -> None:
    """qwen2.5-32b in float32 is 131 GB of weights; nothing is allocated before the refusal."""
    result = subprocess.run([sys.executable, "-m", "serving", "--model", "qwen2.5-32b", "--port", "0"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and re.search(r"needs [\d,]+ bytes .* has [\d,]+ bytes free", error[0]), result.stderr


def test_gpu_memory_utilization_without_device_memory_stats_is_refused_in_one_line() -> None:
    """JAX's CPU backend reports no memory stats, so the server cannot size its pool from a fraction."""
    import jax

    if jax.devices()[0].memory_stats() is not None:
        pytest.skip(f"the {jax.default_backend()} backend reports its memory")
    result = subprocess.run([sys.executable, "-m", "serving", "--model", "tiny", "--gpu-memory-utilization", "0.9",
                             "--port", "0"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "reports no device memory" in error[0], result.stderr
