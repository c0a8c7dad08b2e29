"""trainable_state_dict / load_trainable_state_dict (_trainable.py): a fine-tune saved as only
what trained restores bit-identical outputs on a model built from the same base with the same
rules, for every constraint, layout and dtype, through a file; it is small; and a state made for
other rules, another seed or another base (one bit off), a forgotten rule or a damaged state is
refused with the model untouched. After update_masks: prune/test_update_masks_checkpoints.py."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    X_6x7,
    X_8x16,
    adamw_steps_to_one,
    assert_same_bits,
    is_compact,
    mlp,
    sgd_wd_steps,
    state_bits,
    through_file,
    through_file_with_size,
    trained_base,
)
from torch import Tensor, nn

import maskparam as mp
from maskparam.checkpoint.trainable import checksum

CASES: dict[str, mp.Rules] = {
    "mask_dense": {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout="dense")},
    "mask_compact": {"*.weight": mp.Mask(mp.masks.random(0.3, seed=1))},
    "freeze_entries": {"*.weight": mp.Freeze(mp.masks.random(0.5, seed=2), layout="dense")},
    "freeze_slices": {"2.weight": mp.Freeze(dim=0, index=[0, 3, 5]), "0.bias": mp.Freeze(dim=0, index=[1])},
    "freeze_compact": {"*.weight": mp.Freeze(mp.masks.random(0.7, seed=2))},
    "triangular_compact": {"2.weight": mp.Triangular()},
    "triangular_dense": {"2.weight": mp.Triangular(lower=False, diagonal=1, layout="dense")},
    "subspace_per_tensor": {"*.weight": mp.Subspace(6)},
    "subspace_group_gaussian": {"*": mp.Subspace(10, group="all")},
    "subspace_group_fastfood": {"*": mp.Subspace(10, projection="fastfood", group="all", seed=3)},
    "learnable_hard": {"*.weight": mp.LearnableMask(init=0.01)},
    "learnable_soft": {"0.weight": mp.LearnableMask(mode="soft")},
    "stack": {
        "2.weight": [mp.Triangular(), mp.Mask(mp.masks.random(0.5, seed=3))],
        "0.weight": [mp.Freeze(mp.masks.random(0.3, seed=4)), mp.Mask(mp.masks.random(0.8, seed=5))],
    },
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_identical(case):
    rules = CASES[case]
    trained = trained_base(rules)
    state, _ = through_file_with_size(mp.trainable_state_dict(trained))
    assert all(isinstance(v, Tensor) for v in state.values())
    assert not any(k.endswith(".free_positions") for k in state)  # masks regenerate from rules
    fresh = mp.apply_mask(mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0), rules)
    ids = {name: id(p) for name, p in fresh.named_parameters()}
    with torch.no_grad():
        assert not torch.equal(fresh(X_8x16), trained(X_8x16))  # training changed the outputs
    mp.load_trainable_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(X_8x16), trained(X_8x16))
    assert {name: id(p) for name, p in fresh.named_parameters()} == ids
    assert mp.verify(fresh) == []
    # Saved again from the restored model: the same state, entry for entry.
    again = mp.trainable_state_dict(fresh)
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_compact_state_is_the_stored_parameter():
    trained = trained_base({"0.weight": mp.Mask(mp.masks.random(0.3, seed=1))})
    assert "compact" in mp.summary(trained).tensors[0].constraint
    state = mp.trainable_state_dict(trained)
    stored = trained[0].parametrizations.weight.original
    assert torch.equal(state["0.weight.free_values"], stored.detach())
    assert state["0.weight.free_values"].numel() == int(mp.kept_entries(trained, "0.weight").sum())


def test_theta_key_and_nothing_else_trains_in_a_group():
    state = mp.trainable_state_dict(trained_base(CASES["subspace_group_fastfood"]))
    assert sorted(k for k in state if not k.startswith("meta:")) == ["group:all.theta"]
    per_tensor = mp.trainable_state_dict(trained_base(CASES["subspace_per_tensor"]))
    assert {"0.weight.theta", "2.weight.theta", "4.weight.theta"} <= per_tensor.keys()


def test_batchnorm_running_statistics_travel(make_tiny, tiny_input, train):
    rules = {"fc1.weight": mp.Mask(mp.masks.random(0.5, seed=1))}
    torch.manual_seed(0)
    trained = mp.apply_mask(make_tiny(), rules)
    train(trained, tiny_input, steps=3)  # train mode: the running statistics move
    state, _ = through_file_with_size(mp.trainable_state_dict(trained))
    assert "norm.running_mean" in state
    torch.manual_seed(0)
    fresh = mp.apply_mask(make_tiny(), rules)
    mp.load_trainable_state_dict(fresh, state)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(tiny_input), trained(tiny_input))


def test_masks_from_elsewhere_save_their_positions():
    hardened = trained_base({"0.weight": mp.LearnableMask(init=0.01)})
    mp.harden(hardened)
    assert "0.weight.free_positions" in mp.trainable_state_dict(hardened)
    rules = {"0.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout="dense")}
    loaded = mp.apply_mask(mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0), rules)
    assert "0.weight.free_positions" not in mp.trainable_state_dict(loaded)
    loaded.load_state_dict(
        trained_base({"0.weight": mp.Mask(mp.masks.random(0.5, seed=2))}).state_dict()
    )
    state = mp.trainable_state_dict(loaded)  # the checkpoint brought another mask
    assert torch.equal(
        state["0.weight.free_positions"].long(),
        mp.kept_entries(loaded, "0.weight").reshape(-1).nonzero().reshape(-1),
    )


def test_size_one_percent_trainable_under_10_bytes_per_entry():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    for p in model.parameters():
        p.requires_grad_(p.dim() != 1)  # biases frozen
    mp.apply_mask(model, {"*.weight": mp.Freeze(mp.masks.random(0.99, seed=0))})
    trainable = mp.summary(model).trainable
    assert trainable == 4 * round(0.01 * 512 * 512)
    _train_seq(model)
    _, size = through_file_with_size(mp.trainable_state_dict(model))
    print(f"1% fine-tune: {size} bytes for {trainable} entries ({size / trainable:.2f} B/entry)")
    assert size <= 10 * trainable
    # Even with every position saved (masks changed after apply) it stays under 10.
    for layer in model:
        layer.parametrizations.weight[0].mask_changed = True
    _, with_positions = through_file_with_size(mp.trainable_state_dict(model))
    print(f"with positions: {with_positions} bytes ({with_positions / trainable:.2f} B/entry)")
    assert size < with_positions <= 10 * trainable


def _train_seq(model: nn.Module) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x = torch.randn(4, 512)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


def test_size_global_subspace_is_theta_plus_a_little():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    d = 1000
    mp.apply_mask(model, {"*": mp.Subspace(d, projection="fastfood", group="all")})
    optimizer = torch.optim.Adam([mp.subspace_theta(model, "all")], lr=0.01)
    optimizer.zero_grad()
    model(torch.randn(4, 64)).square().mean().backward()
    optimizer.step()
    state, size = through_file_with_size(mp.trainable_state_dict(model))
    print(f"global subspace d={d}: {size} bytes (4·d = {4 * d})")
    assert size <= 4 * d + 16 * 1024
    assert state["group:all.theta"].shape == (d,)


def _snapshot_refusal(snapshot, model: nn.Module, state: dict[str, Tensor], match: str) -> None:
    before = snapshot(model)
    with pytest.raises(mp.MaskparamError, match=match):
        mp.load_trainable_state_dict(model, state)
    before.assert_same(model)


def test_refuses_other_rules_another_mask_seed(snapshot):
    state = mp.trainable_state_dict(
        trained_base({"*.weight": mp.Mask(mp.masks.random(0.5, seed=1))})
    )
    # 0.weight and 4.weight fit; 2.weight was made with another seed: nothing is written.
    other = mp.apply_mask(mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0), {
        "0.weight": mp.Mask(mp.masks.random(0.5, seed=1)),
        "2.weight": mp.Mask(mp.masks.random(0.5, seed=9)),
        "4.weight": mp.Mask(mp.masks.random(0.5, seed=1)),
    })  # fmt: skip
    _snapshot_refusal(snapshot, other, state, r"'2\.weight'.*other rules or another mask")


def test_refuses_another_subspace_seed(snapshot):
    state = mp.trainable_state_dict(trained_base(CASES["subspace_group_fastfood"]))
    other = mp.apply_mask(
        mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0),
        {"*": mp.Subspace(10, projection="fastfood", group="all", seed=4)},
    )
    _snapshot_refusal(snapshot, other, state, r"'0\.weight'.*base checksum.*seed")


def test_refuses_another_base(snapshot):
    rules = {"2.weight": mp.Freeze(dim=0, index=[0, 3, 5]), "0.bias": mp.Subspace(3)}
    trained = mp.apply_mask(mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0), rules)
    trained[4].requires_grad_(False)  # a frozen, unconstrained layer: part of the base
    adamw_steps_to_one(trained)
    state = mp.trainable_state_dict(trained)

    def fresh_with(change) -> nn.Sequential:
        base = mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0)
        with torch.no_grad():
            change(base)
        model = mp.apply_mask(base, rules)
        model[4].requires_grad_(False)
        return model

    same = fresh_with(lambda base: None)
    mp.load_trainable_state_dict(same, state)  # the control: the same base loads
    with torch.no_grad():
        assert torch.equal(same(X_8x16), trained(X_8x16))
    cases = {
        r"'4\.weight'.*another base": lambda base: base[4].weight[1, 2].add_(1e-3),
        r"'2\.weight'.*base checksum": lambda base: base[2].weight[3, 0].add_(1e-3),  # frozen row
        r"'0\.bias'.*base checksum": lambda base: base[0].bias[7].add_(1e-3),  # θ₀
    }
    for match, change in cases.items():
        _snapshot_refusal(snapshot, fresh_with(change), state, match)


def test_refuses_corrupted_lengths_positions_and_keys(snapshot):
    rules = {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1))}
    state = mp.trainable_state_dict(trained_base(rules))
    model = mp.apply_mask(mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0), rules)
    short = dict(state, **{"2.weight.free_values": state["2.weight.free_values"][:-1]})
    _snapshot_refusal(snapshot, model, short, r"'2\.weight\.free_values'.*corrupt")
    missing = {k: v for k, v in state.items() if k != "4.bias"}
    _snapshot_refusal(snapshot, model, missing, r"missing: 4\.bias")
    unknown = dict(state, **{"9.weight.free_values": torch.zeros(3)})
    _snapshot_refusal(snapshot, model, unknown, r"unexpected: 9\.weight\.free_values")
    # Positions that do not match their checksum (a flipped entry) are corruption, not a mask.
    positions = mp.kept_entries(model, "2.weight").reshape(-1).nonzero().reshape(-1).int()
    flipped = positions.clone()
    flipped[0] = 1 - flipped[0] if flipped[0] < 2 else 0
    flipped = flipped.sort().values
    bad = dict(state, **{"2.weight.free_positions": flipped})
    _snapshot_refusal(snapshot, model, bad, r"'2\.weight'.*checksum.*corrupt")
    # The right positions, saved needlessly, load.
    mp.load_trainable_state_dict(model, dict(state, **{"2.weight.free_positions": positions}))
    # strict=False: a missing trainable tensor is left as it is, an unknown key passed over.
    mp.load_trainable_state_dict(model, {**missing, "extra": torch.zeros(1)}, strict=False)


def test_refuses_a_full_state_dict_and_another_format():
    model = mp.apply_mask(
        mlp(16, 32, 32, 4, activation=nn.ReLU, seed=0), {"0.weight": mp.Triangular()}
    )
    with pytest.raises(mp.MaskparamError, match="lacks its metadata"):
        mp.load_trainable_state_dict(model, model.state_dict())
    state = mp.trainable_state_dict(model)
    with pytest.raises(mp.MaskparamError, match="format"):
        mp.load_trainable_state_dict(model, dict(state, **{"meta:format": torch.tensor([2])}))


def test_checksum_sees_every_word_and_its_position():
    data = torch.randn(3 * 2**20 + 5)  # chunks, and a tail shorter than a word
    reference = checksum(data)
    for position in (0, 2**20 + 1, data.numel() - 1):
        changed = data.clone()
        changed[position] = torch.nextafter(changed[position], torch.tensor(float("inf")))
        assert checksum(changed) != reference
    assert checksum(data.double()) != checksum(data)
    assert checksum(data[:6].reshape(2, 3)) != checksum(data[:6].reshape(3, 2))


@pytest.mark.slow  # importing transformers takes seconds
def test_gpt2_two_new_token_rows():
    transformers = pytest.importorskip("transformers")

    def config() -> object:  # a new one each time: resize_token_embeddings edits it
        return transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip

    torch.manual_seed(0)
    base_state = transformers.GPT2LMHeadModel(config()).state_dict()  # the "pretrained" base

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config())
        model.load_state_dict(base_state)
        model.resize_token_embeddings(102)  # new rows drawn from `seed`
        model.requires_grad_(False)
        model.transformer.wte.weight.requires_grad_(True)  # tied to lm_head
        return mp.apply_mask(
            model, {"transformer.wte.weight": mp.Freeze(dim=0, index=list(range(100)))}
        )

    model = build(1)
    tokens = torch.randint(0, 102, (2, 12), generator=torch.Generator().manual_seed(0))
    tokens[:, ::3] = 101
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    state, size = through_file_with_size(mp.trainable_state_dict(model))
    print(f"GPT-2 two new rows: {size} bytes")
    assert [k for k in state if not k.startswith("meta:")] == ["transformer.wte.weight.free_values"]
    assert state["transformer.wte.weight.free_values"].numel() == 2 * 64
    fresh = build(2)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(tokens).logits, model(tokens).logits)
        mp.load_trainable_state_dict(fresh, state)
        assert torch.equal(fresh(tokens).logits, model(tokens).logits)
    # Another base (one frozen weight of one block changed) is refused by name.
    other = build(2)
    with torch.no_grad():
        other.transformer.h[1].mlp.c_fc.weight[0, 0] += 1e-3
    with pytest.raises(mp.MaskparamError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight'"):
        mp.load_trainable_state_dict(other, state)


RULES = {
    "mask_dense": lambda: {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1), layout="dense")},
    "mask_compact": lambda: {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1))},
    "freeze_dense": lambda: {"*.weight": mp.Freeze(mp.masks.random(0.5, seed=1), layout="dense")},
    "freeze_compact": lambda: {"*.weight": mp.Freeze(mp.masks.random(0.5, seed=1))},
    "freeze_slices": lambda: {"0.weight": mp.Freeze(dim=0, index=[0, 2, 4])},
    "triangular": lambda: {"2.weight": mp.Triangular()},
    "subspace": lambda: {"*.weight": mp.Subspace(4)},
    "subspace_fastfood": lambda: {"*": mp.Subspace(5, projection="fastfood", group="g", seed=2)},
    "learnable": lambda: {"*.weight": mp.LearnableMask(init=0.01)},
    "stack": lambda: {"0.weight": [mp.Triangular(), mp.Mask(mp.masks.random(0.5, seed=3))]},
}


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", list(RULES))
def test_round_trip_any_dtype_through_a_file(case, dtype):
    """fp16/bf16/fp64 fine-tunes round-trip through torch.load(weights_only=True) bit for bit."""
    rules = RULES[case]
    trained = mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, dtype=dtype, seed=0), rules())
    sgd_wd_steps(trained)
    state = through_file(mp.trainable_state_dict(trained))
    restored = mp.load_trainable_state_dict(
        mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, dtype=dtype, seed=0), rules()), state
    )
    with torch.no_grad():
        assert torch.equal(restored(X_6x7.to(dtype)), trained(X_6x7.to(dtype)))
    assert mp.verify(restored) == []


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize("case", list(RULES))
def test_load_overwrites_a_model_trained_further(case):
    """Loading onto the same model after more training gives back the saved outputs exactly."""
    model = mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), RULES[case]())
    sgd_wd_steps(model)
    state = mp.trainable_state_dict(model)
    with torch.no_grad():
        expected = model(X_6x7)
    sgd_wd_steps(model, steps=4)
    mp.load_trainable_state_dict(model, state)
    with torch.no_grad():
        assert torch.equal(model(X_6x7), expected)


# from the attack on to_sparse and trainable_state_dict
def test_batchnorm_running_statistics_and_buffers_travel():
    """BatchNorm running stats and num_batches_tracked are restored exactly."""

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 9), nn.BatchNorm1d(9), nn.Linear(9, 5))
        return mp.apply_mask(model, {"*.weight": mp.Freeze(mp.masks.random(0.5, seed=1))})

    trained = build().train()
    sgd_wd_steps(trained)
    state = through_file(mp.trainable_state_dict(trained))
    restored = mp.load_trainable_state_dict(build(), state)
    for key, value in trained.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    trained.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(X_6x7), trained(X_6x7))


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize("case", ["freeze_dense", "freeze_compact", "freeze_slices", "subspace"])
def test_another_base_in_the_last_bit_is_refused_untouched(case):
    """A base whose frozen weights differ in one last bit is refused by name, model untouched."""
    trained = mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), RULES[case]())
    sgd_wd_steps(trained)
    state = mp.trainable_state_dict(trained)
    other = mlp(7, 9, 5, activation=nn.ReLU, seed=0)
    # An entry the training did not move: a frozen one (any entry, for a subspace).
    unmoved = (trained[0].weight == other[0].weight).view(-1).nonzero()
    first = int(unmoved[0]) if len(unmoved) else 0
    with torch.no_grad():
        w = other[0].weight
        w.view(-1)[first] = torch.nextafter(w.view(-1)[first], torch.tensor(float("inf")))
    other = mp.apply_mask(other, RULES[case]())
    before, summary = state_bits(other), mp.summary(other)
    with pytest.raises(mp.MaskparamError, match=r"'0\.weight'"):
        mp.load_trainable_state_dict(other, state)
    assert_same_bits(other, before)
    assert mp.summary(other) == summary


# from the attack on to_sparse and trainable_state_dict
def test_untouched_frozen_parameter_that_differs_is_refused():
    """A frozen, unconstrained bias that differs from the base is refused by name."""

    def build():
        model = mlp(7, 9, 5, activation=nn.ReLU, seed=0)
        model[0].bias.requires_grad_(False)
        return mp.apply_mask(model, {"*.weight": mp.Mask(mp.masks.random(0.5, seed=1))})

    trained = build()
    sgd_wd_steps(trained)
    state = mp.trainable_state_dict(trained)
    other = build()
    with torch.no_grad():
        other[0].bias[0] += 1e-6
    before = state_bits(other)
    with pytest.raises(mp.MaskparamError, match=r"'0\.bias'"):
        mp.load_trainable_state_dict(other, state)
    assert_same_bits(other, before)


def _full_rules(seed: int = 1) -> mp.Rules:
    return {
        "0.weight": [mp.Triangular(), mp.Mask(mp.masks.random(0.5, seed=3))],
        "2.weight": mp.Mask(mp.masks.random(0.5, seed=seed), layout="dense"),
    }


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize(
    "make_other",
    [
        pytest.param(
            lambda: mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), _full_rules(seed=9)),
            id="other_seed",
        ),
        pytest.param(
            lambda: mp.apply_mask(
                mlp(7, 9, 5, activation=nn.ReLU, dtype=torch.float64, seed=0), _full_rules()
            ),
            id="other_dtype",
        ),
    ],
)
def test_refusals_name_the_tensor_and_change_nothing(make_other):
    """Another mask seed or another dtype: MaskparamError naming the tensor, model unchanged."""
    trained = mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), _full_rules())
    sgd_wd_steps(trained)
    state = through_file(mp.trainable_state_dict(trained))
    other = make_other()
    before, summary = state_bits(other), mp.summary(other)
    with pytest.raises(mp.MaskparamError, match=r"'[02]\.weight"):
        mp.load_trainable_state_dict(other, state)
    assert_same_bits(other, before)
    assert mp.summary(other) == summary


# from the attack on to_sparse and trainable_state_dict
def test_a_forgotten_rule_is_named():
    """Loading onto a model where the user forgot the rule for 2.weight names '2.weight'."""
    trained = mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), _full_rules())
    sgd_wd_steps(trained)
    state = mp.trainable_state_dict(trained)
    other = mp.apply_mask(
        mlp(7, 9, 5, activation=nn.ReLU, seed=0), RULES["stack"]()
    )  # the rule for 2.weight forgotten
    before = state_bits(other)
    with pytest.raises(mp.MaskparamError) as info:
        mp.load_trainable_state_dict(other, state)
    assert_same_bits(other, before)
    assert "2.weight" in str(info.value)


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.parametrize("damage", ["extra", "missing", "truncated", "two_d", "dtype"])
def test_damaged_states_are_refused_untouched(damage):
    """An extra/missing key, a truncated, reshaped or retyped tensor: refused, model unchanged."""
    rules = RULES["mask_compact"]
    trained = mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), rules())
    sgd_wd_steps(trained)
    state = dict(mp.trainable_state_dict(trained))
    key = "0.weight.free_values"
    if damage == "extra":
        state["9.weight.free_values"] = torch.zeros(3)
    elif damage == "missing":
        del state["2.bias"]
    elif damage == "truncated":
        state[key] = state[key][:-1]
    elif damage == "two_d":
        state[key] = state[key].reshape(1, -1)
    else:
        state[key] = state[key].double()
    other = mp.apply_mask(mlp(7, 9, 5, activation=nn.ReLU, seed=0), rules())
    sgd_wd_steps(other, steps=1)
    before = state_bits(other)
    with pytest.raises(mp.MaskparamError):
        mp.load_trainable_state_dict(other, state)
    assert_same_bits(other, before)


# from the attack on to_sparse and trainable_state_dict
@pytest.mark.xfail(
    strict=True,
    reason="documented (README, Checkpoints): buffers count as base, except normalisation running "
    "statistics; the old spectral_norm's u and v change in every training forward",
)
def test_spectral_norm_fine_tune_round_trips():
    """A model with nn.utils.spectral_norm fine-tuned under a Mask restores onto its base."""

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(7, 9)), nn.ReLU(), nn.Linear(9, 5))
        return mp.apply_mask(model, {"2.weight": mp.Mask(mp.masks.random(0.5, seed=1))})

    trained = build()
    sgd_wd_steps(trained)
    state = mp.trainable_state_dict(trained)
    restored = mp.load_trainable_state_dict(build(), state)
    trained.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(X_6x7), trained(X_6x7))


@pytest.mark.parametrize(
    "spec",
    [
        mp.Freeze(dim=0, index=[1, 2]),  # the README's frozen filters
        mp.Freeze(mp.masks.random(0.5, seed=0), layout="dense"),
        mp.Mask(mp.masks.random(0.3, seed=0), layout="compact"),
    ],
    ids=["freeze-slices", "freeze-dense", "mask-compact"],
)
def test_a_channels_last_fine_tune_round_trips_and_stays_channels_last(spec):
    def fine_tune_model():
        torch.manual_seed(0)
        convs = nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 4, 3))
        convs = convs.to(memory_format=torch.channels_last)
        return mp.apply_mask(convs, {"0.weight": spec, "2.weight": spec})

    tuned = fine_tune_model()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        optimizer.zero_grad()
        tuned(x).square().mean().backward()
        optimizer.step()
    restored = fine_tune_model()
    stored = [restored[i].parametrizations.weight.original for i in (0, 2)]
    formats = [s.is_contiguous(memory_format=torch.channels_last) for s in stored]
    mp.load_trainable_state_dict(restored, mp.trainable_state_dict(tuned))
    assert [s.is_contiguous(memory_format=torch.channels_last) for s in stored] == formats
    with torch.no_grad():
        assert torch.equal(restored(x), tuned(x))
    for i in (0, 2):
        assert torch.equal(restored[i].weight, tuned[i].weight)
        assert torch.equal(restored[i].bias, tuned[i].bias)


@pytest.mark.parametrize(("saved", "loaded"), [("compact", "dense"), ("dense", "compact")])
def test_a_freeze_fine_tune_loads_into_the_other_layout(saved, loaded):
    # The base checksum covers what both layouts hold (the frozen values in full), not the names
    # each stores them under.
    def fine_tune_model(layout: str) -> nn.Module:
        base = mlp(8, 8, 2, activation=nn.ReLU, seed=0)
        return mp.apply_mask(
            base, {"*.weight": mp.Freeze(mp.masks.random(0.7, seed=0), layout=layout)}
        )

    tuned = fine_tune_model(saved)
    x = torch.randn(4, 8)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        tuned(x).square().mean().backward()
        optimizer.step()
    restored = fine_tune_model(loaded)
    assert is_compact(restored) == (loaded == "compact")
    mp.load_trainable_state_dict(restored, mp.trainable_state_dict(tuned))
    with torch.no_grad():
        assert torch.equal(restored(x), tuned(x))
    for i in (0, 2):
        assert torch.equal(restored[i].weight, tuned[i].weight)
    frozen, values = mp.frozen_entries(restored, "0.weight")
    assert torch.equal(frozen, mp.frozen_entries(tuned, "0.weight")[0])
    assert torch.equal(values, mp.frozen_entries(tuned, "0.weight")[1])


def _drawn_mask_model(seed: int) -> nn.Module:
    # A mask that comes out otherwise at each computation, as fisher or wanda computed from
    # batches in train mode (dropout draws other masks).
    base = mlp(8, 8, 2, activation=nn.ReLU, seed=0)
    torch.manual_seed(seed)
    return mp.apply_mask(base, {"0.weight": mp.Mask(lambda w: torch.rand(w.shape) < 0.4)})


def test_a_state_whose_masks_came_out_otherwise_is_refused_naming_the_cause_and_the_fix():
    tuned = _drawn_mask_model(1)
    state = mp.trainable_state_dict(tuned)
    other = _drawn_mask_model(2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(mp.MaskparamError) as refused:
        mp.load_trainable_state_dict(other, state)
    message = str(refused.value)
    assert "'0.weight': its free entries are not the state's" in message
    assert "fisher or wanda computed in train mode, whose dropout draws other masks" in message
    assert "mp.trainable_state_dict(model, positions=True)" in message.split("fix:")[1]
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_a_state_saved_with_positions_brings_its_masks():
    tuned = _drawn_mask_model(1)
    x = torch.randn(4, 8)
    optimizer = torch.optim.SGD(tuned.parameters(), lr=0.1)
    tuned(x).square().mean().backward()
    optimizer.step()
    state = mp.trainable_state_dict(tuned, positions=True)
    assert torch.equal(
        state["0.weight.free_positions"].long(),
        mp.kept_entries(tuned, "0.weight").reshape(-1).nonzero().reshape(-1),
    )
    other = _drawn_mask_model(2)
    mp.load_trainable_state_dict(other, state, optimizer=None)  # the mask changes
    assert torch.equal(mp.kept_entries(other, "0.weight"), mp.kept_entries(tuned, "0.weight"))
    with torch.no_grad():
        assert torch.equal(other(x), tuned(x))
