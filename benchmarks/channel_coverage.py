"""Which models channel pruning covers: for each model, whether each way of tracing it works
(``torch.fx.symbolic_trace``, ``torch.export.export``, ``make_fx(pre_dispatch=True)`` which
maskparam uses, and Torch-Pruning's autograd-graph ``DependencyGraph``), and what 50% of each
layer's channel groups gives with maskparam (masked, baked, ``mp.shrink``: parameters kept, the
largest difference to the masked model on another input) and with Torch-Pruning's
``MetaPruner(pruning_ratio=0.5)`` (parameters kept; whether the pruned model still runs).

No timings: counts and checks only. Models: torchvision's resnet18 and mobilenet_v3_small written
out (``models.py``), and ``transformers`` models built from small configs (timm needs torchvision,
which does not load beside the CPU build of torch here; transformers' ConvNeXt and ViT are the
same architectures).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import torch
from harness import markdown_table
from models import MobileNetV3Small, ResNet18
from torch import Tensor, nn

import maskparam as mp


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        for key in ("logits", "last_hidden_state"):
            if key in output:
                return output[key]  # type: ignore[no-any-return]
    return output[0]  # type: ignore[no-any-return]


def _models() -> dict[
    str, tuple[Callable[[], nn.Module], Callable[[], Any], Callable[[nn.Module], nn.Module]]
]:
    """name -> (build, example input, the output layer Torch-Pruning must leave alone)."""
    found: dict[str, Any] = {
        "resnet18": (ResNet18, lambda: torch.randn(2, 3, 64, 64), lambda m: m.fc),
        "mobilenet_v3_small": (
            MobileNetV3Small,
            lambda: torch.randn(2, 3, 64, 64),
            lambda m: m.classifier[-1],
        ),
    }
    if importlib.util.find_spec("transformers") is None:
        return found
    import transformers as tf

    ids = lambda: torch.randint(0, 256, (2, 16))
    found.update(
        {
            "HF ConvNeXt": (
                lambda: tf.ConvNextForImageClassification(
                    tf.ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], num_labels=10)
                ),
                lambda: torch.randn(2, 3, 64, 64),
                lambda m: m.classifier,
            ),
            "HF ViT": (
                lambda: tf.ViTForImageClassification(
                    tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_labels=10)
                ),
                lambda: torch.randn(2, 3, 32, 32),
                lambda m: m.classifier,
            ),
            "HF Llama": (
                lambda: tf.LlamaForCausalLM(
                    tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
                ),
                ids,
                lambda m: m.lm_head,
            ),
            "HF BERT": (
                lambda: tf.BertForSequenceClassification(
                    tf.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_labels=3)
                ),
                ids,
                lambda m: m.classifier,
            ),
            "HF GPT-2": (
                lambda: tf.GPT2LMHeadModel(
                    tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
                ),
                ids,
                lambda m: m.lm_head,
            ),
        }
    )  # fmt: skip
    return found


def _works(run: Callable[[], object]) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run()
    except Exception as failure:  # noqa: BLE001 - the table records that it failed
        return f"no ({type(failure).__name__})"
    return "yes"


def _export(model: nn.Module, x: Tensor) -> None:
    torch.export.export(model.eval(), (x,), strict=False)


def _make_fx(model: nn.Module, x: Tensor) -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    make_fx(lambda a: _logits(model.eval()(a)), pre_dispatch=True)(x)


def _dependency_graph(model: nn.Module, x: Tensor) -> None:
    import torch_pruning as tp

    tp.DependencyGraph().build_dependency(model, example_inputs=x)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _maskparam(model: nn.Module, x: Tensor, other: Tensor) -> list[str]:
    before = _params(model)
    groups = mp.masks.channel_groups(model, x)
    removable = {
        name for g in groups.removable() for name in g.tensors() if name in groups.parameters
    }
    covered = sum(p.numel() for n, p in model.named_parameters() if n in removable)
    mp.apply_mask(model, {"*": mp.Mask(mp.masks.channels(0.5, example_inputs=x))})
    model.eval()
    with torch.no_grad():
        masked = _logits(model(other))
    mp.remove_parametrizations(model)
    mp.shrink(model, x)
    with torch.no_grad():
        difference = float((_logits(model(other)) - masked).abs().max())
    report = model.shrink_report  # type: ignore[union-attr]
    not_removed = len(report.not_removed)
    return [
        f"{100 * covered / before:.0f}%",
        f"{100 * _params(model) / before:.0f}%",
        f"{difference:.0e}",
        str(not_removed),
    ]


def _torch_pruning(model: nn.Module, x: Tensor, head: nn.Module) -> list[str]:
    import torch_pruning as tp

    before = _params(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tp.pruner.MetaPruner(
                model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5,
                ignored_layers=[head],
            ).step()  # fmt: skip
    except Exception as failure:  # noqa: BLE001 - the table records that it failed
        return [f"fails ({type(failure).__name__})", "-"]
    runs = _works(lambda: model.eval()(x))
    return [f"{100 * _params(model) / before:.0f}%", runs]


def run() -> str:
    has_tp = importlib.util.find_spec("torch_pruning") is not None
    rows = []
    for name, (build, example, head) in _models().items():
        torch.manual_seed(0)
        model = build().eval()
        x, other = example(), example()
        row = [
            name,
            _works(lambda m=model: torch.fx.symbolic_trace(copy.deepcopy(m))),
            _works(lambda m=model, x=x: _export(copy.deepcopy(m), x)),
            _works(lambda m=model, x=x: _make_fx(copy.deepcopy(m), x)),
            _works(lambda m=model, x=x: _dependency_graph(copy.deepcopy(m), x)) if has_tp else "-",
        ]
        row += _maskparam(copy.deepcopy(model), x, other)
        pruned = copy.deepcopy(model)
        row += _torch_pruning(pruned, x, head(pruned)) if has_tp else ["-", "-"]
        rows.append(row)
    header = [
        "model", "FX symbolic_trace", "torch.export", "make_fx (maskparam)",
        "autograd graph (Torch-Pruning)", "maskparam: params in tensors with removable groups",
        "maskparam: params kept", "maskparam: max diff to masked", "maskparam: layers not shrunk",
        "Torch-Pruning: params kept", "Torch-Pruning: runs after",
    ]  # fmt: skip
    return markdown_table(header, rows)
