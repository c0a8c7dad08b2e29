"""Lightning: :class:`GradualPruningCallback` drives a :class:`~maskparam.GradualPruning`,
:class:`UpdateMasksCallback` any ``update_masks`` schedule (a function of the step), and
:class:`ModelPruning` is the counterpart of ``lightning.pytorch.callbacks.ModelPruning`` whose
masks are maskparam ``Mask`` constraints.

They act in ``on_train_batch_end`` or at epoch ends, before Lightning's ``ModelCheckpoint`` (which
Lightning runs after the other callbacks), so a checkpoint holds the masks of the step it was
written at; the schedule's step count is in the model's state_dict, and ``fit(ckpt_path=...)``
resumes it with the weights.

Needs Lightning (``pip install maskparam[lightning]``; ``lightning.pytorch``, or the older
``pytorch_lightning`` package); importing this module imports it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the package's older name
    from pytorch_lightning import Callback, LightningModule, Trainer

from maskparam.constrain.accessors import kept_entries
from maskparam.constrain.apply import apply_mask
from maskparam.constrain.remove import remove_parametrizations
from maskparam.constraints.mask import Mask
from maskparam.core.constraint import Layout, Spec
from maskparam.core.match import Selector
from maskparam.core.parametrize import maskparam_constraints, parametrization_list
from maskparam.errors import error
from maskparam.integrations._follow import (
    RulesAt,
    check_rules_at,
    check_schedule,
    check_trains,
    counter_offset,
    inner_optimizers,
    update_at,
)
from maskparam.masks.generators import MaskSource
from maskparam.prune.rewind import rewind
from maskparam.prune.schedule import GradualPruning
from maskparam.prune.update import update_masks

__all__ = ["PRUNING_METHODS", "GradualPruningCallback", "ModelPruning", "UpdateMasksCallback"]

log = logging.getLogger(__name__)


class GradualPruningCallback(Callback):  # type: ignore[misc]  # Lightning is untyped here
    """Drive ``pruning`` (a :class:`~maskparam.GradualPruning` on the LightningModule or a model
    inside it): ``Trainer(callbacks=[GradualPruningCallback(pruning)])``.

    At the start of training the schedule takes the trainer's optimizers (their state follows
    the masks). After each training batch it calls ``pruning.step(trainer.global_step)``, so
    the masks tighten at the scheduled optimizer steps (gradient accumulation included: a batch
    without an optimizer step changes nothing), before ``ModelCheckpoint`` saves.

    ``fit(ckpt_path=...)`` restores the model's state_dict, which holds the schedule's step
    count, with the trainer's: the schedule goes on. A trainer that resumes *ahead* of the
    model's count (a checkpoint without it) is refused before the first step.
    """

    def __init__(self, pruning: GradualPruning) -> None:
        self.pruning = check_schedule(pruning, "GradualPruningCallback")
        self._offset = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Take the trainer's optimizers, and line the schedule's count up with the trainer's."""
        check_trains(self.pruning.model, pl_module, "GradualPruningCallback")
        optimizers = inner_optimizers(trainer.optimizers)
        self.pruning.optimizer = optimizers[0] if len(optimizers) == 1 else optimizers
        self._offset = counter_offset(self.pruning, trainer.global_step, "GradualPruningCallback")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After each batch (before ModelCheckpoint saves): the scheduled masks."""
        self.pruning.step(trainer.global_step + self._offset)


class UpdateMasksCallback(Callback):  # type: ignore[misc]  # Lightning is untyped here
    """Any ``update_masks`` schedule: after each optimizer step, ``mp.update_masks(model,
    rules_at(step), optimizer=<the trainer's>)`` where ``rules_at(step)`` returns rules (None:
    nothing at that step). ``step`` is ``trainer.global_step``, so a resumed fit updates at the
    same steps (the masks are in the checkpoint), and a batch without an optimizer step (gradient
    accumulation) updates nothing.
    """

    def __init__(self, model: nn.Module, rules_at: RulesAt) -> None:
        check_rules_at(model, rules_at, "UpdateMasksCallback")
        self.model = model
        self.rules_at = rules_at
        self._optimizers: list[torch.optim.Optimizer] = []
        self._last_step = -1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Take the trainer's optimizers (their state follows the masks)."""
        check_trains(self.model, pl_module, "UpdateMasksCallback")
        self._optimizers = inner_optimizers(trainer.optimizers)
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After each optimizer step (before ModelCheckpoint saves): that step's masks, if any."""
        if trainer.global_step > self._last_step:
            self._last_step = trainer.global_step
            update_at(self.model, self.rules_at, trainer.global_step, self._optimizers)


