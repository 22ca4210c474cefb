"""The example notebook runs top to bottom through the public API within its time budget."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "streaming_under_burst.ipynb"
TIMEOUT_S = 600  # a cold compile cache on 2 cores takes minutes: a deadline against hangs, not a speed test

os.environ.setdefault("TOKENFLOW_JAX_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tokenflow_jax_test_xla"))


def test_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this process's environment (the shared compilation cache included) and runs in
    # tmp_path, so it gets this tree by absolute path: a relative PYTHONPATH=. would point it at tmp_path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs) == 2
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "| fcfs" in text and "p99 TTFT" in text
