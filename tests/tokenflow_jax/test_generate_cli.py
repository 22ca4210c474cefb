"""`python -m tokenflow_jax.generate`: the CLI contract (JSON output, greedy parity with HF, exit code 2)."""

from __future__ import annotations

import json
import re
import shutil
import string
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
    result = run_cli("--model", "tiny", "--prompt-ids", "1,2,3", "--max-tokens", "5", "--ignore-eos", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert set(out) == {"token_ids", "text"}
    assert len(out["token_ids"]) == 5 and all(isinstance(t, int) for t in out["token_ids"])
    assert isinstance(out["text"], str)


def test_tiny_prints_text():
    result = run_cli("--model", "tiny", "--prompt", "The ", "--max-tokens", "60")
    assert result.returncode == 0, result.stderr
    text = result.stdout.strip()
    letters = sum(c.isalpha() or c.isspace() or c in string.punctuation for c in text)
    assert len(text) >= 30 and letters >= 0.85 * len(text), text


def test_hf_folder_greedy_matches_transformers(hf_checkpoint, hf_greedy):
    ckpt = hf_checkpoint("llama")
    prompt = [256, *b"The quick brown fox"]
    expected = hf_greedy(ckpt.model, prompt, 32)
    assert len(expected) == 32  # precondition: this model and prompt never emit EOS early
    ids = ",".join(map(str, prompt))
    result = run_cli("--model", str(ckpt.path), "--prompt-ids", ids, "--max-tokens", "32", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == expected
    assert "no tokenizer files" in result.stderr and "byte fallback" in result.stderr  # said, yet ids work


@pytest.mark.parametrize("variant", ["llama", "qwen2_sharded"])
def test_tensor_parallel_2_on_four_cpu_devices_matches_transformers(variant, hf_checkpoint, hf_greedy):
    """The subprocess inherits tests/conftest.py's XLA_FLAGS: 4 host devices, the model split over 2."""
    ckpt = hf_checkpoint(variant)
    prompt = [256, *b"The quick brown fox"]
    expected = hf_greedy(ckpt.model, prompt, 24)
    ids = ",".join(map(str, prompt))
    result = run_cli("--model", str(ckpt.path), "--prompt-ids", ids, "--max-tokens", "24", "--json",
                     "--tensor-parallel-size", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == expected


def test_tensor_parallel_size_the_heads_cannot_split_exits_2_naming_them(hf_checkpoint):
    result = run_cli("--model", str(hf_checkpoint("llama").path), "--prompt-ids", "1,2", "--max-tokens", "2",
                     "--tensor-parallel-size", "3")  # fmt: skip
    assert result.returncode == 2
    assert "tensor_parallel_size 3 does not divide the model's 4 attention (query) heads" in result.stderr


def test_ignore_eos_runs_past_the_checkpoint_eos(hf_checkpoint, hf_greedy, tmp_path):
    ckpt = hf_checkpoint("llama")
    prompt = [256, *b"The quick brown fox"]
    free_run = hf_greedy(ckpt.model, prompt, 12)
    eos = free_run[3]
    path = tmp_path / "early_eos"
    shutil.copytree(ckpt.path, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    ids = ",".join(map(str, prompt))
    stops = run_cli("--model", str(path), "--prompt-ids", ids, "--max-tokens", "12", "--json")
    runs_on = run_cli("--model", str(path), "--prompt-ids", ids, "--max-tokens", "12", "--ignore-eos", "--json")
    assert stops.returncode == runs_on.returncode == 0, stops.stderr + runs_on.stderr
    assert json.loads(stops.stdout)["token_ids"] == free_run[: free_run.index(eos) + 1]
    assert json.loads(runs_on.stdout)["token_ids"] == free_run


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


def test_model_too_big_for_the_device_is_one_line():
    """qwen2.5-32b in float32 is 131 GB of weights: refused with both byte counts before anything is allocated."""
    result = run_cli("--model", "qwen2.5-32b", "--prompt", "hi", "--max-tokens", "4")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert re.search(r"needs [\d,]{15,} bytes \(131,\d{3},\d{3},\d{3} bytes of float32 weights", line), line
    assert re.search(r"device has [\d,]+ bytes free", line), line


def test_every_flag_says_what_it_does_and_its_default():
    from tokenflow_jax.generate import build_parser

    for action in build_parser()._actions:
        if action.dest != "help":
            assert action.help and ("default" in action.help or "required" in action.help or action.required)
