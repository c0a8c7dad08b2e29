"""Prune a small CNN on scikit-learn's digits gradually to 90% and 95%, beside torch.nn.utils.prune.

Both methods prune every weight with one global magnitude ranking, on Zhu & Gupta's cubic
schedule (the same steps, the same target at each step), under the same AdamW (learning rate,
weight decay), initial weights, batches and epochs. Training has two phases:

1. ``--epochs`` epochs with the schedule: dense for one epoch, then masks tighten every
   ``every`` steps until two thirds of the phase, then the last masks train on;
2. ``--finetune`` more epochs, the way each flow fine-tunes a pruned model.

The rows:

* ``maskparam``: ``mp.GradualPruning(model, {"*.weight": mp.masks.global_magnitude}, ...)``, one
  ``pruning.step()`` per optimizer step. The ``Mask`` stays while fine-tuning;
  ``mp.remove_parametrizations`` bakes it at the very end.
* ``prune, hooks kept``: at each scheduled step, ``prune.global_unstructured(params,
  pruning_method=prune.L1Unstructured, amount=k)``. Repeated global pruning in torch prunes
  ``amount`` *more* weights among the ones still unpruned (its ``PruningContainer``), so ``k``
  is an int: the weights that take the current number of pruned weights to ``round(s_t * n)``,
  the scheduled sparsity ``s_t`` of ``torch.ao.pruning.CubicSL.sparsity_compute_fn``: the
  count maskparam prunes, by the same global L1 ranking. One difference is torch's own: the
  call ranks ``module.weight``, which the hook computed at the last forward, one optimizer step
  before, so its masks differ from maskparam's in a few hundred weights. Given the current
  weights as ``importance_scores`` (``TorchSchedule(rank_current=True)``), the two runs are
  identical bit for bit; the test checks it. ``prune.global_unstructured(..., amount=0)``
  attaches the hooks before the first step, as ``GradualPruning`` attaches its masks. The
  forward pre-hooks stay while fine-tuning; ``prune.remove`` bakes them at the very end.
* ``prune, removed, fine-tuned``: the same run up to the end of phase 1 (a copy of the model and
  its AdamW state), then ``prune.remove`` on every weight first, the step torch's tutorial calls
  making the pruning permanent, and fine-tuning after it.

What the columns show. While torch's hooks are on, its effective weights are exactly zero at
the pruned positions, as maskparam's are, and nearly the same masks give about the same accuracy
(450 test images: one is 0.0022). The zeros are lost when a model is baked and then trained:
``prune.remove`` leaves plain Parameters, and the next AdamW steps move most pruned weights off
zero (their gradients, and the momentum left over from phase 1). maskparam keeps its zeros the
way torch keeps them while its hooks stay: the constraint stays until training is over (a model
baked by ``mp.remove_parametrizations`` and trained on would lose them too). "weight_orig ≠ 0
at pruned" counts torch's stored originals at the pruned positions after phase 1: AdamW's
decoupled weight decay shrinks them but never to zero, so they come back if a mask is ever
dropped or loosened. maskparam's compact layout stores no pruned entries at these sparsities,
hence "—". Train time is ``time.perf_counter`` around the optimizer and pruning steps of phase
1 (no evaluation), on one thread (``torch.set_num_threads(1)``), and "vs dense" its ratio to
the dense model's phase 1 in the same process.

    python examples/pruning.py                        # prints the table (under a minute)
    python examples/pruning.py --plot examples/pruning.png
    python examples/pruning.py --quick                # a small run, seconds

Needs scikit-learn (the digits data ships with it: no download) and, for --plot, matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.ao.pruning import CubicSL
from torch.nn.utils import prune

import maskparam as mp

TARGETS = (0.9, 0.95)
METHODS = ("maskparam", "prune, hooks kept", "prune, removed, fine-tuned")


@dataclass(frozen=True)
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(seed: int = 0) -> Data:
    """The 8x8 digits as (N, 1, 8, 8) images scaled to [0, 1]; 75% train, 25% test."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    return Data(
        torch.tensor(x_train / 16, dtype=torch.float32).unsqueeze(1),
        torch.tensor(y_train),
        torch.tensor(x_test / 16, dtype=torch.float32).unsqueeze(1),
        torch.tensor(y_test),
    )


