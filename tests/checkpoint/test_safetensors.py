"""Constrained state_dicts in the format the frameworks write: ``safetensors.torch`` saves every
constraint's state (no shared or non-contiguous tensors), a tied tensor's parametrizations are
saved once (under its first holder's names, as Hugging Face saves one key of a tie), and both
load back into a model built with another init."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from helpers import TiedEmbeddingLM
from torch import nn

import maskparam as mp

safetensors_torch = pytest.importorskip("safetensors.torch")

SPECS = {
    "Mask dense": lambda: mp.Mask(mp.masks.magnitude(0.5), layout="dense"),
    "Mask compact": lambda: mp.Mask(mp.masks.magnitude(0.8)),
    "Freeze": lambda: mp.Freeze(mp.masks.random(0.5, seed=0)),
    "Freeze compact": lambda: mp.Freeze(mp.masks.random(0.8, seed=0), layout="compact"),
    "Triangular": mp.Triangular,
    "Subspace": lambda: mp.Subspace(5, seed=3),
    "Subspace fastfood": lambda: mp.Subspace(5, projection="fastfood", seed=3),
    "LearnableMask": mp.LearnableMask,
    "Mask over Freeze": lambda: [mp.Freeze(mp.masks.rows([0])), mp.Mask(mp.masks.magnitude(0.5))],
}


def _built(seed: int, spec: str) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    return mp.apply_mask(model, {"0.weight": SPECS[spec]()})


@pytest.mark.parametrize("spec", list(SPECS))
def test_every_constraint_saves_and_loads_with_safetensors(spec, tmp_path):
    model = _built(0, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    safetensors_torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    fresh = _built(0, spec) if spec.startswith(("Mask", "LearnableMask")) else _built(1, spec)
    loaded = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert str(fresh.load_state_dict(loaded)) == "<All keys matched successfully>"
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert mp.verify(fresh) == []


@pytest.mark.parametrize(
    "spec",
    [
        lambda: mp.Mask(mp.masks.magnitude(0.5)),
        lambda: mp.Freeze(mp.masks.rows([0, 1])),
        mp.Triangular,
    ],
    ids=["Mask", "Freeze", "Triangular"],
)
def test_a_tied_constrained_tensor_is_saved_once_and_loads_back_tied(spec, tmp_path):
    torch.manual_seed(0)
    model = mp.apply_mask(TiedEmbeddingLM(), {"head.weight": spec()})  # either side may be named
    state = model.state_dict()
    assert [k for k in state if k.startswith("head.")] == []  # emb is the first holder
    assert "emb.parametrizations.weight.original" in state
    safetensors_torch.save_file(state, tmp_path / "tied.safetensors")

    torch.manual_seed(1)
    fresh = mp.apply_mask(TiedEmbeddingLM(), {"head.weight": spec()})
    loaded = safetensors_torch.load_file(tmp_path / "tied.safetensors")
    assert str(fresh.load_state_dict(loaded)) == "<All keys matched successfully>"
    ids = torch.arange(10)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    originals = [m.parametrizations.weight.original for m in (fresh.emb, fresh.head)]
    assert originals[0] is originals[1]  # still one Parameter

    # A checkpoint saved with both holders' keys (maskparam 0.2) loads too.
    both = dict(state)
    for key, value in list(state.items()):
        if key.startswith("emb.parametrizations."):
            both["head." + key.removeprefix("emb.")] = value
    assert str(fresh.load_state_dict(both)) == "<All keys matched successfully>"

    mp.remove_parametrizations(fresh)  # baked: plain torch, both plain keys, no hook left
    assert {"emb.weight", "head.weight"} <= set(fresh.state_dict())
    assert fresh.head.weight is fresh.emb.weight
    assert "maskparam" not in str(pickle.dumps(fresh))


def test_a_tied_tensor_missing_from_a_checkpoint_is_still_reported_missing():
    torch.manual_seed(0)
    model = mp.apply_mask(TiedEmbeddingLM(), {"emb.weight": mp.Mask(mp.masks.magnitude(0.5))})
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("emb.")}
    missing = model.load_state_dict(state, strict=False).missing_keys
    # Nothing of the tie in the checkpoint: every holder's entries are reported missing.
    assert sorted(missing) == [
        f"{side}.parametrizations.weight.{key}"
        for side in ("emb", "head")
        for key in ("0.mask", "original")
    ]


def _tied(seed: int, *, device: str = "cpu") -> TiedEmbeddingLM:
    torch.manual_seed(seed)
    with torch.device(device):
        model = TiedEmbeddingLM()
    return mp.apply_mask(model, {"emb.weight": mp.Mask(mp.masks.magnitude(0.5))})


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_tied_tensor_loaded_with_assign_stays_one_tensor(device):
    saved = io.BytesIO()
    model = _tied(0)
    torch.save(model.state_dict(), saved)
    fresh = _tied(1, device=device)
    state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    assert str(fresh.load_state_dict(state, assign=True)) == "<All keys matched successfully>"
    originals = [m.parametrizations.weight.original for m in (fresh.emb, fresh.head)]
    assert originals[0] is originals[1]
    assert not originals[0].is_meta
    ids = torch.arange(10)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


class _Half(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 6)


class _EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = _Half(), _Half()
        self.decoder.embed.weight = self.encoder.embed.weight  # shared, as in T5 or BART


def test_a_submodule_that_holds_only_an_alias_of_a_tie_saves_it():
    def built(seed: int) -> _EncoderDecoder:
        torch.manual_seed(seed)
        model = _EncoderDecoder()
        return mp.apply_mask(model, {"encoder.embed.weight": mp.Mask(mp.masks.magnitude(0.5))})

    model, other = built(0), built(1)
    assert "embed.parametrizations.weight.original" in model.decoder.state_dict()
    assert not any(k.startswith("decoder.embed.") for k in model.state_dict())  # saved once
    assert str(other.decoder.load_state_dict(model.decoder.state_dict())) == (
        "<All keys matched successfully>"
    )
    assert torch.equal(other.decoder.embed.weight, model.decoder.embed.weight)


def test_baking_one_side_of_a_tie_is_refused():
    model = _tied(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for side, other in (("emb", "head"), ("head", "emb")):
        with pytest.raises(
            mp.MaskparamError,
            match=rf"'{side}.weight' is tied to '{other}.weight', outside the module given",
        ):
            mp.remove_parametrizations(getattr(model, side))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    mp.remove_parametrizations(model)
    assert model.head.weight is model.emb.weight


class _TableLM(nn.Module):
    """The tied tensor's first holder is the model itself, the parent of the other holder."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 6))
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.table[ids]))


