"""``GradualPruning``: the cubic sparsity schedule of Zhu & Gupta (2017), driving
:func:`~maskparam.update_masks` from the training loop in one line."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from torch import Tensor, nn

from maskparam.constrain.apply import apply_mask
from maskparam.constrain.distributed import refuse_ddp_wrapper
from maskparam.constraints.compact import AUTO_COMPACT_MAX_FREE
from maskparam.constraints.mask import Mask
from maskparam.core.constraint import Constraint, Layout
from maskparam.core.inference import refuse_inference_mode
from maskparam.core.match import Selector, TensorIndex, check_selector, describe, match_rule
from maskparam.core.optimizer import UNSET, Optimizers, as_optimizers
from maskparam.core.progress import PROGRESS_BUFFER, PruningProgress, check_count_owner, claim
from maskparam.core.tensors import TensorRef
from maskparam.errors import MaskparamError, check_bool, check_int, check_module, error
from maskparam.masks.generators import MaskGenerator, MaskSource, check_fraction, describe_source
from maskparam.prune.update import run_update

__all__ = ["GradualPruning", "PruningRules", "cubic_sparsity"]

PruningRules: TypeAlias = Mapping[Selector, Callable[[float], MaskSource]]


def _has_mask(ref: TensorRef) -> bool:
    return any(getattr(p, "mask_spec", None) is Mask for p in ref.parametrizations)


def check_schedule(
    subject: str, *, initial: float, final: float, begin: int, end: int, every: int
) -> None:
    """Refuse a schedule that does not run from ``initial`` at ``begin`` up to ``final`` at
    ``end`` in steps of ``every`` (what :func:`cubic_sparsity` and :class:`GradualPruning`
    take)."""
    named = (
        ("initial_sparsity", "sparsity") if subject == "GradualPruning" else ("initial", "final")
    )
    check_fraction(final, named[1])
    check_fraction(initial, named[0])
    for value, what in ((begin, "begin"), (end, "end"), (every, "every")):
        check_int(value, subject, what)
    if initial > final:
        raise error(
            subject,
            f"{named[0]}={initial} exceeds {named[1]}={final}.",
            fix=f"the schedule only tightens: pass an {named[0]} <= {named[1]}.",
        )
    if not 0 <= begin < end or every < 1 or (end - begin) % every:
        raise error(
            subject,
            f"begin={begin}, end={end}, every={every}: the masks are updated at begin, "
            "begin + every, ..., end.",
            fix="pass 0 <= begin < end and every >= 1 that divides end - begin.",
        )


def cubic_sparsity(
    step: int, *, initial: float, final: float, begin: int, end: int, every: int
) -> float:
    """The sparsity at ``step``: ``final + (initial - final) * (1 - (step - begin) / (end -
    begin))**3``, clamped to [initial, final] (so ``initial`` before ``begin``, ``final`` after
    ``end``). The formula of Zhu & Gupta (2017), and of ``torch.ao.pruning.CubicSL``'s
    ``sparsity_compute_fn`` with ``t_0=begin, dt=every, n=(end - begin) // every``.

    The schedule must make sense: sparsities in [0, 1] with ``initial <= final``, and
    ``0 <= begin < end`` with ``every >= 1`` dividing ``end - begin``; anything else (an end
    before the beginning, ``every=0``) is refused with a :class:`~maskparam.MaskparamError`.

    >>> cubic_sparsity(50, initial=0.0, final=0.9, begin=0, end=100, every=10)
    0.7875
    >>> cubic_sparsity(5, initial=0.0, final=0.9, begin=10, end=0, every=1)
    Traceback (most recent call last):
    ...
    maskparam.errors.MaskparamError: cubic_sparsity: begin=10, end=0, every=1: the masks are updated at begin, begin + every, ..., end.
      fix: pass 0 <= begin < end and every >= 1 that divides end - begin.
    """
    check_int(step, "cubic_sparsity", "step")
    check_schedule(
        "cubic_sparsity", initial=initial, final=final, begin=begin, end=end, every=every
    )
    n = (end - begin) // every
    s_t = final + (initial - final) * (1.0 - (step - begin) / (every * n)) ** 3
    return max(initial, min(final, s_t))


class GradualPruning:
    """Prune gradually to ``sparsity``: masks tighten on Zhu & Gupta's cubic schedule, from
    ``initial_sparsity`` at step ``begin`` to ``sparsity`` at step ``end``, every ``every``
    steps. Fast at first, while many weights are redundant, then ever more slowly.

    ``rules`` maps selectors to a function from a sparsity to a mask source, e.g.
    ``{"*.weight": mp.masks.global_magnitude}`` or ``lambda s: mp.masks.structured(s, dim=0)``.
    On construction the selected tensors get ``mp.Mask(rule(initial_sparsity))``; where they all
    have a Mask already (a resumed run, or a stack the user applied), the masks stay as they are
    until the next scheduled step. Then call :meth:`step` after
    each optimizer step; at each scheduled step it calls :func:`~maskparam.update_masks`, so
    the Parameters, the optimizer and its state carry on. ``optimizer``: the optimizer(s) that
    train the model, whose state follows the masks (set :attr:`optimizer` later if it is created
    after the schedule; ``None`` where no optimizer holds state).

    The step count is kept in the model, as its buffer ``maskparam_pruning_steps`` (beside the
    masks), so any checkpoint of the model resumes the schedule: build the model, the same
    ``GradualPruning`` (any init), then ``load_state_dict``. ``step(global_step)`` follows a
    trainer's counter instead of counting; ``maskparam.integrations`` has the callbacks for HF
    Trainer and Lightning. A scheduled update that would keep more entries than the masks keep
    now (a schedule restarted by a checkpoint without the count) is refused.

    Under ``DistributedDataParallel``: pass the model inside the wrapper, and call :meth:`step`
    on every rank (a step that changes the masks is a collective; every rank takes rank 0's). A
    compact layout resizes its Parameters at each step that changes the sparsity, which a DDP
    wrapper built before would no longer average: refused unless ``rewrap_ddp=True`` says that
    you wrap the model again after each such step (see :func:`~maskparam.update_masks`).

    ``layout="auto"`` stores the masked tensors compact from the start where the *final*
    density allows it (see ``Mask``'s layouts). Most of the steps run near that density. Where
    compact is not possible, they are stored dense.

    >>> import torch, maskparam as mp
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> optimizer = torch.optim.AdamW(model.parameters())
    >>> pruning = mp.GradualPruning(
    ...     model, {"*.weight": mp.masks.global_magnitude}, sparsity=0.9, end=100, every=10,
    ...     optimizer=optimizer,
    ... )
    >>> for step in range(100):
    ...     loss = model(torch.randn(8, 16)).square().mean()
    ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
    ...     _ = pruning.step()
    >>> weights = mp.summary(model).tensors
    >>> pruning.sparsity, sum(t.free for t in weights), sum(t.total for t in weights)
    (0.9, 32, 320)
    """

    def __init__(
        self,
        model: nn.Module,
        rules: PruningRules,
        *,
        sparsity: float,
        end: int,
        begin: int = 0,
        every: int = 1,
        initial_sparsity: float = 0.0,
        layout: Layout = "auto",
        optimizer: Optimizers | None = UNSET,
        rewrap_ddp: bool = False,
    ) -> None:
        check_module(model, "GradualPruning")
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            raise error(
                "GradualPruning",
                "the model is torch.compile's wrapper; the schedule keeps its step count and "
                "masks in the model inside it.",
                fix="build the schedule on the model (model._orig_mod, or before compiling), "
                "then compile it.",
            )
        # Its step count is a new buffer of the model, and its steps create masks.
        refuse_inference_mode("GradualPruning")
        refuse_ddp_wrapper(model, "GradualPruning")
        check_bool(rewrap_ddp, "GradualPruning", "rewrap_ddp")
        check_schedule(
            "GradualPruning",
            initial=initial_sparsity,
            final=sparsity,
            begin=begin,
            end=end,
            every=every,
        )
        if layout not in ("auto", "dense", "compact", "csr"):
            raise error(
                "GradualPruning",
                f"unknown layout {layout!r}.",
                fix="use 'auto', 'dense', 'compact' or 'csr'.",
            )
        if not isinstance(rules, Mapping) or not rules:  # type: ignore[redundant-expr]  # user input
            raise error(
                "GradualPruning",
                f"rules must be a non-empty mapping from selectors to functions of the sparsity; "
                f"got {rules!r}.",
                fix="pass e.g. {'*.weight': mp.masks.global_magnitude}.",
            )
        for selector, rule in rules.items():
            check_selector(selector)
            if isinstance(rule, (MaskGenerator, Tensor)):
                raise error(
                    f"rule {describe(selector)}",
                    f"maps to a mask ({describe_source(rule)}), not to a function of the "
                    "sparsity: the schedule calls it with each sparsity it prunes to.",
                    fix="pass the function itself, e.g. mp.masks.global_magnitude (not "
                    "mp.masks.global_magnitude(0.9)), or lambda s: mp.masks.global_magnitude(s).",
                )
            if not callable(rule):
                raise error(
                    f"rule {describe(selector)}",
                    f"maps to a {type(rule).__name__}, not a function of the sparsity.",
                    fix="map it to e.g. mp.masks.global_magnitude, or lambda s: "
                    "mp.masks.structured(s, dim=0).",
                )
        if optimizer is not UNSET:
            as_optimizers(optimizer, "GradualPruning")
        self.model = model
        #: The optimizer(s) whose state follows the masks (see :func:`~maskparam.update_masks`);
        #: set it here once the optimizer exists, if it did not when the schedule was made.
        self.optimizer: Optimizers | None = optimizer
        #: A new DistributedDataParallel wraps the model after each mask change (update_masks).
        self.rewrap_ddp = rewrap_ddp
        self.rules = dict(rules)
        self.final = sparsity
        self.initial = initial_sparsity
        self.begin, self.end, self.every = begin, end, every
        selected = self._selected()
        tensors = tuple(dict.fromkeys(ref.name for ref in selected))
        check_count_owner(model, tensors, "GradualPruning")  # before anything changes
        holders = [(ref.name, m, local) for ref in selected for m, local in ref.holders]
        claim(model, holders, "GradualPruning", mark=False)
        self._start(layout, resuming=PruningProgress.held_by(model))
        claim(model, holders, "GradualPruning", mark=True)
        device = next((ref.storage.device for ref in selected), None)
        #: Reads and writes the step count the model keeps in its ``maskparam_pruning_steps``
        #: buffer (beside the masks), so that every checkpoint of the model carries it.
        self.progress = PruningProgress(model, device=device, tensors=tensors)

    def _start(self, layout: Layout, *, resuming: bool) -> None:
        selected = self._selected()
        masked = [ref for ref in selected if _has_mask(ref)]
        plain = [ref for ref in selected if not ref.has_constraint]
        others = [ref for ref in selected if ref.has_constraint and not _has_mask(ref)]
        if resuming and plain:
            raise error(
                repr(plain[0].name),
                f"the model holds a schedule's step count ({PROGRESS_BUFFER!r}), but this "
                "tensor, which the rules select, has no Mask: it is not the schedule that "
                "counted them, and two schedules would count each step twice.",
                fix="drive every tensor from one GradualPruning (one rules mapping), with the "
                "rules of the schedule that pruned this model.",
            )
        if others or (masked and plain):
            odd = (others or plain)[0]
            raise error(
                repr(odd.name),
                "GradualPruning adds a Mask to the tensors its rules select, or updates the Mask "
                "they all have (a resumed run); this one "
                + ("has another constraint." if others else "has none, while others have one."),
                fix="apply_mask the stack yourself (e.g. [mp.Triangular(), mp.Mask(...)]) to "
                "every selected tensor first, or select only unconstrained tensors.",
            )
        given = None if self.optimizer is UNSET else self.optimizer
        if masked:
            # Already masked (a resumed run, after load_state_dict of both): the masks stay as
            # they are; the next scheduled step computes new ones.
            return
        if layout == "auto" and 1 - self.final <= AUTO_COMPACT_MAX_FREE:
            try:
                apply_mask(self.model, self._masks(self.initial, "compact"), optimizer=given)
                # Compact from the start because the final density will be low, but still
                # "auto"'s: a later update_masks that regrows it may choose dense again.
                for ref in self._selected():
                    for p in ref.parametrizations[:1]:
                        if isinstance(p, Constraint):
                            p.auto_layout = True
                return
            except MaskparamError:
                pass  # e.g. a tied or frozen tensor: let "auto" decide per tensor
        apply_mask(self.model, self._masks(self.initial, layout), optimizer=given)

    def _selected(self) -> list[TensorRef]:
        index = TensorIndex(self.model)
        return [ref for sel in self.rules for ref in match_rule(sel, index).targets]

    def _masks(self, sparsity: float, layout: Layout) -> dict[Selector, Mask]:
        return {sel: Mask(self._source(sel, sparsity), layout=layout) for sel in self.rules}

    def _source(self, selector: Selector, sparsity: float) -> MaskSource:
        """The mask source the rule of ``selector`` gives for ``sparsity`` (its failures, and
        anything but a mask source, refused naming the rule)."""
        try:
            source = self.rules[selector](sparsity)
        except MaskparamError:
            raise
        except Exception as failure:
            raise error(
                f"rule {describe(selector)}",
                f"calling it with the sparsity {sparsity} raised {type(failure).__name__}: "
                f"{failure}",
                fix="map the selector to a function of the sparsity that returns a mask source, "
                "e.g. mp.masks.global_magnitude or lambda s: mp.masks.structured(s, dim=0).",
            ) from failure
        if not (isinstance(source, (Tensor, MaskGenerator)) or callable(source)):
            raise error(
                f"rule {describe(selector)}",
                f"returned a {type(source).__name__} for the sparsity {sparsity}, not a mask "
                "source.",
                fix="return a generator such as mp.masks.magnitude(s), a callable or a mask tensor.",
            )
        return source

    def _update(self, sparsity: float) -> None:
        unmasked = [ref.name for ref in self._selected() if not _has_mask(ref)]
        if unmasked:
            raise error(
                repr(unmasked[0]),
                "the schedule's rules select it, but it has no Mask any more (baked, say by "
                "mp.remove_parametrizations of a submodule): the schedule would go on over the "
                "other tensors alone, short of its sparsity.",
                fix="bake the whole model once the schedule is over; to go on pruning it, "
                "apply a Mask to it again (mp.apply_mask) before the next scheduled step.",
            )
        rules = {sel: self._source(sel, sparsity) for sel in self.rules}
        run_update(
            self.model,
            rules,
            optimizer=self.optimizer,
            strict=True,
            caller="GradualPruning",
            rewrap_ddp=self.rewrap_ddp,
            only_tighten=True,
        )

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity after ``step`` optimizer steps (see :func:`cubic_sparsity`)."""
        return cubic_sparsity(
            step,
            initial=self.initial,
            final=self.final,
            begin=self.begin,
            end=self.end,
            every=self.every,
        )

    @property
    def steps(self) -> int:
        """Optimizer steps counted so far: kept in the model's state_dict (see :attr:`progress`),
        so a loaded checkpoint of the model resumes the count."""
        return self.progress.steps

    @property
    def sparsity(self) -> float:
        """The sparsity the masks were last computed for: the schedule's at the last scheduled
        step up to :attr:`steps` (``initial_sparsity`` before ``begin``)."""
        return self._sparsity_after(self.steps)

    def _sparsity_after(self, steps: int) -> float:
        if steps < self.begin:
            return self.initial
        last = self.begin + (min(steps, self.end) - self.begin) // self.every * self.every
        return self.sparsity_at(last)

    def step(self, global_step: int | None = None) -> float:
        """Count one optimizer step, or, with ``global_step``, follow a trainer's counter (the
        optimizer steps taken so far: HF's ``state.global_step``, Lightning's
        ``trainer.global_step``). Where a scheduled step (``begin``, ``begin + every``, ...,
        ``end``) was reached, compute the masks for the sparsity it schedules. Returns the
        sparsity the masks now have. A refused update counts no step: calling again (say, once
        :attr:`optimizer` is set) retries it.

        ``global_step`` may jump ahead (the masks take the sparsity of the last scheduled step
        passed) and may repeat (nothing happens); one behind :attr:`steps` is refused, since the
        masks of a later step are in the model (a model checkpoint newer than the trainer's).
        """
        refuse_inference_mode("GradualPruning")
        if global_step is None:
            target_step = self.steps + 1
        else:
            check_int(global_step, "GradualPruning.step", "global_step")
            if not 0 <= global_step < 2**63:
                raise error(
                    "GradualPruning.step",
                    f"global_step={global_step}: a count of optimizer steps, from 0 to 2**63 - 1.",
                    fix="pass the trainer's counter of optimizer steps.",
                )
            if global_step < self.steps:
                raise error(
                    "GradualPruning.step",
                    f"global_step={global_step} is behind the {self.steps} steps the schedule "
                    "counted (the model's state_dict holds them): the trainer's counter and "
                    "the model's checkpoint come from different steps.",
                    fix="resume the trainer and the model from the same checkpoint, or call "
                    "step() without global_step to count on from the model's steps.",
                )
            target_step = global_step
        target = self._sparsity_after(target_step)
        if target != self.sparsity:
            self._update(target)
        self.progress.advance(target_step)
        return self.sparsity

    def state_dict(self) -> dict[str, Any]:
        """The schedule's progress. The model's state_dict holds it too (its
        ``maskparam_pruning_steps`` buffer, beside the masks), so a checkpoint of the model alone
        resumes the schedule; this dict is for a checkpoint that keeps it apart."""
        return {"steps": self.steps, "sparsity": self.sparsity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; load the model's checkpoint too.

        The whole dict is checked before anything changes: exactly the keys ``"steps"`` (an
        int >= 0) and ``"sparsity"`` (this schedule's sparsity after those steps); anything
        else is refused with a :class:`~maskparam.MaskparamError`. The count is written into
        the model's ``maskparam_pruning_steps`` buffer, where a model checkpoint also brings it.
        """
        subject = "GradualPruning.load_state_dict"
        fix = (
            "pass what GradualPruning.state_dict() returned (e.g. {'steps': 10, 'sparsity': 0.5})."
        )
        if not isinstance(state, Mapping):
            raise error(
                subject, f"the state must be a dict; got a {type(state).__name__}.", fix=fix
            )
        keys = set(state)
        if keys != {"steps", "sparsity"}:
            details = []
            if {"steps", "sparsity"} - keys:
                details.append(f"missing: {sorted({'steps', 'sparsity'} - keys)}")
            if keys - {"steps", "sparsity"}:
                details.append(f"unexpected: {sorted(map(repr, keys - {'steps', 'sparsity'}))}")
            raise error(
                subject, "the state must hold exactly 'steps' and 'sparsity'.", *details, fix=fix
            )
        steps, sparsity = state["steps"], state["sparsity"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise error(subject, f"'steps' must be an int >= 0; got {steps!r}.", fix=fix)
        number = isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool)
        if not (number and self.initial <= sparsity <= self.final):
            problem = (
                f"'sparsity' must be a number between the schedule's initial_sparsity="
                f"{self.initial} and sparsity={self.final}; got {sparsity!r}."
            )
        elif float(sparsity) != self._sparsity_after(steps):
            problem = (
                f"'sparsity'={sparsity!r} is not this schedule's sparsity after {steps} steps "
                f"({self._sparsity_after(steps)}): the state comes from another schedule."
            )
        else:
            problem = ""
        if problem:
            raise error(
                subject, problem, fix="load the state of a schedule with the same settings: " + fix
            )
        self.progress.advance(steps)
