"""Sparse training: a masked model's train step (forward, backward, AdamW step) against the
dense model's, interleaved in one process: the answer to "can partial updates avoid extra
computation?".

* MLP 4 x Linear(1024, 1024), batch 256, with 1 and 2 threads, at 50-99% zeros: the default
  layout (compact), ``Mask(layout="csr")``, ``mp.to_sparse`` on the constrained model (csr where
  timed faster), and SparseProp's ``SparseLinear`` (C++ kernels, IST-DASLab; a row where
  ``pip install --no-build-isolation sparseprop`` installed it: never a dependency).
* A Llama-shaped model built from a ``transformers`` config (4 layers, hidden 512, 8 heads,
  MLP 1376) at 90% zeros of its Linear weights (``global_magnitude``), then ``mp.to_sparse``;
  with Llama's vocabulary of 32000 and a small one of 4096 (the dense embedding, the dense
  ``lm_head`` that to_sparse keeps, and the logits' softmax over the vocabulary do not shrink).
* The fixed cost of the default options: resnet18, mobilenet_v3_small (``models.py``) and a
  4-layer BERT (hidden 256), every weight of 2+ dimensions masked 50% by magnitude.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable

import torch
from harness import interleaved_medians, markdown_table
from torch import nn

import maskparam as mp

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
BATCH = 256


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _step(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> Callable[[], object]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(model).backward()
        optimizer.step()

    return step


def _sparseprop(model: nn.Module) -> nn.Module | None:
    """The baked model with each Linear as SparseProp's SparseLinear, where it is installed."""
    if importlib.util.find_spec("sparseprop") is None:
        return None
    from sparseprop.modules import SparseLinear  # optional, bench only

    baked = mp.remove_parametrizations(copy.deepcopy(model))
    for i, layer in enumerate(baked):
        if isinstance(layer, nn.Linear):
            baked[i] = SparseLinear.from_dense(layer)
    return baked


