"""mp.shrink: a baked model loses its all-zero channel groups physically and computes what the
masked model computed, on inputs other than the example too."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import maskparam as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from models import MobileNetV3Small, ResNet18


def _logits(output: object) -> Tensor:
    return output if isinstance(output, Tensor) else output["logits"]  # type: ignore[index]


def _pruned_baked_shrunk(
    model: nn.Module, x: object, other: object, *, steps: int = 3
) -> tuple[Tensor, Tensor]:
    """GradualPruning to 50% of each layer's channel groups while training, checked by
    mp.verify; bake; shrink. The masked and the shrunk model's eval outputs on ``other``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    schedule = mp.GradualPruning(
        model, {"*": lambda s: mp.masks.channels(s, example_inputs=x)}, sparsity=0.5,
        end=steps - 1, optimizer=optimizer,
    )  # fmt: skip
    call = (lambda m, a: m(**a)) if isinstance(x, dict) else (lambda m, a: m(a))
    for _ in range(steps):
        optimizer.zero_grad()
        _logits(call(model, x)).square().mean().backward()
        optimizer.step()
        schedule.step()
    assert mp.verify(model) == []
    model.eval()
    with torch.no_grad():
        masked = _logits(call(model, other))
    mp.remove_parametrizations(model)
    classes = [type(m) for m in model.modules()]
    bytes_before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert mp.shrink(model, x) is model
    assert [type(m) for m in model.modules()] == classes
    bytes_after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert bytes_after < bytes_before
    assert model.shrink_report.bytes_after == bytes_after  # type: ignore[union-attr]
    with torch.no_grad():
        shrunk = _logits(call(model, other))
    return masked, shrunk


def _close(masked: Tensor, shrunk: Tensor) -> None:
    torch.testing.assert_close(shrunk, masked, rtol=1e-4, atol=1e-5 * float(masked.abs().max()))


@pytest.mark.parametrize(
    ("build", "kept"),
    [(ResNet18, 3_055_880), (MobileNetV3Small, 911_224)],
    ids=["resnet18", "mobilenet_v3_small"],
)
def test_a_torchvision_cnn_shrinks_to_half_its_channels_with_equal_outputs(build, kept):
    torch.manual_seed(0)
    model = build()
    masked, shrunk = _pruned_baked_shrunk(
        model, torch.randn(2, 3, 32, 32), torch.randn(3, 3, 48, 48)
    )
    _close(masked, shrunk)
    # The count Torch-Pruning's MetaPruner reaches at pruning_ratio=0.5 on the same layers.
    assert sum(p.numel() for p in model.parameters()) == kept
    assert not model.shrink_report.not_removed  # type: ignore[union-attr]


def test_resnet18s_conv_and_batchnorm_attributes_follow_their_tensors():
    torch.manual_seed(0)
    model = ResNet18()
    _pruned_baked_shrunk(model, torch.randn(2, 3, 32, 32), torch.randn(1, 3, 32, 32))
    conv, bn = model.layer2[0].conv1, model.layer2[0].bn1
    assert (conv.in_channels, conv.out_channels, bn.num_features) == (32, 64, 64)
    assert conv.weight.shape == (64, 32, 3, 3)
    assert bn.running_mean.shape == (64,)
    assert (model.fc.in_features, model.fc.out_features) == (256, 1000)


def test_hf_convnext_mlp_neurons_shrink_with_equal_outputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1], num_labels=7
    )
    model = transformers.ConvNextForImageClassification(config)
    mlp = model.convnext.encoder.stages[2].layers[1]
    masked, shrunk = _pruned_baked_shrunk(
        model, torch.randn(2, 3, 64, 64), torch.randn(1, 3, 96, 96)
    )
    _close(masked, shrunk)
    assert (mlp.pwconv1.out_features, mlp.pwconv2.in_features) == (96, 96)  # of 4 x 48
    # The stages' streams go through LayerNorm: not removable, so not masked, nothing to report.
    assert mlp.dwconv.out_channels == 48


def test_hf_llama_from_a_config_shrinks_heads_and_mlp_neurons_with_equal_outputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 96, (2, 7))
    masked, shrunk = _pruned_baked_shrunk(model, ids, torch.randint(0, 96, (3, 11)))
    _close(masked, shrunk)
    layer = model.model.layers[1]
    assert (layer.mlp.gate_proj.out_features, layer.mlp.down_proj.in_features) == (40, 40)
    # One of the two key/value heads goes, with the two query heads that read it.
    assert (layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features) == (32, 16)
    assert layer.self_attn.o_proj.in_features == 32


def test_hf_vit_shrinks_heads_and_mlp_neurons_with_equal_outputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_labels=3,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config)
    masked, shrunk = _pruned_baked_shrunk(
        model, torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)
    )
    _close(masked, shrunk)
    layer = model.vit.layers[0]
    assert (layer.mlp.fc1.out_features, layer.mlp.fc2.in_features) == (24, 24)
    assert (layer.attention.q_proj.out_features, layer.attention.o_proj.in_features) == (16, 16)
    assert not model.shrink_report.not_removed  # type: ignore[union-attr]


