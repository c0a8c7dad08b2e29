"""maskparam against the alternatives users are told to use, for masking and for partial freezing:

* ``prune``: ``torch.nn.utils.prune.custom_from_mask`` (masking only);
* ``grad hook``: ``param.register_hook(lambda g: g * keep)`` (masked entries zeroed first);
* ``store/restore``: fix the constrained entries again after every ``optimizer.step()``.

Train-step time relative to the unconstrained model (interleaved, medians, 1 thread), and next
to it whether the promise held after the timed steps: masked entries exactly zero, frozen entries
exactly unchanged. Weight decay is on for both optimizers: coupled (SGD) and decoupled (AdamW).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from harness import interleaved_medians, markdown_table
from torch import Tensor, nn
from torch.nn.utils import prune
from train_step import MODELS

import maskparam as mp

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "SGD(momentum, wd)": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9, weight_decay=0.01),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
}

# A strategy constrains the model for a task and returns (effective tensors, after-step hook).
Selected = dict[str, tuple[nn.Module, str, Tensor]]  # name -> (module, local name, bool mask)
Strategy = Callable[[nn.Module, Selected, str], Callable[[], None] | None]


def _targets(model: nn.Module) -> Selected:
    """Every weight with 2+ dims, with a reproducible 50% mask (True: kept / frozen)."""
    selected = {}
    for i, (name, module) in enumerate(model.named_modules()):
        for local, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 2:
                selected[f"{name}.{local}".lstrip(".")] = (
                    module,
                    local,
                    mp.masks.random(0.5, seed=i)(param),
                )
    return selected


def _maskparam(layout: str) -> Strategy:
    def apply(model: nn.Module, selected: Selected, task: str) -> None:
        spec = mp.Mask if task == "mask" else mp.Freeze
        mp.apply_mask(
            model, {name: spec(mask, layout=layout) for name, (_, _, mask) in selected.items()}
        )

    return apply


def _prune(model: nn.Module, selected: Selected, task: str) -> None:
    for module, local, mask in selected.values():
        prune.custom_from_mask(module, local, mask)


def _grad_hook(model: nn.Module, selected: Selected, task: str) -> None:
    for module, local, mask in selected.values():
        param = getattr(module, local)
        if task == "mask":
            with torch.no_grad():
                param.mul_(mask)
            keep = mask.to(param.dtype)
        else:
            keep = (~mask).to(param.dtype)
        param.register_hook(lambda grad, keep=keep: grad * keep)


def _store_restore(model: nn.Module, selected: Selected, task: str) -> Callable[[], None]:
    fixes = []
    for module, local, mask in selected.values():
        param = getattr(module, local)
        keep = mask if task == "mask" else ~mask
        saved = (
            torch.zeros_like(param) if task == "mask" else torch.where(mask, param.detach(), 0.0)
        )
        with torch.no_grad():
            param.mul_(keep).add_(saved)  # masked entries start at zero too
        fixes.append((param, keep.to(param.dtype), saved))

    def restore() -> None:
        with torch.no_grad():
            for param, keep, saved in fixes:
                param.mul_(keep).add_(saved)  # exact: 0·w + v = v, 1·w + 0 = w

    return restore


STRATEGIES: dict[str, dict[str, Strategy | None]] = {
    "mask": {
        "plain": None,
        "maskparam Mask (default)": _maskparam("auto"),
        "maskparam Mask(dense)": _maskparam("dense"),
        "prune.custom_from_mask": _prune,
        "grad hook": _grad_hook,
        "store/restore": _store_restore,
    },
    "freeze": {
        "plain": None,
        "maskparam Freeze (default)": _maskparam("auto"),
        "maskparam Freeze(dense)": _maskparam("dense"),
        "grad hook": _grad_hook,
        "store/restore": _store_restore,
    },
}


def _largest(values: Tensor) -> float:
    return float(values.abs().amax()) if values.numel() else 0.0


def _violation(selected: Selected, task: str, initial: dict[str, Tensor]) -> float:
    """Largest break of the promise: |masked entry| (mask) or |frozen entry - initial| (freeze)."""
    worst = 0.0
    with torch.no_grad():
        for name, (module, local, mask) in selected.items():
            effective = getattr(module, local)  # what the forward pass uses, for every strategy
            if task == "mask":
                worst = max(worst, _largest(effective[~mask]))
            else:
                worst = max(worst, _largest(effective[mask] - initial[name][mask]))
    return worst


def run(rounds: int = 10) -> str:
    rows = []
    for model_name, make_model in MODELS.items():
        for optimizer_name, make_optimizer in OPTIMIZERS.items():
            for task, strategies in STRATEGIES.items():
                steps, checks = {}, {}
                for strategy_name, strategy in strategies.items():
                    torch.manual_seed(0)
                    model, x = make_model()
                    selected = _targets(model)
                    initial = {
                        n: getattr(m, local).detach().clone()
                        for n, (m, local, _) in selected.items()
                    }
                    after_step = strategy(model, selected, task) if strategy else None
                    optimizer = make_optimizer(list(model.parameters()))

                    def step(model=model, x=x, optimizer=optimizer, after_step=after_step) -> None:
                        optimizer.zero_grad(set_to_none=True)
                        model(x).square().mean().backward()
                        optimizer.step()
                        if after_step is not None:
                            after_step()

                    try:  # an alternative may not work on this model at all
                        step()
                        step()
                    except RuntimeError as failure:
                        reason = str(failure).splitlines()[0][:60]
                        rows.append([model_name, optimizer_name, task, strategy_name, "-",
                                     f"FAILS: {reason}"])  # fmt: skip
                        continue
                    steps[strategy_name] = step
                    checks[strategy_name] = (selected, initial)
                medians = interleaved_medians(steps, rounds=rounds)
                for strategy_name, seconds in medians.items():
                    if strategy_name == "plain":
                        continue
                    violation = _violation(
                        *checks[strategy_name][:1], task, checks[strategy_name][1]
                    )
                    verdict = "exact" if violation == 0.0 else f"BROKEN (max {violation:.1e})"
                    rows.append([model_name, optimizer_name, task, strategy_name,
                                 f"{seconds / medians['plain']:.3f}x", verdict])  # fmt: skip
    return markdown_table(
        ["model", "optimizer", "task (50%)", "method", "step vs plain", "promise"], rows
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