def mlp_rows(rounds: int, threads: int) -> list[list[str]]:
    torch.set_num_threads(threads)
    x, target = torch.randn(BATCH, 1024), torch.randn(BATCH, 1024)

    def loss(model: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(model(x), target)

    rows: dict[str, list[str]] = {}
    for sparsity in SPARSITIES:
        dense = _mlp()

        def rules(layout: str, s: float = sparsity) -> mp.Rules:
            return {"*.weight": mp.Mask(mp.masks.global_magnitude(s), layout=layout)}

        variants = {
            "dense": dense,
            "maskparam default (compact)": mp.apply_mask(copy.deepcopy(dense), rules("auto")),
            'Mask(layout="csr")': mp.apply_mask(copy.deepcopy(dense), rules("csr")),
            "mp.to_sparse(constrained model)": mp.to_sparse(
                mp.apply_mask(copy.deepcopy(dense), rules("auto")), batch_size=BATCH
            ),
        }
        sparseprop = _sparseprop(variants['Mask(layout="csr")'])
        if sparseprop is not None:
            variants["SparseProp SparseLinear (C++)"] = sparseprop
        medians = interleaved_medians(
            {name: _step(model, loss) for name, model in variants.items()}, rounds=rounds
        )
        for name, seconds in medians.items():
            if name != "dense":
                rows.setdefault(name, [name]).append(f"{seconds / medians['dense']:.2f}x")
    torch.set_num_threads(1)
    return list(rows.values())


def _llama(vocab: int) -> tuple[nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM  # optional

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config), torch.randint(0, vocab, (4, 128))


def _is_linear_weight(name: str, module: nn.Module, tensor: torch.Tensor) -> bool:
    return isinstance(module, nn.Linear) and name.endswith("weight")


def llama_rows(rounds: int) -> list[list[str]]:
    if importlib.util.find_spec("transformers") is None:
        return [["(transformers is not installed)", "", "", ""]]
    rows = []
    for vocab in (32000, 4096):
        dense, ids = _llama(vocab)
        rules = {_is_linear_weight: mp.Mask(mp.masks.global_magnitude(0.9))}
        default = mp.apply_mask(copy.deepcopy(dense), rules)
        chosen = mp.to_sparse(mp.apply_mask(copy.deepcopy(dense), rules), batch_size=ids.numel())
        csr = sum(c.layout == "csr" for c in chosen.sparse_choices)

        def loss(model: nn.Module, ids: torch.Tensor = ids) -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]

        medians = interleaved_medians(
            {
                "dense": _step(dense, loss),
                "default": _step(default, loss),
                "to_sparse": _step(chosen, loss),
            },
            rounds=max(4, rounds // 3),
            warmup=2,
        )
        rows.append(
            [
                f"Llama 4 x 512, vocab {vocab}, batch 4 x 128",
                f"{medians['default'] / medians['dense']:.2f}x",
                f"{medians['to_sparse'] / medians['dense']:.2f}x",
                f"{csr} of {len(chosen.sparse_choices)} Linears",
            ]
        )
    return rows


def fixed_cost_rows(rounds: int) -> list[list[str]]:
    from models import MobileNetV3Small, ResNet18  # beside this file

    cases: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = []
    images = torch.randn(16, 3, 64, 64)
    small_images = torch.randn(16, 3, 96, 96)
    classes = torch.randint(0, 1000, (16,))
    cases.append(
        (
            "resnet18, batch 16 x 3 x 64 x 64",
            ResNet18,
            lambda m: nn.functional.cross_entropy(m(images), classes),
        )
    )
    cases.append(
        (
            "mobilenet_v3_small, batch 16 x 3 x 96 x 96",
            MobileNetV3Small,
            lambda m: nn.functional.cross_entropy(m(small_images), classes),
        )
    )
    if importlib.util.find_spec("transformers") is not None:
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
        )
        ids = torch.randint(0, config.vocab_size, (16, 128))
        labels = torch.randint(0, 2, (16,))
        cases.append(
            (
                "BERT 4 x 256, batch 16 x 128",
                lambda: BertForSequenceClassification(config),
                lambda m: m(input_ids=ids, labels=labels).loss,
            )
        )
    rows = []
    for name, make, loss in cases:
        torch.manual_seed(0)
        plain = make()
        masked = mp.apply_mask(
            copy.deepcopy(plain),
            {lambda _n, _m, t: t.dim() >= 2: mp.Mask(mp.masks.magnitude(0.5))},
        )
        entries = sum(p.numel() for p in plain.parameters() if p.dim() >= 2)
        medians = interleaved_medians(
            {"plain": _step(plain, loss), "masked": _step(masked, loss)}, rounds=rounds
        )
        extra = (medians["masked"] - medians["plain"]) / entries * 1e9
        rows.append(
            [
                name,
                f"{medians['plain'] * 1e3:.1f}",
                f"{medians['masked'] / medians['plain']:.3f}x",
                f"{extra:+.2f}",
            ]
        )
    return rows


def run(rounds: int) -> str:
    header = ["variant vs dense", *(f"{s:.0%}" for s in SPARSITIES)]
    parts = []
    for threads in (1, 2):
        table = markdown_table(header, mlp_rows(rounds, threads))
        parts.append(
            f"### MLP 4 x 1024, batch {BATCH}, AdamW, {threads} thread{'s' * (threads > 1)}"
            f"\n\n{table}"
        )
    llama = markdown_table(
        ["model (90% zeros in the Linears)", "default", "mp.to_sparse", "chosen csr"],
        llama_rows(rounds),
    )
    parts.append(f"### A Llama-shaped model, AdamW, 1 thread\n\n{llama}")
    fixed = markdown_table(
        ["model (50% magnitude masks)", "plain step ms", "default vs plain", "ns per entry"],
        fixed_cost_rows(rounds),
    )
    parts.append(f"### The default options' fixed cost, AdamW, 1 thread\n\n{fixed}")
    return "\n\n".join(parts)
