"""mp.masks.channel_groups: which slices of which tensors go together, found by tracing the model.

Each architecture's coupling is checked against what removing the channel by hand requires; a
group that may not be removed says why; tracing leaves the model as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import maskparam as mp


def _family_of(groups: mp.masks.ChannelGroups, name: str, dim: int) -> list[mp.masks.ChannelGroup]:
    found = [f for f in groups.families() if (name, dim) in f[0].family]
    assert len(found) == 1, [f[0].family for f in found]
    return found[0]


def _members(group: mp.masks.ChannelGroup) -> dict[tuple[str, int], tuple[int, ...]]:
    return {(name, dim): indices for name, dim, indices in group.slices}


def test_an_mlp_neuron_is_its_row_bias_and_the_next_column():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    groups = mp.masks.channel_groups(model, torch.randn(2, 3))
    hidden = _family_of(groups, "0.weight", 0)
    assert [_members(g) for g in hidden] == [
        {("0.weight", 0): (i,), ("0.bias", 0): (i,), ("2.weight", 1): (i,)} for i in range(4)
    ]
    assert all(g.blocked is None for g in hidden)
    # The model's own input and output features are never removable.
    assert all(g.blocked for g in _family_of(groups, "0.weight", 1))
    assert all("output" in str(g.blocked) for g in _family_of(groups, "2.weight", 0))


def test_batchnorm_and_its_statistics_go_with_the_conv_channel_and_flatten_takes_blocks():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
        nn.Flatten(), nn.Linear(2 * 5 * 5, 3),
    )  # fmt: skip
    groups = mp.masks.channel_groups(model, torch.randn(1, 3, 5, 5))
    first = _family_of(groups, "0.weight", 0)
    assert _members(first[2]) == {
        ("0.weight", 0): (2,), ("0.bias", 0): (2,), ("1.weight", 0): (2,), ("1.bias", 0): (2,),
        ("1.running_mean", 0): (2,), ("1.running_var", 0): (2,), ("3.weight", 1): (2,),
    }  # fmt: skip
    second = _family_of(groups, "3.weight", 0)
    assert _members(second[1])[("5.weight", 1)] == tuple(range(25, 50))  # channel 1's 5 x 5
    touched = {name for group in groups.groups for name in group.tensors()}
    assert "1.num_batches_tracked" not in touched  # an int counter: no channels


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(x + self.body(x)))


def test_a_residual_addition_ties_the_channels_of_both_summands():
    groups = mp.masks.channel_groups(_Residual(), torch.randn(1, 3, 4, 4))
    stream = _family_of(groups, "stem.weight", 0)
    assert set(_members(stream[0])) == {
        ("stem.weight", 0), ("stem.bias", 0), ("body.weight", 1), ("body.weight", 0),
        ("body.bias", 0), ("head.weight", 1),
    }  # fmt: skip
    assert len(stream) == 4
    assert all(g.blocked is None for g in stream)


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(5, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concatenated_channels_take_their_own_columns_of_the_consumer():
    groups = mp.masks.channel_groups(_Concat(), torch.randn(1, 3, 4, 4))
    a = _family_of(groups, "a.weight", 0)
    b = _family_of(groups, "b.weight", 0)
    assert [_members(g)[("head.weight", 1)] for g in a] == [(0,), (1,)]
    assert [_members(g)[("head.weight", 1)] for g in b] == [(2,), (3,), (4,)]


def test_a_depthwise_conv_passes_channels_through_and_a_grouped_one_blocks_them():
    depthwise = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 2, 1))
    groups = mp.masks.channel_groups(depthwise, torch.randn(1, 3, 6, 6))
    family = _family_of(groups, "0.weight", 0)
    # Input channel k of the depthwise conv with its two outputs 2k, 2k + 1 and their columns.
    assert _members(family[1])[("1.weight", 0)] == (2, 3)
    assert _members(family[1])[("2.weight", 1)] == (2, 3)
    grouped = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    groups = mp.masks.channel_groups(grouped, torch.randn(1, 3, 6, 6))
    assert all("grouped conv" in str(g.blocked) for g in _family_of(groups, "0.weight", 0))


class _Mixes(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Linear(3, 6)
        self.norm = nn.LayerNorm(6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.a(x))
        if self.how == "layer_norm":
            h = self.norm(h)
        elif self.how == "sum":
            h = h + h.sum(dim=-1, keepdim=True)
        elif self.how == "slice":
            h = torch.cat([h[:, :3], h[:, 3:] * 2], dim=-1)
        elif self.how == "softmax":
            h = h.softmax(dim=-1)
        elif self.how == "unknown":
            h = torch.cumsum(h, dim=0).flip(-1)
        return self.b(h)


@pytest.mark.parametrize("how", ["layer_norm", "sum", "slice", "softmax", "unknown"])
def test_channels_mixed_with_each_other_are_blocked(how):
    # A removed channel's value is sigmoid(0) = 0.5, not 0: whatever mixes it into the others
    # would compute differently without it.
    groups = mp.masks.channel_groups(_Mixes(how), torch.randn(2, 3))
    hidden = [g for g in groups.groups if ("a.weight", 0) in g.family]
    assert sum(len(_members(g)[("a.weight", 0)]) for g in hidden) == 6
    assert all(g.blocked for g in hidden), hidden[0]
    if how == "unknown":
        assert dict(groups.unknown_ops) == {"aten.flip": 1}


def test_channels_that_stay_apart_are_not_blocked():
    groups = mp.masks.channel_groups(_Mixes("none"), torch.randn(2, 3))
    assert all(g.blocked is None for g in _family_of(groups, "a.weight", 0))


def test_llama_heads_go_with_their_key_value_head_and_mlp_neurons_with_gate_and_up():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 5))
    groups = mp.masks.channel_groups(model, ids)  # the key/value cache follows its heads
    prefix = "model.layers.0."
    heads = _family_of(groups, prefix + "self_attn.q_proj.weight", 0)
    assert len(heads) == 2  # one group per key/value head: it and the two query heads reading it
    assert all(g.blocked is None for g in heads)
    assert _members(heads[1]) == {
        (prefix + "self_attn.q_proj.weight", 0): tuple(range(16, 32)),
        (prefix + "self_attn.k_proj.weight", 0): tuple(range(8, 16)),
        (prefix + "self_attn.v_proj.weight", 0): tuple(range(8, 16)),
        (prefix + "self_attn.o_proj.weight", 1): tuple(range(16, 32)),
    }
    mlp = _family_of(groups, prefix + "mlp.gate_proj.weight", 0)
    assert len(mlp) == 24
    assert all(g.blocked is None for g in mlp)
    assert set(_members(mlp[5])) == {
        (prefix + "mlp.gate_proj.weight", 0), (prefix + "mlp.up_proj.weight", 0),
        (prefix + "mlp.down_proj.weight", 1),
    }  # fmt: skip
    # The residual stream goes through RMSNorm (a mean over its channels): blocked.
    assert all(g.blocked for g in _family_of(groups, "model.embed_tokens.weight", 1))


def test_tracing_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1)
    )
    model.train()
    model[1].eval()
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    params = list(model.parameters())
    rng = torch.get_rng_state()
    mp.masks.channel_groups(model, x)
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    assert list(model.parameters()) == params
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values(), strict=True)
    )
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_constrained_model_traces_as_its_plain_copy_and_keeps_its_originals():
    torch.manual_seed(0)
    plain = _Residual()
    constrained = copy.deepcopy(plain)
    mp.apply_mask(constrained, {"*": mp.Mask(mp.masks.magnitude(0.5))})
    stored = copy.deepcopy(constrained.state_dict())
    x = torch.randn(1, 3, 4, 4)
    assert mp.masks.channel_groups(constrained, x) == mp.masks.channel_groups(plain, x)
    assert all(
        torch.equal(a, b)
        for a, b in zip(constrained.state_dict().values(), stored.values(), strict=True)
    )


def test_bad_example_inputs_are_refused_with_the_reason():
    model = nn.Linear(3, 2)
    with pytest.raises(mp.MaskparamError, match="example_inputs must be a tensor"):
        mp.masks.channel_groups(model, 3.0)
    with pytest.raises(mp.MaskparamError, match="RuntimeError"):
        mp.masks.channel_groups(model, torch.randn(2, 5))
    with pytest.raises(mp.MaskparamError, match="must be a torch.nn.Module"):
        mp.masks.channel_groups("model", torch.randn(2, 3))  # type: ignore[arg-type]


def test_keyword_and_positional_example_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
            return {"out": self.b(torch.relu(self.a(x))) * scale}

    x = torch.randn(2, 3)
    by_position = mp.masks.channel_groups(TwoInputs(), (x, 2.0))
    by_keyword = mp.masks.channel_groups(TwoInputs(), {"x": x, "scale": 2.0})
    assert by_position.groups == by_keyword.groups
    assert len(_family_of(by_keyword, "a.weight", 0)) == 4


def test_a_module_that_computes_without_reading_its_weight_is_refused_by_name():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    mp.apply_mask(model, {"0.weight": mp.Mask(mp.masks.magnitude(0.5), layout="csr")})
    with pytest.raises(mp.MaskparamError, match=r"'0\.weight'.*cannot follow"):
        mp.masks.channel_groups(model, torch.randn(3, 8))


def test_a_max_over_the_channels_blocks_them_and_keeps_the_classes():
    class Predict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.f(x).max(dim=1)  # (score, class)

    groups = mp.masks.channel_groups(Predict(), torch.randn(4, 8))
    assert all(g.blocked for g in _family_of(groups, "f.2.weight", 0))


def test_outputs_in_a_dataclass_are_outputs():
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 16)
            self.o = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> Out:
            return Out(self.o(torch.relu(self.a(x))))

    groups = mp.masks.channel_groups(Model(), torch.randn(2, 6))
    assert all("output" in str(g.blocked) for g in _family_of(groups, "o.weight", 0))


def test_a_forward_that_writes_its_buffers_writes_copies():
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.register_buffer("count", torch.zeros((), dtype=torch.long))
            self.register_buffer("ema", torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count += 1
            y = self.a(x)
            self.ema.mul_(0.9).add_(y.detach().mean(0))
            return y

    model = Counting()
    mp.masks.channel_groups(model, torch.randn(2, 3))
    assert int(model.count) == 0
    assert torch.equal(model.ema, torch.zeros(4))


def test_pooling_an_unbatched_tensor_pools_across_its_features():
    class Pools(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 16)
            self.b = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(nn.functional.max_pool1d(torch.relu(self.a(x)), 2))  # (N, C) as (C, L)

    groups = mp.masks.channel_groups(Pools(), torch.randn(4, 3))
    assert all(g.blocked for g in groups.groups if ("a.weight", 0) in g.family)


def test_an_rnn_keeps_its_channels():
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])

    groups = mp.masks.channel_groups(Tagger(), torch.randn(2, 5, 4))
    assert not groups.removable()
    assert dict(groups.unknown_ops) == {"aten.lstm": 1}


def test_an_index_along_the_channels_blocks_them_even_a_full_permutation():
    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.o = nn.Conv2d(8, 2, 1)
            self.register_buffer("perm", torch.arange(7, -1, -1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(torch.relu(self.a(x)).index_select(1, self.perm))

    groups = mp.masks.channel_groups(Shuffle(), torch.randn(1, 3, 4, 4))
    assert all(g.blocked for g in groups.groups if ("a.weight", 0) in g.family)


def test_an_unbatched_conv_input_has_its_channels_first():
    class Unbatched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.o = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(torch.relu(self.b(torch.relu(self.a(x)))))

    groups = mp.masks.channel_groups(Unbatched(), torch.randn(3, 8, 8))  # (C, H, W)
    assert len(_family_of(groups, "a.weight", 0)) == 8
    assert all(g.blocked is None for g in _family_of(groups, "a.weight", 0))
    softmax = mp.masks.channel_groups(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softmax(dim=0), nn.Conv2d(8, 2, 1)),
        torch.randn(3, 8, 8),
    )
    assert all(g.blocked for g in _family_of(softmax, "0.weight", 0))


def test_a_model_that_traces_in_eval_mode_only_says_so():
    class ReadsInTraining(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.o = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            if self.training and h.max() > 1e6:  # reads a value: make_fx cannot follow
                print("huge")
            return self.o(h)

    with pytest.warns(mp.MaskparamWarning, match="eval mode only"):
        groups = mp.masks.channel_groups(ReadsInTraining(), torch.randn(2, 3))
    assert len(_family_of(groups, "a.weight", 0)) == 4
