"""tools/mutants.py plants each bug by replacing one exact piece of source: every piece must still be in the code
once, and every test it names must exist, or the mutation run stops short of its list."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import mutants  # noqa: E402


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_plants_a_change_the_code_still_has(mutant: mutants.Mutant) -> None:
    source = (ROOT / mutant.path).read_text()
    assert source.count(mutant.old) == 1, f"{mutant.path} no longer has {mutant.old!r} exactly once"
    assert mutant.new != mutant.old
    for arg in mutant.tests:
        if arg.startswith("tests/"):
            assert (ROOT / arg.split("::")[0]).exists(), arg
