"""Data-driven importance: masks scored from batches the caller passes (nothing is downloaded).

* :func:`fisher` (``mp.masks.fisher``): the diagonal empirical Fisher information, the
  squared gradient of a loss summed over a few batches; selects the entries with the largest
  scores, ranked once across every tensor a rule selects. The FISH mask of Sung et al. 2021,
  "Training Neural Networks with Fixed Sparse Masks": train the selected entries, freeze the
  rest, ``mp.Freeze(~mp.masks.fisher(...))``.
* :func:`wanda` (``mp.masks.wanda``): Sun et al. 2023, "A Simple and Effective Pruning
  Approach for Large Language Models": per output row of each ``nn.Linear`` weight, prunes the
  entries with the smallest ``|W_ij| * ||X_j||_2``, the norm of input feature ``j`` over every
  calibration token; ``mp.Mask(mp.masks.wanda(...))`` prunes without retraining.

Both run the model when the generator is created and keep only the scores (per tensor: the
summed squared gradients; per Linear: one float32 vector). The model comes back as it was: its
parameters' values and ``.grad`` (never written: the gradients come from
``torch.autograd.grad``), ``requires_grad``, every module's train/eval flag, its own buffers
(BatchNorm's running statistics in training mode) and the global RNG state (dropout).
:func:`fisher` runs the model in eval mode (no dropout, BatchNorm on its running statistics), so
that the same model and batches give the same mask in every process: a FISH fine-tune is reloaded
by computing the mask again (its checkpoint holds the trained entries, not dropout's draws). Its
mode comes back afterwards. :func:`wanda` runs the model in the mode it is in: call
``model.eval()`` first for calibration without dropout.

The scores are keyed by the names :func:`maskparam.apply_mask` gives the tensors (``"0.weight"``);
a generator called on a scored Parameter itself (``fish(model[0].weight)``) finds it too. FISH at
a density of 25% on a tiny classifier, every weight and bias ranked together:

>>> import torch, maskparam as mp
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
>>> data = [
...     (torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]]), torch.tensor([0, 1])),
...     (torch.tensor([[-0.3, 0.8, 0.1], [2.0, 1.0, 1.0]]), torch.tensor([1, 0])),
...     (torch.tensor([[1.0, 1.0, -2.0], [0.0, -1.5, 0.7]]), torch.tensor([0, 0])),
... ]
>>> def loss(model, batch):
...     x, y = batch
...     return torch.nn.functional.cross_entropy(model(x), y)
>>> fish = mp.masks.fisher(model, data, loss, density=0.25)
>>> _ = mp.apply_mask(model, {"*": mp.Freeze(~fish)})
>>> summary = mp.summary(model)
>>> summary.trainable, summary.total  # int(0.25 * 26) entries train, the rest are frozen
(6, 26)
>>> print(summary.tensors[0].constraint)
Freeze(freezes all but the 25% largest Fisher scores of the rule's tensors (3 batches), compact)
>>> [(t.name, t.free) for t in summary.tensors]  # one ranking: layers get different shares
[('0.weight', 2), ('0.bias', 0), ('2.weight', 2), ('2.bias', 2)]
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from maskparam.core.tensors import TensorRef, find_tensors
from maskparam.errors import MaskparamError, check_module, error
from maskparam.masks.generators import (
    JointMaskGenerator,
    check_fraction,
    concatenated,
    split_like,
)

__all__ = ["FisherMask", "WandaMask", "fisher", "wanda"]

Loss = Callable[[nn.Module, Any], Tensor]
Forward = Callable[[nn.Module, Any], object]


class _Untouched:
    """What running a model may change, saved before and put back after (see the module doc)."""

    def __init__(self, model: nn.Module) -> None:
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]
        # The model's own buffers (not maskparam's constraint state, which no forward writes):
        # the object each slot holds, and a copy to write back should a forward change it.
        self.buffers = [
            (module, name, buffer, buffer.detach().clone())
            for ref in find_tensors(model)
            if not ref.is_parameter and not ref.is_parametrized
            for module, name in [(ref.module, ref.local_name)]
            for buffer in [module._buffers[name]]
            if buffer is not None
        ]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
            else None
        )

    def restore(self) -> None:
        for param, grad in self.grads:
            if param.grad is not grad:
                param.grad = grad
        for param, flag in self.requires_grad:
            if param.requires_grad != flag:
                param.requires_grad_(flag)
        for module, flag in self.training:
            module.training = flag
        with torch.no_grad():
            for module, name, buffer, saved in self.buffers:
                module._buffers[name] = buffer
                # BatchNorm's kernel updates its statistics without bumping _version: compare.
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _batches(batches: object, caller: str) -> Iterator[Any]:
    if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
        raise error(
            caller,
            f"batches must be an iterable of batches (a list, a DataLoader); got a "
            f"{type(batches).__name__}.",
            fix="pass e.g. [x] for one batch x, or [(x, y), ...] with a loss that unpacks them.",
        )
    return iter(batches)


def _no_batches(caller: str) -> MaskparamError:
    return error(
        caller,
        "batches is empty: the scores need at least one batch.",
        fix="pass a few batches of your training (or calibration) data.",
    )


def _batches_in_words(count: int) -> str:
    return f"{count} batch" if count == 1 else f"{count} batches"


def _raised(caller: str, what: str, index: int, failure: Exception) -> MaskparamError:
    return error(
        caller,
        f"{what} raised {type(failure).__name__} on batch {index}: {failure}",
        fix="fix the callable or the batch; the model was left as it was.",
    )


class _ByTensor:
    """The name of a scored tensor by the tensor object itself (held weakly)."""

    def __init__(self) -> None:
        self.names: dict[int, tuple[weakref.ref[Tensor], str]] = {}

    def add(self, tensor: Tensor, name: str) -> None:
        self.names[id(tensor)] = (weakref.ref(tensor), name)

    def name_of(self, tensor: Tensor, default: str) -> str:
        found = self.names.get(id(tensor))
        return found[1] if found is not None and found[0]() is tensor else default


def _is_weight_of(ref: TensorRef, kind: type[nn.Module]) -> list[nn.Module]:
    """The modules of type ``kind`` that hold the tensor of ``ref`` as their ``weight``."""
    return [m for m, local in ref.holders if isinstance(m, kind) and local == "weight"]


class FisherMask(JointMaskGenerator):
    """Selects the ``int(density * n)`` entries with the largest Fisher scores among the ``n``
    entries of the rule's tensors; see :func:`fisher_mask`."""

    def __init__(
        self,
        density: float,
        sums: dict[str, Tensor],
        n_batches: int,
        uncovered: dict[str, str],
        by_tensor: _ByTensor,
    ) -> None:
        self.density = density
        #: Summed squared gradients by tensor name (aliases share one tensor); the ranking uses
        #: these, as FISH's reference does (a division by the batch count could merge values).
        self.sums = sums
        self.n_batches = n_batches
        self.uncovered = uncovered
        self.by_tensor = by_tensor

    def scores(self) -> dict[str, Tensor]:
        """The Fisher score of every scored tensor: the mean over batches of the squared
        gradient, by tensor name (new tensors)."""
        return {name: total / self.n_batches for name, total in self.sums.items()}

    @override
    def describe(self) -> str:
        return (
            f"the {100 * self.density:g}% largest Fisher scores of the rule's tensors "
            f"({_batches_in_words(self.n_batches)})"
        )

    def __repr__(self) -> str:
        return f"FisherMask(density={self.density!r}, {len(self.sums)} tensor names scored)"

    @override
    def build_joint(self, members: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        if not members:
            return []
        sums = [self._scores_of(name, tensor) for name, tensor in members]
        flat = concatenated(sums)
        # FISH's create_mask_gradient: keep_num = int(all_params_size * keep_ratio), then
        # torch.topk(scores, keep_num) over the concatenation in the model's order.
        keep = int(flat.numel() * self.density)
        selected = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        if keep:
            selected[torch.topk(flat, keep).indices] = True
        return split_like(selected, [tensor for _, tensor in members])

    def _scores_of(self, name: str, tensor: Tensor) -> Tensor:
        subject = f"masks.fisher for {name!r}"
        total = self.sums.get(name, self.sums.get(self.by_tensor.name_of(tensor, name)))
        if total is None:
            why = self.uncovered.get(
                name, "the model the scores were computed on has no such tensor"
            )
            raise error(
                subject,
                f"the Fisher scores do not cover this tensor: {why}.",
                fix="call fisher(...) before apply_mask constrains the tensors (FISH scores them "
                "once, before fine-tuning), and select only tensors that were trainable "
                "parameters then (leave the others out of the rule).",
            )
        if total.shape != tensor.shape:
            raise error(
                subject,
                f"the scores have shape {tuple(total.shape)}, the tensor {tuple(tensor.shape)}.",
                fix="compute the scores on the model the rule constrains, after any resizing.",
            )
        return total


def fisher_mask(model: nn.Module, batches: Iterable[Any], loss: Loss, density: float) -> FisherMask:
    """Score every trainable parameter of ``model`` by the sum over ``batches`` of the squared
    gradient of ``loss(model, batch)``; see :func:`maskparam.masks.fisher`."""
    caller = "masks.fisher"
    check_module(model, caller)
    check_fraction(density, "density")
    if not callable(loss):
        raise error(
            caller,
            f"loss must be a callable loss(model, batch) -> scalar tensor; got a "
            f"{type(loss).__name__}.",
            fix="pass e.g. lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]).",
        )
    iterator = _batches(batches, caller)
    params: list[Tensor] = []
    sums: dict[str, Tensor] = {}
    uncovered: dict[str, str] = {}
    by_tensor = _ByTensor()
    for ref in find_tensors(model):
        reason = None
        if ref.has_constraint:
            reason = "maskparam already constrains it; compute the scores before apply_mask"
        elif ref.is_parametrized:
            reason = "it is parametrized: scores cover plain parameters only"
        elif not ref.is_parameter:
            reason = "it is a buffer, which has no gradient"
        elif not ref.storage.requires_grad:
            reason = "it does not require grad (requires_grad=False)"
        if reason is not None:
            uncovered.update(dict.fromkeys(ref.all_names, reason))
            continue
        param = ref.storage
        params.append(param)
        total = torch.zeros_like(param, dtype=torch.promote_types(param.dtype, torch.float32))
        if param.is_complex():
            total = torch.zeros_like(param, dtype=param.real.dtype)
        sums.update(dict.fromkeys(ref.all_names, total))
        by_tensor.add(param, ref.name)
    totals = list({id(t): t for t in sums.values()}.values())  # one per parameter, in order
    if not params:
        raise error(
            caller,
            "the model has no trainable parameter to score.",
            fix="call fisher(...) on the model before freezing or constraining it.",
        )
    n_batches = 0
    untouched = _Untouched(model)
    try:
        model.eval()  # no dropout: the mask is a function of the weights and batches alone
        for param, _ in untouched.grads:  # put back by restore(); a backward() shows here
            param.grad = None
        with torch.enable_grad():
            for index, batch in enumerate(iterator):
                try:
                    value = loss(model, batch)
                except MaskparamError:
                    raise
                except Exception as failure:
                    raise _raised(caller, "loss(model, batch)", index, failure) from failure
                _check_loss(value, index)
                _check_no_backward(untouched, index)
                try:
                    grads = torch.autograd.grad(value, params, allow_unused=True)
                except RuntimeError as failure:
                    raise _raised(caller, "the gradient of the loss", index, failure) from failure
                for total, grad in zip(totals, grads, strict=True):
                    if grad is not None:
                        # FISH: gradients_dict[name] += torch.square(param.grad)
                        total.add_(grad.abs().square() if grad.is_complex() else torch.square(grad))
                n_batches += 1
    finally:
        untouched.restore()
    if not n_batches:
        raise _no_batches(caller)
    for name, total in sums.items():
        if not bool(torch.isfinite(total).all()):
            raise error(
                caller,
                f"the squared gradients of {name!r} are not finite (inf or NaN).",
                fix="check the loss on these batches (a NaN loss, or gradients too large).",
            )
    return FisherMask(density, sums, n_batches, uncovered, by_tensor)


def _check_no_backward(untouched: _Untouched, index: int) -> None:
    """Refuse a loss that ran ``backward()`` itself: fisher takes the gradients of the loss it
    returns (a second backward through a freed graph fails, and ``.grad`` is not fisher's)."""
    for param, _ in untouched.grads:
        if param.grad is not None:
            raise error(
                "masks.fisher",
                f"loss(model, batch) wrote .grad on batch {index}: it called backward() itself.",
                fix="return the loss without calling backward(); fisher takes its gradients "
                "(the model's .grad is left as it was).",
            )


def _check_loss(value: object, index: int) -> None:
    if not (isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point()):
        got = (
            f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            if isinstance(value, Tensor)
            else f"a {type(value).__name__}"
        )
        raise error(
            "masks.fisher",
            f"loss(model, batch) must return a scalar floating-point tensor; on batch {index} "
            f"it returned {got}.",
            fix="reduce the loss to a scalar, e.g. with .mean() (reduction='mean').",
        )
    if not value.requires_grad:
        raise error(
            "masks.fisher",
            f"the loss of batch {index} does not depend on any trainable parameter (it does not "
            "require grad).",
            fix="compute the loss from the model's output, outside torch.no_grad().",
        )


class _RowNorms:
    """WrappedGPT.add_batch of Wanda's reference (lib/layerwrapper.py), for one nn.Linear: the
    running mean over samples of the squared L2 norm of each input feature."""

    def __init__(self, linear: nn.Linear) -> None:
        self.shape = tuple(linear.weight.shape)
        self.scaler_row = torch.zeros(self.shape[1], device=linear.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: Tensor) -> None:
        inp = inp.detach()
        if inp.dim() == 1:
            inp = inp.reshape(1, 1, -1)
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]  # samples: the leading dim of a (batch, tokens, features) input
        inp = inp.reshape(-1, inp.shape[-1]).t()
        if inp.is_complex():
            inp = inp.abs()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