@pytest.mark.parametrize("assign", [False, True])
def test_a_tie_held_by_a_parent_and_its_child_is_saved_once_and_stays_one(assign):
    def built(seed: int) -> _TableLM:
        torch.manual_seed(seed)
        return mp.apply_mask(_TableLM(), {"table": mp.Mask(mp.masks.magnitude(0.5))})

    model = built(0)
    state = safetensors_torch.load(safetensors_torch.save(model.state_dict()))
    assert len([k for k in state if k.endswith(".original")]) == 1
    fresh = built(1)
    assert str(fresh.load_state_dict(state, assign=assign)) == "<All keys matched successfully>"
    assert fresh.parametrizations.table.original is fresh.head.parametrizations.weight.original
    ids = torch.arange(10)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_a_tie_built_on_the_meta_device_is_one_tensor_after_to_empty_and_load():
    model = _tied(0)
    fresh = _tied(1, device="meta")
    fresh.to_empty(device="cpu")  # torch gives each module a Parameter of its own here
    assert str(fresh.load_state_dict(model.state_dict())) == "<All keys matched successfully>"
    assert fresh.emb.parametrizations.weight.original is fresh.head.parametrizations.weight.original
    ids = torch.arange(10)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_a_checkpoint_with_two_different_copies_of_a_tie_is_refused_before_loading():
    model = _tied(0)
    state = model.state_dict()
    both = dict(state)
    for key, value in state.items():
        if key.startswith("emb.parametrizations."):
            both["head." + key.removeprefix("emb.")] = value.clone()
    both["head.parametrizations.weight.original"] += 100  # as a split tie would have saved
    fresh = _tied(1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    for load in (fresh.load_state_dict, lambda sd: mp.load_state_dict(fresh, sd)):
        with pytest.raises(mp.MaskparamError, match=r"with other values in 'original'"):
            load(both)
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())


def test_mp_load_state_dict_takes_a_tie_saved_under_its_other_holder():
    model = _tied(0)
    state = {
        ("head." + k.removeprefix("emb.")) if k.startswith("emb.") else k: v
        for k, v in model.state_dict().items()
    }
    fresh = _tied(1)
    assert str(mp.load_state_dict(fresh, state)) == "<All keys matched successfully>"
    ids = torch.arange(10)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