def cnn(seed: int) -> nn.Sequential:
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers: 38,160 weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def weighted(model: nn.Module) -> list[nn.Module]:
    """The layers whose ``weight`` is pruned (what ``"*.weight"`` selects), in model order."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@dataclass(frozen=True)
class Config:
    epochs: int = 60  # phase 1: the schedule, then the last masks train on
    finetune: int = 15  # phase 2
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    every: int = 10  # optimizer steps between mask updates
    seed: int = 0

    def steps_per_epoch(self, data: Data) -> int:
        return len(data.y_train) // self.batch_size  # the last partial batch is dropped

    def schedule(self, data: Data) -> tuple[int, int, int]:
        """(begin, end, every) in optimizer steps: from the end of epoch 1 to 2/3 of phase 1."""
        per_epoch = self.steps_per_epoch(data)
        begin = per_epoch
        n = max(1, (2 * self.epochs * per_epoch // 3 - begin) // self.every)
        return begin, begin + n * self.every, self.every


QUICK = Config(epochs=8, finetune=3, every=5)


def optimizer_for(model: nn.Module, config: Config) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def batches(data: Data, config: Config, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The same shuffled batches for every method: the permutation depends on the epoch only."""
    order = torch.randperm(
        len(data.y_train), generator=torch.Generator().manual_seed(1000 * config.seed + epoch)
    )
    size = config.batch_size
    for i in range(config.steps_per_epoch(data)):
        index = order[i * size : (i + 1) * size]
        yield data.x_train[index], data.y_train[index]


def accuracy(model: nn.Module, data: Data) -> float:
    with torch.no_grad():
        return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def effective(layer: nn.Module) -> Tensor:
    """The weight the next forward uses. While torch's prune hook is on, ``layer.weight`` is
    what the hook computed at the last forward, before the optimizer's last step."""
    if hasattr(layer, "weight_mask"):
        return layer.weight_orig * layer.weight_mask
    return layer.weight


def sparsity(model: nn.Module) -> float:
    """The fraction of the pruned layers' effective weights that are exactly zero."""
    with torch.no_grad():
        weights = [effective(m) for m in weighted(model)]
        return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@dataclass
