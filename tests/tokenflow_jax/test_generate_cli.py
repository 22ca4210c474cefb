"""`python -m tokenflow_jax.generate`: the CLI contract (JSON output, greedy parity with HF, exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tokenflow_jax.generate", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_tiny_json_output():
    result = run_cli("--model", "tiny", "--prompt-ids", "1,2,3", "--max-tokens", "5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert set(out) == {"token_ids", "text"}
    assert len(out["token_ids"]) == 5 and all(isinstance(t, int) for t in out["token_ids"])
    assert isinstance(out["text"], str)


def test_hf_folder_greedy_matches_transformers(hf_checkpoint, hf_greedy):
    ckpt = hf_checkpoint("llama")
    prompt = [256, *b"The quick brown fox"]
    expected = hf_greedy(ckpt.model, prompt, 32)
    assert len(expected) == 32  # precondition: this model and prompt never emit EOS early
    ids = ",".join(map(str, prompt))
    result = run_cli("--model", str(ckpt.path), "--prompt-ids", ids, "--max-tokens", "32", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == expected


@pytest.mark.parametrize(
    "args",
    [
        ["--model", "no-such-model", "--prompt", "hi", "--max-tokens", "4"],
        ["--model", "tiny", "--prompt", "hi", "--max-tokens", "0"],
        ["--model", "tiny", "--prompt", "hi", "--max-tokens", "4", "--temperature", "-1"],
        ["--model", "tiny", "--prompt", "hi", "--max-tokens", "4", "--top-p", "0"],
        ["--model", "tiny", "--prompt", "hi", "--max-tokens", "4", "--top-k", "-2"],
        ["--model", "tiny", "--prompt-ids", "1,x", "--max-tokens", "4"],
        ["--model", "tiny", "--prompt", "hi", "--prompt-ids", "1", "--max-tokens", "4"],
        ["--model", "tiny", "--max-tokens", "4"],
        ["--model", "tiny", "--prompt", "hi", "--max-tokens", "4", "--dtype", "float16"],
    ],
)
def test_bad_arguments_exit_2(args):
    """Rejected before any model loads, so these run without the engine."""
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.strip()


def test_unknown_model_is_one_line():
    result = run_cli("--model", "no-such-model", "--prompt", "hi", "--max-tokens", "4")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "tiny" in result.stderr