#: torch's pruning methods by the names Lightning's ModelPruning takes.
PRUNING_METHODS: dict[str, type[torch_prune.BasePruningMethod]] = {
    "l1_unstructured": torch_prune.L1Unstructured,
    "random_unstructured": torch_prune.RandomUnstructured,
    "ln_structured": torch_prune.LnStructured,
    "random_structured": torch_prune.RandomStructured,
}

_CONTAINERS = (LightningModule, nn.Sequential, nn.ModuleList, nn.ModuleDict)

Amount = int | float


class ModelPruning(Callback):  # type: ignore[misc]  # Lightning is untyped here
    """Lightning's ``ModelPruning``, with the same arguments and the same masks, kept by maskparam.

    Each pruning computes the new masks exactly as ``torch.nn.utils.prune`` (and so Lightning's
    callback) does: the same pruning method, ``amount`` of what remains (a float: that fraction,
    an int: that many entries; globally or per tensor), ranked on the entries (or channels) not
    pruned yet. The masks are ``mp.Mask`` constraints instead of prune's forward pre-hooks:

    * the pruned entries are exactly zero and stay so through any optimizer, also after
      ``make_pruning_permanent`` bakes them (``mp.remove_parametrizations`` at the end of
      training);
    * every checkpoint holds the masks (``parametrizations.<name>.0.mask``), and
      ``fit(ckpt_path=...)`` resumes with them. Lightning's callback saves its checkpoints baked
      (no masks), so a resumed run trains the zeros again. Here, checkpoints are always
      resumable; bake yourself for a plain one;
    * the lottery-ticket rewind (``use_lottery_ticket_hypothesis``) resets the remaining weights
      to the values they had when ``fit`` began, also after a resume: those values are this
      callback's state in the checkpoint (Lightning's would take the resumed process's fresh
      initialisation). ``resample_parameters`` draws them with the module's
      ``reset_parameters`` instead;
    * the optimizers' state follows the masks (``mp.update_masks``), and ``layout`` chooses
      how a masked tensor is stored (see ``mp.Mask``; ``"auto"`` stores a sparse tensor
      compact).

    ``pruning_fn``: ``"l1_unstructured"``, ``"random_unstructured"``, ``"ln_structured"``
    (needs ``pruning_dim`` and ``pruning_norm``), ``"random_structured"`` (needs
    ``pruning_dim``), or a subclass of ``torch.nn.utils.prune.BasePruningMethod``.
    ``parameters_to_prune``: ``(module, name)`` pairs; by default every ``parameter_names``
    (``("weight", "bias")``) of every module that is not a container. ``amount`` and
    ``apply_pruning`` may be functions of the epoch. ``verbose`` 1 logs the overall sparsity
    after each pruning, 2 each tensor's too. Pruning runs at the end of each training epoch, or
    of each validation epoch with ``prune_on_train_epoch_end=False``.
    """

    PARAMETER_NAMES = ("weight", "bias")

    def __init__(
        self,
        pruning_fn: str | type[torch_prune.BasePruningMethod],
        parameters_to_prune: Sequence[tuple[nn.Module, str]] = (),
        parameter_names: Sequence[str] | None = None,
        use_global_unstructured: bool = True,
        amount: Amount | Callable[[int], Amount] = 0.5,
        apply_pruning: bool | Callable[[int], bool] = True,
        make_pruning_permanent: bool = True,
        use_lottery_ticket_hypothesis: bool | Callable[[int], bool] = True,
        resample_parameters: bool = False,
        pruning_dim: int | None = None,
        pruning_norm: float | str | None = None,
        verbose: int = 0,
        prune_on_train_epoch_end: bool = True,
        *,
        layout: Layout = "auto",
    ) -> None:
        self._method = _pruning_method(pruning_fn)
        self._method_kwargs = _method_kwargs(
            self._method, pruning_fn, dim=pruning_dim, norm=pruning_norm
        )
        pruning_type = str(getattr(self._method, "PRUNING_TYPE", "unstructured"))
        if use_global_unstructured and pruning_type != "unstructured":
            raise error(
                "ModelPruning",
                f"pruning_fn={_name(pruning_fn)} prunes {pruning_type}, and a "
                "global ranking (use_global_unstructured=True) ranks single entries.",
                fix="pass use_global_unstructured=False, or an unstructured pruning_fn.",
            )
        names = tuple(parameter_names) if parameter_names else self.PARAMETER_NAMES
        unknown = [n for n in names if n not in self.PARAMETER_NAMES]
        if unknown:
            raise error(
                "ModelPruning",
                f"parameter_names={list(names)!r}: Lightning's ModelPruning prunes 'weight' and "
                "'bias'.",
                fix="pass parameters_to_prune=[(module, name), ...] for other tensors.",
            )
        if verbose not in (0, 1, 2):
            raise error("ModelPruning", f"verbose={verbose!r}.", fix="pass 0, 1 or 2.")
        _check_amount(amount)
        self._given = list(parameters_to_prune)
        self._parameter_names = names
        self._global = use_global_unstructured
        self.amount = amount
        self._apply_pruning = apply_pruning
        self._make_pruning_permanent = make_pruning_permanent
        self._use_lottery_ticket_hypothesis = use_lottery_ticket_hypothesis
        self._resample_parameters = resample_parameters
        self._verbose = verbose
        self._prune_on_train_epoch_end = prune_on_train_epoch_end
        self._layout = layout
        self._pruning_type = pruning_type
        # The tensors whose Masks this callback applied (a later fit updates them again).
        self._applied: set[str] = set()
        # resample_parameters: plain copies of the pruned tensors' modules, by module name.
        self._plain: dict[str, nn.Module] = {}
        #: The pruned tensors by their names in the LightningModule (set in ``setup``).
        self.names: list[str] = []
        #: The values the pruned tensors had when fit began, for the lottery-ticket rewind.
        self.initial: dict[str, Tensor] = {}

    # -- set-up -----------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """On ``fit``: a ``Mask`` that keeps everything on every tensor to prune, so that the
        model has its masks before Lightning restores a checkpoint into it."""
        if stage != "fit":
            return
        targets = self._targets(pl_module)
        self.names = [name for name, _, _ in targets]
        plain: dict[Selector, Spec] = {
            name: Mask(torch.ones(getattr(m, local).shape, dtype=torch.bool), layout=self._layout)
            for name, m, local in targets
            if not maskparam_constraints(m, local)
        }
        if self._resample_parameters and plain:
            # Plain copies of the pruned tensors' modules (as Lightning's snapshot), whose
            # reset_parameters draws the resampled values; taken while they are unconstrained
            # (a later fit of masked modules keeps the copies of the first).
            self._plain = {}
            for name, module, _local in targets:
                self._plain.setdefault(_owner(name), copy.deepcopy(module))
        if self._use_lottery_ticket_hypothesis:
            # As Lightning's: the values at the start of fit (a resumed fit then loads the
            # first run's from this callback's state in the checkpoint).
            self.initial = {
                name: getattr(m, local).detach().to("cpu", copy=True) for name, m, local in targets
            }
        if plain:
            apply_mask(pl_module, plain)
            self._applied.update(plain)  # type: ignore[arg-type]  # names, as built above

    def _targets(self, pl_module: LightningModule) -> list[tuple[str, nn.Module, str]]:
        paths: dict[int, str] = {}
        for path, module in pl_module.named_modules():
            paths.setdefault(id(module), path)
        given = self._given or [
            (m, p)
            for p in self._parameter_names
            for m in pl_module.modules()
            if not isinstance(m, _CONTAINERS) and _is_tensor(m, p)
        ]
        targets = []
        seen: dict[int, str] = {}  # the stored tensor's id -> the name it is pruned under
        structured = self._pruning_type == "structured"
        for module, local in given:
            if id(module) not in paths or not _is_tensor(module, local):
                raise error(
                    "ModelPruning",
                    f"parameters_to_prune holds ({type(module).__name__}, {local!r}), which is not "
                    "a tensor of a module in the LightningModule.",
                    fix="pass (module, name) pairs of the model you train.",
                )
            constrained = maskparam_constraints(module, local)
            path = paths[id(module)]
            name = f"{path}.{local}" if path else local
            if constrained and constrained[0].mask_spec is not Mask:
                raise error(
                    repr(name),
                    f"is constrained by {constrained[0].describe()}, not by a Mask that "
                    "ModelPruning could update.",
                    fix="leave it out of parameters_to_prune.",
                )
            if constrained and name not in self._applied:
                raise error(
                    repr(name),
                    "is masked already, by another pruner (another ModelPruning, a "
                    "GradualPruning, update_masks): two pruners of one tensor would each undo "
                    "the other's schedule.",
                    fix="prune it with one of them: give the next fit the same ModelPruning "
                    "(or bake first: make_pruning_permanent=True), or leave it out of "
                    "parameters_to_prune or out of the other's rules.",
                )
            if structured and getattr(module, local).dim() < 2:
                raise error(
                    repr(name),
                    f"{self._method.__name__} prunes slices, and this tensor has "
                    f"{getattr(module, local).dim()} dimension (torch's prune refuses it too).",
                    fix="prune weights only: parameter_names=['weight'], or leave it out of "
                    "parameters_to_prune.",
                )
            stored = id(_stored(module, local))
            if stored in seen:
                if self._given and seen[stored] == name:
                    raise error(
                        "ModelPruning",
                        f"parameters_to_prune names {name!r} twice: a global ranking would count "
                        "its entries twice.",
                        fix="name each (module, tensor) once.",
                    )
                continue  # a tied tensor (an embedding that is also the output layer): once
            seen[stored] = name
            targets.append((name, module, local))
        return targets

    # -- pruning ----------------------------------------------------------------------------

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Prune at the end of each training epoch (``prune_on_train_epoch_end=True``)."""
        if self._prune_on_train_epoch_end:
            self._run_pruning(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Prune at the end of each validation epoch (``prune_on_train_epoch_end=False``)."""
        if not trainer.sanity_checking and not self._prune_on_train_epoch_end:
            self._run_pruning(trainer, pl_module)

    def _run_pruning(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = pl_module.current_epoch
        prune = self._apply_pruning(epoch) if callable(self._apply_pruning) else self._apply_pruning
        amount = self.amount(epoch) if callable(self.amount) else self.amount
        if not prune or not amount:
            return
        self.apply_pruning(pl_module, amount, optimizers=inner_optimizers(trainer.optimizers))
        lottery = self._use_lottery_ticket_hypothesis
        if lottery(epoch) if callable(lottery) else lottery:
            self.apply_lottery_ticket_hypothesis(pl_module)

    def apply_pruning(
        self,
        pl_module: nn.Module,
        amount: Amount,
        *,
        optimizers: Sequence[torch.optim.Optimizer] = (),
    ) -> None:
        """Prune ``amount`` of what remains, as torch's prune would, into the masks."""
        tensors = [getattr(pl_module.get_submodule(_owner(n)), _local(n)) for n in self.names]
        kept = [kept_entries(pl_module, n) for n in self.names]
        before = [int(k.sum()) for k in kept]
        if self._global:
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            mask = torch.cat([k.reshape(-1) for k in kept]).to(flat.dtype)
            new_flat = self._compute(flat, mask, amount, "the global ranking")
            sizes = [t.numel() for t in tensors]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            new = [
                new_flat[start : start + t.numel()].reshape(t.shape)
                for start, t in zip(starts, tensors, strict=True)
            ]
        else:
            new = [
                self._compute(t.detach(), k.to(t.dtype), amount, repr(n))
                for t, k, n in zip(tensors, kept, self.names, strict=True)
            ]
        rules: dict[Selector, MaskSource] = {
            n: m.to(torch.bool) for n, m in zip(self.names, new, strict=True)
        }
        update_masks(pl_module, rules, optimizer=list(optimizers))
        if self._verbose:
            sizes = [t.numel() for t in tensors]
            self._log(sizes, before, [int(m.sum()) for m in new], amount)

    def _compute(self, t: Tensor, mask: Tensor, amount: Amount, subject: str) -> Tensor:
        # torch.nn.utils.prune's own code: a container ranks what the mask keeps (t[mask == 1],
        # or the channels not pruned yet), as when prune is called again on a pruned tensor.
        container: Any = torch_prune.PruningContainer()  # torch's prune is untyped
        container._tensor_name = "t"
        method: Any = cast(Any, self._method)(amount, **self._method_kwargs)
        method._tensor_name = "t"
        container.add_pruning_method(method)
        try:
            computed: Tensor = container.compute_mask(t, default_mask=mask)
            return computed
        except (ValueError, TypeError, RuntimeError) as failure:
            raise error(
                subject,
                f"torch's {self._method.__name__} refused to prune it: {failure}",
                fix="leave such tensors out of parameters_to_prune (structured methods need "
                "tensors of 2 or more dimensions), or pass a smaller amount.",
            ) from failure

    def apply_lottery_ticket_hypothesis(self, pl_module: nn.Module) -> None:
        """Reset the remaining weights to their values when fit began (or, with
        ``resample_parameters``, to a new draw of their module's ``reset_parameters``); pruned
        entries stay zero."""
        values = dict(self.initial)
        if self._resample_parameters:
            for owner, plain in self._plain.items():  # in the model's order, as Lightning's
                if callable(getattr(plain, "reset_parameters", None)):
                    fresh = copy.deepcopy(plain)
                    fresh.reset_parameters()  # type: ignore[operator]  # checked just above
                    for n in self.names:
                        if _owner(n) == owner:
                            values[n] = getattr(fresh, _local(n)).detach()
        rewind(pl_module, {n: values[n] for n in self.names}, strict=False)

    def _log(self, sizes: list[int], before: list[int], after: list[int], amount: Amount) -> None:
        total = sum(sizes) or 1
        was, now = total - sum(before), total - sum(after)
        log.info(
            "Applied `%s`. Pruned: %d/%d (%.2f%%) -> %d/%d (%.2f%%)",
            self._method.__name__, was, total, 100 * was / total, now, total, 100 * now / total,
        )  # fmt: skip
        if self._verbose == 2:
            for n, size, b, a in zip(self.names, sizes, before, after, strict=True):
                log.info(
                    "Applied `%s` to %r with amount=%s. Pruned: %d (%.2f%%) -> %d (%.2f%%)",
                    self._method.__name__, n, amount, size - b, 100 * (size - b) / size,
                    size - a, 100 * (size - a) / size,
                )  # fmt: skip

    # -- end and checkpoints ----------------------------------------------------------------

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``make_pruning_permanent``: bake the masks into plain weights (exact zeros)."""
        if self._make_pruning_permanent:
            remove_parametrizations(pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The lottery ticket's initial values (the masks are in the model's state_dict)."""
        return {"initial": dict(self.initial)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the lottery ticket's initial values from a checkpoint."""
        initial = state_dict.get("initial")
        if not isinstance(initial, Mapping) or not all(
            isinstance(v, Tensor) for v in initial.values()
        ):
            raise error(
                "ModelPruning.load_state_dict",
                "the state must be what ModelPruning.state_dict() returned: {'initial': "
                "{name: tensor}}.",
                fix="resume from a checkpoint this callback saved.",
            )
        self.initial = dict(initial)


def _check_amount(amount: object) -> None:
    if isinstance(amount, bool) or not (callable(amount) or isinstance(amount, (int, float))):
        raise error(
            "ModelPruning",
            f"amount={amount!r}: a fraction, a number of entries, or a function of the epoch.",
            fix="pass e.g. amount=0.5, amount=100 or amount=lambda epoch: 0.2.",
        )


def _pruning_method(pruning_fn: object) -> type[torch_prune.BasePruningMethod]:
    if isinstance(pruning_fn, str) and pruning_fn in PRUNING_METHODS:
        return PRUNING_METHODS[pruning_fn]
    if isinstance(pruning_fn, type) and issubclass(pruning_fn, torch_prune.BasePruningMethod):
        return pruning_fn
    raise error(
        "ModelPruning",
        f"pruning_fn={_name(pruning_fn)}: the masks are computed by a torch pruning method.",
        fix=f"pass one of {sorted(PRUNING_METHODS)}, or a subclass of "
        "torch.nn.utils.prune.BasePruningMethod (not a function such as prune.l1_unstructured).",
    )


def _method_kwargs(
    method: type[torch_prune.BasePruningMethod],
    pruning_fn: object,
    *,
    dim: int | None,
    norm: float | str | None,
) -> dict[str, Any]:
    if method is torch_prune.LnStructured:
        if dim is None or norm is None:
            raise error(
                "ModelPruning",
                "pruning_fn='ln_structured' needs the dimension and the norm of its slices.",
                fix="pass pruning_dim=... and pruning_norm=..., e.g. pruning_dim=0, pruning_norm=2.",
            )
        return {"n": norm, "dim": dim}
    if method is torch_prune.RandomStructured:
        if dim is None:
            raise error(
                "ModelPruning",
                "pruning_fn='random_structured' needs the dimension of its slices.",
                fix="pass pruning_dim=..., e.g. pruning_dim=0.",
            )
        return {"dim": dim}
    del pruning_fn
    return {}


def _name(pruning_fn: object) -> str:
    return (
        repr(pruning_fn)
        if isinstance(pruning_fn, str)
        else getattr(pruning_fn, "__name__", type(pruning_fn).__name__)
    )


def _stored(module: nn.Module, name: str) -> Tensor:
    """The tensor object stored for ``module.<name>`` (a tie's holders store the same one)."""
    if parametrize.is_parametrized(module, name):
        return parametrization_list(module, name).original
    stored: Tensor = module._parameters[name]  # type: ignore[assignment]  # checked by _is_tensor
    return stored


def _is_tensor(module: nn.Module, name: str) -> bool:
    if parametrize.is_parametrized(module, name):
        return True
    return isinstance(module._parameters.get(name), nn.Parameter)


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _local(name: str) -> str:
    return name.rpartition(".")[2]