class WandaMask(JointMaskGenerator):
    """Selects all but the ``int(in_features * sparsity)`` smallest ``|W| * ||X||`` of each row of
    each Linear weight; see :func:`wanda_mask`."""

    def __init__(
        self,
        sparsity: float,
        norms: dict[str, _RowNorms],
        n_batches: int,
        why_not: dict[str, str],
        by_tensor: _ByTensor,
    ) -> None:
        self.sparsity = sparsity
        self.by_tensor = by_tensor
        self.norms = norms
        self.n_batches = n_batches
        self.why_not = why_not

    def input_norms(self) -> dict[str, Tensor]:
        """``||X_j||_2`` per input feature as the score uses it (``sqrt`` of the reference's
        ``scaler_row``: the squared norm over all tokens divided by the number of samples), by
        Linear weight name."""
        return {name: rows.scaler_row.sqrt() for name, rows in self.norms.items() if rows.nsamples}

    @override
    def describe(self) -> str:
        return (
            f"all but the {100 * self.sparsity:g}% smallest |w|·‖x‖ of each row "
            f"(Wanda, {_batches_in_words(self.n_batches)})"
        )

    def __repr__(self) -> str:
        return f"WandaMask(sparsity={self.sparsity!r}, {len(self.norms)} Linear weight names)"

    @override
    def build_joint(self, members: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        return [self._kept(name, tensor) for name, tensor in members]

    def _kept(self, name: str, tensor: Tensor) -> Tensor:
        subject = f"masks.wanda for {name!r}"
        rows = self.norms.get(name, self.norms.get(self.by_tensor.name_of(tensor, name)))
        if rows is None:
            why = self.why_not.get(name, "it is not the weight of an nn.Linear of the model")
            raise error(
                subject,
                f"Wanda scores nn.Linear weights only: {why}.",
                fix="select the weights of Linear layers, e.g. the rule "
                "(torch.nn.Linear, 'weight') instead of a glob.",
            )
        if not rows.nsamples:
            raise error(
                subject,
                "no calibration input reached this Linear: its forward was never called (e.g. "
                "nn.MultiheadAttention's out_proj, whose weight is used directly).",
                fix="leave it out of the rule, or pass a forward that calls it.",
            )
        if tuple(tensor.shape) != rows.shape:
            raise error(
                subject,
                f"the input norms are for a weight of shape {rows.shape}, the tensor has "
                f"{tuple(tensor.shape)}.",
                fix="compute the scores on the model the rule constrains, after any resizing.",
            )
        weight = tensor.detach()
        # lib/prune.py::prune_wanda, unstructured: W_metric, a stable sort per row, and the first
        # int(W.shape[1] * sparsity) indices of each row pruned.
        w_metric = torch.abs(weight) * torch.sqrt(
            rows.scaler_row.to(weight.device).reshape((1, -1))
        )
        pruned = torch.zeros_like(w_metric, dtype=torch.bool)
        count = int(w_metric.shape[1] * self.sparsity)
        if count:
            indices = torch.sort(w_metric, dim=-1, stable=True)[1][:, :count]
            pruned.scatter_(1, indices, True)
        return pruned.logical_not_()


def wanda_mask(
    model: nn.Module,
    batches: Iterable[Any],
    sparsity: float,
    *,
    forward: Forward | None = None,
) -> WandaMask:
    """Record the input norms of every ``nn.Linear`` of ``model`` over ``batches``; see
    :func:`maskparam.masks.wanda`."""
    caller = "masks.wanda"
    check_module(model, caller)
    check_fraction(sparsity, "sparsity")
    if forward is not None and not callable(forward):
        raise error(
            caller,
            f"forward must be a callable forward(model, batch); got a {type(forward).__name__}.",
            fix="pass e.g. forward=lambda model, batch: model(**batch), or leave it out.",
        )
    run: Forward = forward if forward is not None else (lambda module, batch: module(batch))
    iterator = _batches(batches, caller)
    by_module: dict[int, _RowNorms] = {}
    norms: dict[str, _RowNorms] = {}
    why_not: dict[str, str] = {}
    by_tensor = _ByTensor()
    for ref in find_tensors(model):
        linears = _is_weight_of(ref, nn.Linear)
        if len(linears) > 1:
            why_not.update(
                dict.fromkeys(ref.all_names, f"it is tied: {len(linears)} Linear layers use it")
            )
        elif linears:
            linear = linears[0]
            assert isinstance(linear, nn.Linear)
            rows = by_module.setdefault(id(linear), _RowNorms(linear))
            norms.update(dict.fromkeys(ref.all_names, rows))
            by_tensor.add(ref.storage, ref.name)
    modules = {id(m): m for m in model.modules() if id(m) in by_module}

    def hook(rows: _RowNorms) -> Callable[..., None]:
        def record(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inp = args[0] if args else kwargs.get("input")
            if isinstance(inp, Tensor):
                rows.add_batch(inp)

        return record

    n_batches = 0
    untouched = _Untouched(model)
    handles = []
    try:
        for key, module in modules.items():
            handles.append(module.register_forward_pre_hook(hook(by_module[key]), with_kwargs=True))
        with torch.no_grad():
            for index, batch in enumerate(iterator):
                try:
                    run(model, batch)
                except MaskparamError:
                    raise
                except Exception as failure:
                    what = "forward(model, batch)" if forward is not None else "model(batch)"
                    raise _raised(caller, what, index, failure) from failure
                _check_finite_norms(norms, index)
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        untouched.restore()
    if not n_batches:
        raise _no_batches(caller)
    return WandaMask(sparsity, norms, n_batches, why_not, by_tensor)


def _check_finite_norms(norms: dict[str, _RowNorms], index: int) -> None:
    """Refuse calibration inputs whose norms are not finite: NaN or inf would rank largest and
    keep whatever weights meet them."""
    seen: set[int] = set()
    for name, rows in norms.items():
        if id(rows) in seen:
            continue
        seen.add(id(rows))
        if not bool(torch.isfinite(rows.scaler_row).all()):
            bad = int((~torch.isfinite(rows.scaler_row)).sum())
            raise error(
                f"masks.wanda for {name!r}",
                f"the input of this Linear on batch {index} makes {bad} of its "
                f"{rows.scaler_row.numel()} feature norms inf or NaN (a NaN or inf in the "
                "calibration data, or values whose squares overflow float32).",
                fix="calibrate on finite inputs (check the batches and the layers before this one).",
            )


def fisher(model: nn.Module, batches: Iterable[Any], loss: Loss, density: float) -> FisherMask:
    """Select the ``int(density * n)`` entries with the largest Fisher score among the ``n``
    entries of *all* the tensors one rule selects (one ranking, like :func:`global_magnitude`):
    the FISH mask (Sung et al. 2021), for sparse fine-tuning with ``mp.Freeze(~fish)``.

    The score of an entry is the mean over ``batches`` of the squared gradient of
    ``loss(model, batch)`` (a scalar tensor), computed now, when ``fisher`` is called, for every
    parameter that requires grad, with the model in eval mode (no dropout: the same model and
    batches give the same mask in any process); the model is left as it was (values, ``.grad``,
    its train/eval modes, buffers, RNG). ``loss`` returns the loss without calling
    ``backward()``: fisher takes its gradients itself. Like FISH's reference (``create_mask_gradient``): ``int()``, not ``round()``
    as :func:`random` and :func:`magnitude` do, and ``torch.topk`` over the rule's tensors
    concatenated in the model's order, so ties break as there. Batches of one example give
    the paper's per-example empirical Fisher. Call it before :func:`maskparam.apply_mask`
    constrains the tensors; see :mod:`maskparam.masks.importance`.

    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> x, y = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 1.0]])
    >>> fish = fisher(model, [(x, y)], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), 0.5)
    >>> fish(model.weight).sum().item()  # one tensor alone: ranked within it
    2
    """
    return fisher_mask(model, batches, loss, density)


def wanda(
    model: nn.Module, batches: Iterable[Any], sparsity: float, *, forward: Forward | None = None
) -> WandaMask:
    """Select all but the ``int(in_features * sparsity)`` entries of each row of each
    ``nn.Linear`` weight with the smallest ``|W_ij| * ||X_j||_2`` (Wanda, Sun et al. 2023), for
    pruning without retraining: ``mp.Mask(mp.masks.wanda(...))``.

    ``||X_j||`` is the L2 norm of input feature ``j`` over every calibration token, recorded now
    by forward pre-hooks while ``forward(model, batch)`` (default ``model(batch)``) runs over
    ``batches`` under ``torch.no_grad()``; the model is left as it was. As the reference
    (``lib/prune.py::prune_wanda``): a stable sort of each row, its first
    ``int(in_features * sparsity)`` entries pruned. One-shot: every input comes from the dense
    model, where the reference feeds each decoder layer the outputs of the layers it already
    pruned. Only Linear weights can be selected: use the rule ``(torch.nn.Linear, "weight")``.

    >>> import torch
    >>> layer = torch.nn.Linear(4, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0]]))
    >>> x = torch.tensor([[1.0, 2.0, 3.0, 40.0]])  # feature 3 is an outlier
    >>> wanda(layer, [x], 0.5)(layer.weight)  # magnitude would prune the outlier's 1.0 in row 1
    tensor([[False, False,  True,  True],
            [False, False,  True,  True]])
    """
    return wanda_mask(model, batches, sparsity, forward=forward)
