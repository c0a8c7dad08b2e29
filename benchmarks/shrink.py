"""Channel pruning that pays on a dense machine: prune whole channel groups while training
(``GradualPruning`` + ``mp.masks.channels``), bake, ``mp.shrink``; then inference and a train step
of the shrunk model against the dense one, interleaved in one process.

* resnet18 and mobilenet_v3_small (``models.py``: torchvision's layers written out), 50% of each
  layer's channel groups, batch 4 x 3 x 224 x 224, SGD;
* Torch-Pruning's ``MetaPruner`` on the same models at ``pruning_ratio=0.5`` (L2 magnitude, the
  classifier left out), where ``torch-pruning`` is installed (never a dependency);
* a Llama built from a ``transformers`` config (4 layers, hidden 512, 8 heads, MLP 1376), 50% of
  its MLP neurons and attention heads, batch 4 x 128.

Each row also gives the largest difference between the shrunk and the masked model's eval
outputs, and the parameters kept.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable

import torch
from harness import interleaved_medians, markdown_table
from models import MobileNetV3Small, ResNet18
from torch import Tensor, nn

import maskparam as mp

PRUNED = 0.5


def _prune_and_shrink(model: nn.Module, x: object, loss: Callable[[nn.Module], Tensor]) -> float:
    """Train a few steps while GradualPruning masks channel groups, bake, shrink; the largest
    difference between the masked and the shrunk model's eval outputs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    schedule = mp.GradualPruning(
        model,
        {"*": lambda s: mp.masks.channels(s, example_inputs=x)},
        sparsity=PRUNED,
        end=3,
        optimizer=optimizer,
    )
    for _ in range(4):
        optimizer.zero_grad()
        loss(model).backward()
        optimizer.step()
        schedule.step()
    problems = mp.verify(model)
    assert not problems, problems
    model.eval()
    call = (lambda: model(**x)) if isinstance(x, dict) else (lambda: model(x))
    with torch.no_grad():
        masked = _first(call())
    mp.remove_parametrizations(model)
    mp.shrink(model, x)
    with torch.no_grad():
        shrunk = _first(call())
    model.train()
    return float((masked - shrunk).abs().max())


def _first(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    return output["logits"]  # type: ignore[index,no-any-return]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _step(model: nn.Module, loss: Callable[[nn.Module], Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model).backward()
        optimizer.step()

    return step


def _infer(model: nn.Module, x: Tensor) -> Callable[[], object]:
    def infer() -> object:
        with torch.no_grad():
            return model(x)

    return infer


def _torch_pruning(model: nn.Module, x: Tensor, head: nn.Module) -> nn.Module | None:
    if importlib.util.find_spec("torch_pruning") is None:
        return None
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=PRUNED,
        ignored_layers=[head],
    )
    pruner.step()
    return model


def _cnn_rows(name: str, build: Callable[[], nn.Module], rounds: int) -> list[list[str]]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    target = torch.randint(0, 1000, (4,))

    def loss(model: nn.Module) -> Tensor:
        return nn.functional.cross_entropy(model(x), target)

    dense = build()
    pruned = copy.deepcopy(dense)
    difference = _prune_and_shrink(pruned, x, loss)
    variants: dict[str, tuple[nn.Module, str]] = {"maskparam": (pruned, f"{difference:.1e}")}
    other = copy.deepcopy(dense)
    head = other.fc if hasattr(other, "fc") else other.classifier[-1]  # type: ignore[index]
    if _torch_pruning(other, x, head) is not None:
        variants["Torch-Pruning"] = (other, "(not equal: removes nonzero channels)")
    for model in (dense, *(m for m, _ in variants.values())):
        model.eval()
    inference = interleaved_medians(
        {"dense": _infer(dense, x), **{k: _infer(m, x) for k, (m, _) in variants.items()}},
        rounds=rounds,
    )
    for model in (dense, *(m for m, _ in variants.values())):
        model.train()
    steps = interleaved_medians(
        {"dense": _step(dense, loss), **{k: _step(m, loss) for k, (m, _) in variants.items()}},
        rounds=rounds,
    )
    return [
        [
            f"{name} ({tool})",
            f"{_params(model):,} of {_params(dense):,}",
            f"{inference[tool] / inference['dense']:.2f}",
            f"{steps[tool] / steps['dense']:.2f}",
            note,
        ]
        for tool, (model, note) in variants.items()
    ]


def _llama_row(rounds: int) -> list[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config)
    ids = torch.randint(0, 4096, (4, 128))

    def loss(model: nn.Module) -> Tensor:
        return model(ids, labels=ids).loss  # type: ignore[no-any-return]

    pruned = copy.deepcopy(dense)
    difference = _prune_and_shrink(pruned, ids, loss)
    for model in (dense, pruned):
        model.eval()
    inference = interleaved_medians(
        {"dense": _infer(dense, ids), "pruned": _infer(pruned, ids)}, rounds=rounds
    )
    for model in (dense, pruned):
        model.train()
    steps = interleaved_medians(
        {"dense": _step(dense, loss), "pruned": _step(pruned, loss)}, rounds=rounds
    )
    return [
        "Llama 4 x 512 (maskparam)",
        f"{_params(pruned):,} of {_params(dense):,}",
        f"{inference['pruned'] / inference['dense']:.2f}",
        f"{steps['pruned'] / steps['dense']:.2f}",
        f"{difference:.1e}",
    ]


def run(rounds: int = 12) -> str:
    rows = _cnn_rows("resnet18", ResNet18, rounds)
    rows += _cnn_rows("mobilenet_v3_small", MobileNetV3Small, rounds)
    rows.append(_llama_row(rounds))
    table = markdown_table(
        [
            "model, 50% of channel groups",
            "parameters kept",
            "inference vs dense",
            "train step vs dense",
            "largest difference, shrunk vs masked (eval)",
        ],
        rows,
    )
    return (
        f"{table}\n\nBatch 4 x 3 x 224 x 224 (CNNs, SGD with momentum) and 4 x 128 tokens (Llama, "
        "vocabulary 4096); interleaved medians of "
        f"{rounds} rounds. Targets for resnet18: inference and train step <= 0.45x of dense."
    )
