"""Whole-model pickles of a baked and of a ``to_sparse`` model, saved by maskparam 0.2 (with
``torch.save(model)``, before the package was split into stages), still load and compute the same.
The files were written by tests/data/README.md's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import maskparam as mp

DATA = Path(__file__).resolve().parents[1] / "data"


# torch warns that CSR tensors are beta when it rebuilds one from a pickle: nothing to change here.
CSR_BETA = "ignore:Sparse CSR tensor support is in beta:UserWarning"


@pytest.mark.filterwarnings(CSR_BETA)
@pytest.mark.parametrize("name", ["baked_v0_2.pt", "to_sparse_v0_2.pt"])
def test_a_pickled_model_from_0_2_loads_and_computes_the_same(name):
    saved = torch.load(DATA / name, weights_only=False)
    model = saved["model"]
    # Within float rounding: the outputs were computed on another machine (another BLAS kernel).
    torch.testing.assert_close(model(saved["x"]), saved["y"], rtol=1e-6, atol=1e-7)
    assert model.state_dict().keys() == saved["model"].state_dict().keys()


def test_a_baked_model_holds_nothing_of_maskparam():
    model = mp.apply_mask(torch.nn.Linear(4, 4), {"weight": mp.Mask(mp.masks.random(0.5))})
    mp.remove_parametrizations(model)
    assert model._load_state_dict_pre_hooks == {}
    assert not [k for k in vars(model) if "maskparam" in k]


@pytest.mark.filterwarnings(CSR_BETA)
def test_a_pickled_to_sparse_model_is_a_csr_linear_of_today():
    saved = torch.load(DATA / "to_sparse_v0_2.pt", weights_only=False)
    assert type(saved["model"][0]) is mp.CSRLinear
    assert [c.layout for c in saved["model"].sparse_choices] == ["csr", "dense"]
    assert isinstance(saved["model"].sparse_choices[0], mp.SparseChoice)


@pytest.mark.filterwarnings(CSR_BETA)
def test_a_pickled_to_sparse_model_saves_plain_tensors_that_load_back():
    """The 0.2 pickle's CSRLinear saves today's state_dict (the CSR weight as plain tensors), which
    loads into another copy of it."""
    saved = torch.load(DATA / "to_sparse_v0_2.pt", weights_only=False)
    model = saved["model"]
    state = model.state_dict()
    assert list(state)[:3] == ["0.weight_crow_indices", "0.weight_col_indices", "0.weight_values"]
    assert all(t.layout == torch.strided for t in state.values())
    other = torch.load(DATA / "to_sparse_v0_2.pt", weights_only=False)["model"]
    with torch.no_grad():
        other[0].weight.values().zero_()
    other.load_state_dict(state)
    assert torch.equal(other(saved["x"]), model(saved["x"]))


@pytest.mark.filterwarnings(CSR_BETA)
def test_a_model_unpickled_from_0_2_is_guarded_when_constrained_again():
    model = torch.load(DATA / "baked_v0_2.pt", weights_only=False)["model"]
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    mp.apply_mask(model, {"2.weight": mp.Mask(mp.masks.magnitude(0.5))})
    with pytest.raises(mp.MaskparamError, match=r"holds '2.weight' as a plain tensor"):
        model.load_state_dict(
            plain
        )  # the load guard is on: plain keys go through mp.load_state_dict
    mp.remove_parametrizations(model)
    assert not [k for m in model.modules() for k in vars(m) if "maskparam" in k]
