"""`tools/gpu_check.sh`, the one-call GPU run, passes its CPU dry run (tiny shapes, interpret-mode kernels), so a
GPU session's time is never lost to a script error: every part runs, writes its files and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pallas_kernels.tiles import decode_tiles, read_table, write_table

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "MODEL": "tiny", "SMALL": "1", "OUT": str(tmp_path)}
    run = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=1500
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert not (tmp_path / "failed.txt").exists()

    # 2 dtypes x the dry run's one head shape (group 7) x (3 decode tilings + prefill), each against the reference.
    check = (tmp_path / "kernel_check.txt").read_text().splitlines()
    assert len([line for line in check if line.endswith(" OK")]) == 8, check
    assert not any("FAIL" in line for line in check), check

    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert {(r["kernel"], r["batch"]) for r in kernels["rows"]} == {("decode", 2), ("decode", 1), ("prefill", 1)}
    assert all(r["ours_ms"] > 0 and r["xla_ms"] > 0 for r in kernels["rows"])

    # The tile table the bench wrote is one the kernels read when PALLAS_TILES names it.
    table = read_table(tmp_path / "tiles.json")
    assert len(table["decode"]) == 4 and len(table["prefill"]) == 2
    nearest = next(e for e in table["decode"] if (e["sequence_heads"], e["context"]) == (2, 128))
    nearest["num_splits"] = 3
    write_table(tmp_path / "edited.json", table)
    monkeypatch.setenv("PALLAS_TILES", str(tmp_path / "edited.json"))
    assert decode_tiles(batch=1, num_kv_heads=2, max_pages=8, page_size=16).num_splits == 3

    engine = json.loads((tmp_path / "engine.json").read_text())
    assert [d["batch"] for d in engine["decode"]] == [8, 16] and all(d["step_ms"] > 0 for d in engine["decode"])
    assert [s["pages"] for s in engine["swap"]] == [16, 64]
    # Which host memory the engine chose is said, and both pools were timed, one after the other.
    env_lines = (tmp_path / "env.txt").read_text().splitlines()
    assert any(line.startswith(f"host KV memory: {engine['host_memory']} (") for line in env_lines), env_lines
    pools = json.loads((tmp_path / "host_memory.json").read_text())
    assert pools["kinds"] == ["numpy", "pinned_host"] and [s["pages"] for s in pools["swap"]] == [4, 16]
    assert all(s[f"{k}_{way}_ms"] > 0 for s in pools["swap"] for k in pools["kinds"] for way in ("out", "in"))
    assert [d["batch"] for d in pools["decode"]] == [8]
    assert (tmp_path / "decision.txt").read_text().strip()

    # The burst at the client, each policy on its own server: every request completed.
    burst = json.loads((tmp_path / "burst.json").read_text())["0"]
    assert set(burst) == {"tokenflow", "fcfs"} and all(s["completed"] == 8 for s in burst.values()), burst