class Run:
    method: str
    target: float  # 0 for the dense model
    acc_pruned: float = 0.0  # test accuracy after phase 1
    acc_final: float = 0.0  # after phase 2, baked
    sparsity: float = 0.0  # exact zeros among the weights of the final, baked model
    pruned: int = 0  # weights the last mask of phase 1 pruned
    zeros_kept: int = 0  # of those, exactly zero in the final, baked model
    stale: int | None = None  # torch: weight_orig != 0 at pruned positions after phase 1
    seconds: float = 0.0  # phase 1: optimizer and pruning steps
    history: list[tuple[int, float, float]] = field(default_factory=list)  # epoch, sparsity, acc

    def record(self, epoch: int, model: nn.Module, data: Data) -> None:
        self.history.append((epoch, sparsity(model), accuracy(model, data)))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Data,
    config: Config,
    epochs: range,
    run: Run,
    after_step: Callable[[], object] = lambda: None,
) -> float:
    """Train ``epochs`` (their numbers pick the batches), recording each; returns the seconds
    spent in the optimizer and pruning steps."""
    seconds = 0.0
    for epoch in epochs:
        start = time.perf_counter()
        for x, y in batches(data, config, epoch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            after_step()
        seconds += time.perf_counter() - start
        run.record(epoch + 1, model, data)
    return seconds


def zeros_at(weights: list[Tensor], pruned: list[Tensor]) -> int:
    return sum(int((w.detach()[p] == 0).sum()) for w, p in zip(weights, pruned, strict=True))


def run_dense(data: Data, config: Config) -> Run:
    model = cnn(config.seed)
    optimizer = optimizer_for(model, config)
    run = Run("dense", 0.0)
    run.record(0, model, data)
    run.seconds = train(model, optimizer, data, config, range(config.epochs), run)
    run.acc_pruned = accuracy(model, data)
    phase2 = range(config.epochs, config.epochs + config.finetune)
    train(model, optimizer, data, config, phase2, run)
    run.acc_final, run.sparsity = accuracy(model, data), sparsity(model)
    return run


def run_maskparam(data: Data, config: Config, target: float) -> Run:
    model = cnn(config.seed)
    begin, end, every = config.schedule(data)
    optimizer = optimizer_for(model, config)
    pruning = mp.GradualPruning(
        model, {"*.weight": mp.masks.global_magnitude}, sparsity=target, begin=begin, end=end,
        every=every, optimizer=optimizer,
    )  # fmt: skip
    run = Run("maskparam", target)
    run.record(0, model, data)
    run.seconds = train(model, optimizer, data, config, range(config.epochs), run, pruning.step)
    run.acc_pruned = accuracy(model, data)
    names = [name for name, m in model.named_modules() if m in weighted(model)]
    pruned = [~mp.kept_entries(model, f"{name}.weight") for name in names]
    # Phase 2: the constraint stays while fine-tuning; bake when training is over.
    phase2 = range(config.epochs, config.epochs + config.finetune)
    train(model, optimizer, data, config, phase2, run)
    mp.remove_parametrizations(model)
    run.acc_final, run.sparsity = accuracy(model, data), sparsity(model)
    run.pruned = sum(int(p.sum()) for p in pruned)
    run.zeros_kept = zeros_at([m.weight for m in weighted(model)], pruned)
    return run


class TorchSchedule:
    """What a user of ``torch.nn.utils.prune`` writes for the cubic schedule: call after each
    optimizer step; at the scheduled steps, prune globally by L1 to ``round(s_t * n)``.

    ``prune.global_unstructured`` ranks ``module.weight``: the tensor its hook computed at the
    last forward, one optimizer step old. ``rank_current=True`` passes the current effective
    weights as ``importance_scores`` instead, as maskparam ranks them."""

    def __init__(
        self,
        model: nn.Module,
        target: float,
        begin: int,
        end: int,
        every: int,
        *,
        rank_current: bool = False,
    ) -> None:
        self.params = [(m, "weight") for m in weighted(model)]
        self.rank_current = rank_current
        self.total = sum(m.weight.numel() for m, _ in self.params)
        self.target, self.begin, self.end, self.every = target, begin, end, every
        self.steps = 0
        prune.global_unstructured(self.params, pruning_method=prune.L1Unstructured, amount=0)

    def pruned(self) -> int:
        return sum(int((m.weight_mask == 0).sum()) for m, _ in self.params)

    def step(self) -> None:
        self.steps += 1
        t = self.steps
        if self.begin <= t <= self.end and (t - self.begin) % self.every == 0:
            n = (self.end - self.begin) // self.every
            s_t = CubicSL.sparsity_compute_fn(0.0, self.target, t, self.begin, self.every, n)
            more = round(s_t * self.total) - self.pruned()  # relative to the unpruned weights
            if more > 0:
                scores = None
                if self.rank_current:
                    scores = {(m, n): effective(m).detach() for m, n in self.params}
                prune.global_unstructured(
                    self.params,
                    pruning_method=prune.L1Unstructured,
                    importance_scores=scores,
                    amount=more,
                )


def run_torch(data: Data, config: Config, target: float) -> tuple[Run, Run]:
    """(hooks kept while fine-tuning, removed before fine-tuning): one phase 1, then a copy."""
    model = cnn(config.seed)
    schedule = TorchSchedule(model, target, *config.schedule(data))
    optimizer = optimizer_for(model, config)
    kept = Run(METHODS[1], target)
    kept.record(0, model, data)
    kept.seconds = train(model, optimizer, data, config, range(config.epochs), kept, schedule.step)
    kept.acc_pruned = accuracy(model, data)
    pruned = [m.weight_mask == 0 for m in weighted(model)]
    kept.pruned = sum(int(p.sum()) for p in pruned)
    kept.stale = kept.pruned - zeros_at([m.weight_orig for m in weighted(model)], pruned)
    removed = copy.deepcopy(kept)
    removed.method = METHODS[2]
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))  # one memo: same Parameters
    phase2 = range(config.epochs, config.epochs + config.finetune)
    for run, net, opt, remove_first in (
        (kept, model, optimizer, False),
        (removed, model_copy, optimizer_copy, True),
    ):
        if remove_first:  # "make the pruning permanent", then fine-tune
            for m in weighted(net):
                prune.remove(m, "weight")
        train(net, opt, data, config, phase2, run)
        if not remove_first:  # bake when training is over
            for m in weighted(net):
                prune.remove(m, "weight")
        run.acc_final, run.sparsity = accuracy(net, data), sparsity(net)
        run.zeros_kept = zeros_at([m.weight for m in weighted(net)], pruned)
    return kept, removed


