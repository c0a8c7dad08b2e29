"""examples/: the intrinsic-dimension and pruning examples run and find what they promise
(needs scikit-learn)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import maskparam as mp

pytest.importorskip("sklearn")
pytestmark = pytest.mark.slow  # trains small models on the digits data

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load("intrinsic_dimension")


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


@pytest.fixture(scope="module")
def pruning():
    return _load("pruning")


@pytest.fixture(scope="module")
def quick_runs(pruning):
    torch.set_num_threads(1)
    return pruning.compare(pruning.QUICK)


def test_pruning_quick_run_keeps_maskparams_zeros_and_torch_loses_them_after_remove(
    pruning, quick_runs
):
    runs = {(run.method, run.target): run for run in quick_runs}
    assert len(runs) == 7  # dense, then 3 flows per target
    total = 144 + 4608 + 32768 + 640
    assert sum(m.weight.numel() for m in pruning.weighted(pruning.cnn(0))) == total
    dense = runs["dense", 0.0]
    assert dense.acc_final > 0.9
    for target in pruning.TARGETS:
        n_pruned = round(target * total)
        ours = runs["maskparam", target]
        hooked = runs["prune, hooks kept", target]
        removed = runs["prune, removed, fine-tuned", target]
        # maskparam: exactly the target, and every pruned weight still exactly 0 after the
        # fine-tune phase and the bake.
        assert ours.pruned == ours.zeros_kept == n_pruned
        assert ours.sparsity == n_pruned / total
        assert ours.stale is None
        # torch with its hooks on: zero too, same count; its weight_orig is not.
        assert hooked.pruned == hooked.zeros_kept == n_pruned
        assert hooked.sparsity == n_pruned / total
        assert hooked.stale == n_pruned  # weight decay shrinks them, never to zero
        # torch, removed and then fine-tuned: the same phase 1, the zeros lost.
        assert removed.acc_pruned == hooked.acc_pruned
        assert removed.pruned == n_pruned
        assert removed.zeros_kept < n_pruned / 2
        assert removed.sparsity < target / 2
        for run in (ours, hooked, removed):
            assert run.acc_final > (0.8 if target == 0.95 else 0.9)
            assert run.seconds > 0
            assert run.history[0][0] == 0
            assert len(run.history) == 1 + pruning.QUICK.epochs + pruning.QUICK.finetune
            assert run.history[pruning.QUICK.epochs][1] == n_pruned / total  # end of phase 1


def test_pruning_table_has_a_row_per_run(pruning, quick_runs):
    lines = pruning.table(quick_runs, pruning.QUICK).splitlines()
    assert lines[0].startswith("| method | target | acc, 8 ep | acc, +3 ep fine-tune |")
    assert lines[0].endswith("| train s | vs dense |")
    assert len(lines) == 2 + 7
    assert lines[2].startswith("| dense | — |")
    assert lines[3].startswith("| maskparam | 90% |")
    assert "| 90.00% | 34,344 / 34,344 | — |" in lines[3]
    assert "| 95.00% | 36,252 / 36,252 | 36,252 |" in lines[7]
    assert lines[8].startswith("| prune, removed, fine-tuned | 95% |")


def test_torch_ranking_the_current_weights_matches_maskparam_bit_for_bit(pruning):
    """The example's one difference between the two is torch ranking module.weight, one
    optimizer step stale: with the current weights as importance_scores, no difference."""
    torch.set_num_threads(1)
    config = pruning.Config(epochs=4, finetune=0, every=5)
    data = pruning.load_data(0)
    begin, end, every = config.schedule(data)
    ours, theirs = pruning.cnn(0), pruning.cnn(0)
    gradual = mp.GradualPruning(
        ours, {"*.weight": mp.masks.global_magnitude}, sparsity=0.9, begin=begin, end=end,
        every=every,
    )  # fmt: skip
    schedule = pruning.TorchSchedule(theirs, 0.9, begin, end, every, rank_current=True)
    for model, step in ((ours, gradual.step), (theirs, schedule.step)):
        run = pruning.Run("", 0.9)
        optimizer = pruning.optimizer_for(model, config)
        if model is ours:
            gradual.optimizer = optimizer  # its state follows the masks
        pruning.train(model, optimizer, data, config, range(config.epochs), run, step)
    assert gradual.steps == schedule.steps >= end  # the schedule ran to its end
    for a, b in zip(pruning.weighted(ours), pruning.weighted(theirs), strict=True):
        assert torch.equal(a.weight, pruning.effective(b))
    assert pruning.sparsity(ours) == round(0.9 * 38160) / 38160
