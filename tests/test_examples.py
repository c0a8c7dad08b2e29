"""examples/: the intrinsic-dimension example runs and finds what it promises (needs
scikit-learn)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytestmark = pytest.mark.slow  # trains small models on the digits data

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "intrinsic_dimension.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("intrinsic_dimension", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_small_sweep_finds_d_int90_and_prints_the_table(example):
    results = example.sweep((20,), (5, 400), epochs=80)
    row = results[20]
    assert row["direct"] > 0.85  # digits are easy for a direct MLP
    assert row[5] < 0.9 * row["direct"] <= row[400]  # too small a subspace fails, a big one works
    assert example.d_int90(row) == 400
    text = example.table(results)
    assert "| 20 | 1,930 |" in text  # 64*20+20 + 20*20+20 + 20*10+10
    assert text.splitlines()[0].endswith("d=5 | d=400 | d_int90 |")


def test_d_int90_is_none_when_never_reached(example):
    assert example.d_int90({"direct": 1.0, 10: 0.5, 20: 0.6}) is None