def compare(config: Config, targets: tuple[float, ...] = TARGETS) -> list[Run]:
    """The dense run, then per target maskparam's and torch's two."""
    data = load_data(config.seed)
    runs = [run_dense(data, config)]
    for target in targets:
        runs.append(run_maskparam(data, config, target))
        runs.extend(run_torch(data, config, target))
    return runs


def table(runs: list[Run], config: Config) -> str:
    dense = next(r.seconds for r in runs if r.method == "dense")
    header = [
        "method",
        "target",
        f"acc, {config.epochs} ep",
        f"acc, +{config.finetune} ep fine-tune",
        "sparsity at end",
        "pruned weights still 0",
        "weight_orig ≠ 0 at pruned",
        "train s",
        "vs dense",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [
            run.method,
            f"{100 * run.target:g}%" if run.target else "—",
            f"{run.acc_pruned:.3f}",
            f"{run.acc_final:.3f}",
            f"{100 * run.sparsity:.2f}%",
            f"{run.zeros_kept:,} / {run.pruned:,}" if run.pruned else "—",
            "—" if run.stale is None else f"{run.stale:,}",
            f"{run.seconds:.1f}",
            f"{run.seconds / dense:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[Run], config: Config, path: str) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "gray", METHODS[0]: "C0", METHODS[1]: "C1", METHODS[2]: "C3"}
    styles = {0.0: "-", TARGETS[0]: "-", TARGETS[1]: "--"}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        history = run.history
        if run.method == METHODS[2]:  # its phase 1 is the hooked run's
            history = history[config.epochs :]
        epochs, sparsities, accuracies = zip(*history, strict=True)
        label = run.method + (f", {100 * run.target:g}%" if run.target else "")
        style = {"color": colors[run.method], "linestyle": styles.get(run.target, ":")}
        width = 3 if run.method == METHODS[0] else 1.5  # torch's hooked run lies on top of it
        left.plot(epochs, [100 * s for s in sparsities], linewidth=width, label=label, **style)
        right.plot(epochs, accuracies, linewidth=width, label=label, **style)
    for axes in (left, right):
        axes.axvline(config.epochs, color="black", linestyle=":", linewidth=1)
        axes.set_xlabel(f"epoch (fine-tuning after {config.epochs})")
    left.set_ylabel("weights exactly zero (%)")
    left.set_title("Sparsity of the effective weights")
    right.set_ylabel("test accuracy")
    right.set_ylim(0.8, 1.0)
    right.set_title("Digits CNN, global magnitude, cubic schedule")
    right.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, help=f"phase 1 (default {Config.epochs})")
    parser.add_argument("--finetune", type=int, help=f"phase 2 (default {Config.finetune})")
    parser.add_argument("--quick", action="store_true", help="a small run, for CI (seconds)")
    parser.add_argument("--plot", help="save a PNG of sparsity and accuracy by epoch here")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else Config()
    if args.epochs is not None:
        config = Config(**{**config.__dict__, "epochs": args.epochs})
    if args.finetune is not None:
        config = Config(**{**config.__dict__, "finetune": args.finetune})
    torch.set_num_threads(1)
    start = time.perf_counter()
    runs = compare(config)
    print(table(runs, config))
    print(f"\n({time.perf_counter() - start:.0f} s; torch {torch.__version__}, one thread)")
    if args.plot:
        plot(runs, config, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