class _FixedSlice(nn.Module):
    """A model whose code fixes a channel count: removing a's channels breaks x[:, :4]."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(4, 2)
        self.c = nn.Linear(3, 5)
        self.d = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(
            torch.relu(self.a(x)).reshape(x.shape[0], 6)[:, :4] + self.d(torch.relu(self.c(x)))
        )


def test_a_layer_the_code_fixes_is_put_back_and_reported_the_others_removed():
    torch.manual_seed(0)
    model = _FixedSlice()
    with torch.no_grad():
        model.c.weight[1:3] = 0
        model.c.bias[1:3] = 0
        model.d.weight[:, 1:3] = 0
        model.a.weight[4:] = 0  # a's last two rows are read by no one: blocked by the slice
        model.a.bias[4:] = 0
    x = torch.randn(3, 3)
    before = model(x)
    mp.shrink(model, x)
    assert model.c.out_features == 3
    assert model.d.in_features == 3
    assert model.a.out_features == 6
    report = model.shrink_report  # type: ignore[union-attr]
    (kept,) = report.not_removed
    assert kept.name == "a.weight[dim 0]"
    assert "fixed positions" in str(kept.reason)
    torch.testing.assert_close(model(x), before)


class _HardCoded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        return self.b(h.reshape(x.shape[0], 6))  # a literal 6: fine for the tracer, not for shrink


def _hard_coded_with_a_zero_channel() -> _HardCoded:
    torch.manual_seed(0)
    model = _HardCoded()
    with torch.no_grad():
        model.a.weight[0] = 0
        model.a.bias[0] = 0
        model.b.weight[:, 0] = 0
    return model


def test_a_removal_that_breaks_the_forward_is_undone_with_the_reason():
    model = _hard_coded_with_a_zero_channel()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(2, 3)
    mp.shrink(model, x)
    (kept,) = model.shrink_report.not_removed  # type: ignore[union-attr]
    assert kept.removed == 0
    assert "does not run without them (RuntimeError" in str(kept.reason)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert model.a.out_features == 6


def test_shrink_keeps_the_parameter_objects_and_a_channel_of_every_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
        model[2].weight.zero_()
    model(torch.randn(1, 3)).sum().backward()
    params = list(model.parameters())
    mp.shrink(model, torch.randn(2, 3))
    assert list(model.parameters()) == params
    assert model[0].out_features == 1
    assert all(p.grad is None for p in params[:3])
    assert model.shrink_report.layers[0].reason == "a layer keeps at least one channel"  # type: ignore[union-attr]
    optimizer = torch.optim.AdamW(model.parameters())  # a new optimizer trains the small model
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()


def test_shrink_refuses_a_model_that_is_still_constrained_and_leaves_it_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    mp.apply_mask(model, {"*": mp.Mask(mp.masks.channels(0.5, example_inputs=torch.randn(2, 3)))})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mp.MaskparamError, match="remove_parametrizations"):
        mp.shrink(model, torch.randn(2, 3))
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.values(), strict=True)
    )
    with pytest.raises(mp.MaskparamError, match="example_inputs"):
        mp.shrink(nn.Linear(2, 2), None)  # type: ignore[arg-type]


class _DenseBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(12, 4, 1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = self.a(x)
        b = self.b(a)
        c = self.c(torch.cat([a, b], 1))
        return self.fc(self.bn(torch.cat([a, b, c], 1)).mean((2, 3)))


def test_concatenations_read_by_several_layers_shrink_with_equal_outputs():
    torch.manual_seed(0)
    model = _DenseBlock()
    x = torch.randn(2, 3, 5, 5)
    mp.apply_mask(model, {"*": mp.Mask(mp.masks.channels(0.5, example_inputs=x))})
    model.eval()
    other = torch.randn(3, 3, 7, 7)
    with torch.no_grad():
        masked = model(other)
    mp.remove_parametrizations(model)
    mp.shrink(model, x)
    assert (model.a.out_channels, model.c.in_channels, model.bn.num_features) == (4, 6, 8)
    with torch.no_grad():
        _close(masked, model(other))


def test_the_check_is_per_element_and_an_infinite_output_does_not_loosen_it():
    got = torch.tensor([1.0, float("-inf"), 2e5])
    from maskparam.export.shrink import _differs

    assert _differs([got], [got.clone()], 1e-4, 1e-5) is None
    assert _differs([got + torch.tensor([0.5, 0.0, 0.0])], [got], 1e-4, 1e-5) is not None
    assert _differs([torch.tensor([1.0, 0.0, 2e5])], [got], 1e-4, 1e-5) is not None


def test_a_layer_put_back_keeps_its_gradients():
    model = _hard_coded_with_a_zero_channel()
    x = torch.randn(2, 3)
    model(x).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    mp.shrink(model, x)
    assert model.shrink_report.removed == 0  # type: ignore[union-attr]
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
