"""``to_sparse``: give each weight of a plain (baked) model the fastest layout for its shape and
sparsity, so that a pruned model is smaller and faster, not only full of zeros.

Zeros do not make dense hardware faster: a dense matmul costs the same whatever the values. A
sparse layout skips the zeros, but pays per stored entry and for its irregular access, so
whether it wins depends on the sparsity, the shape and the batch: on this project's machine a
1024 x 1024 Linear at batch 64 ran 5.7x faster as CSR at 95% zeros and far slower at 50%. So
``layout="auto"`` times both layouts for each weight, at the caller's batch size, and keeps the
faster; below :data:`MIN_ZEROS` it keeps dense without timing.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn

from maskparam.core.parametrize import parametrized_names
from maskparam.errors import check_int, check_module, error

__all__ = [
    "MIN_ZEROS",
    "CSRLinear",
    "SparseChoice",
    "sparse_bytes",
    "to_sparse",
]

ModuleT = TypeVar("ModuleT", bound=nn.Module)
SparseLayout = Literal["auto", "csr", "dense"]

#: Below this fraction of zeros ``layout="auto"`` keeps a weight dense without timing it: a CSR
#: product then costs several times the dense one (6x at 50% on a 1024 x 1024 Linear, 1 thread).
MIN_ZEROS = 0.5


@dataclass(frozen=True)
class SparseChoice:
    """What :func:`to_sparse` chose for one Linear: its layout, its zeros, and the timings (ms
    per forward at the batch size; None where it did not time)."""

    name: str
    layout: str
    zeros: float
    dense_ms: float | None
    sparse_ms: float | None


def to_sparse(
    model: ModuleT,
    *,
    batch_size: int = 64,
    layout: SparseLayout = "auto",
    min_speedup: float = 1.1,
) -> ModuleT:
    """Store each ``nn.Linear`` weight of a plain model in its fastest layout; in place, returns
    ``model``. For inference: the sparse weights do not train.

    ``layout="auto"`` times the Linear's forward at ``batch_size`` rows with the weight dense and
    as CSR (32-bit indices where they fit), interleaved, and keeps CSR where it is at least
    ``min_speedup`` times faster; ``"csr"`` converts every Linear weight with zeros; ``"dense"``
    converts nothing. What was chosen, and the timings, are in ``model.sparse_choices`` (a list
    of :class:`SparseChoice`).

    A converted Linear becomes a :class:`CSRLinear` (still an ``nn.Linear``): its forward
    computes ``W @ x.T`` with the CSR weight, which torch's sparse kernels run fast (``F.linear``
    with a CSR weight is not faster than dense). The state_dict holds the CSR
    weight under the same key: values and indices only, readable with
    ``torch.load(weights_only=True)``; ``torch.export`` traces it. On CUDA, an fp16/bf16 weight in
    the 2:4 pattern (``mp.masks.n_m(2, 4)``) is timed as ``torch.sparse.to_sparse_semi_structured``
    instead (layout ``"2:4"``; untested here: this project's machines have no GPU). Only modules of exactly
    ``nn.Linear`` are converted: a subclass may read its weight elsewhere (``MultiheadAttention``
    reads ``out_proj.weight`` directly).

    >>> import torch, maskparam as mp
    >>> layer = torch.nn.Linear(64, 64)
    >>> with torch.no_grad():
    ...     _ = layer.weight.mul_(torch.rand(64, 64) > 0.95)
    >>> expected = layer(torch.ones(2, 64))
    >>> _ = mp.to_sparse(layer, layout="csr")
    >>> layer.weight.layout, torch.allclose(layer(torch.ones(2, 64)), expected, atol=1e-6)
    (torch.sparse_csr, True)
    """
    check_module(model, "to_sparse")
    check_int(batch_size, "to_sparse", "batch_size")
    if batch_size < 1:
        raise error("to_sparse", f"batch_size={batch_size} must be >= 1.", fix="pass e.g. 64.")
    if layout not in ("auto", "csr", "dense"):
        raise error("to_sparse", f"unknown layout {layout!r}.", fix="use 'auto', 'csr' or 'dense'.")
    number = isinstance(min_speedup, (int, float)) and not isinstance(min_speedup, bool)  # type: ignore[redundant-expr]  # user input
    if not (number and math.isfinite(min_speedup) and min_speedup > 0):
        raise error(
            "to_sparse", f"min_speedup={min_speedup!r} must be a number > 0.", fix="pass e.g. 1.1."
        )
    constrained = [name for name, m in model.named_modules() if parametrized_names(m)]
    if constrained:
        raise error(
            "to_sparse",
            f"the model is still parametrized (e.g. {constrained[0] or type(model).__name__!r}): "
            "its weights are computed in the forward pass.",
            fix="bake first: mp.remove_parametrizations(model), then mp.to_sparse(model).",
        )
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise error(
            f"to_sparse ({meta[0]!r})",
            "the model is on the meta device: its zeros, and its speed, are not known.",
            fix="load the weights (to_empty and load_state_dict) first.",
        )
    shared = _shared_weights(model)
    linears = []
    choices = []
    for name, m in model.named_modules():
        if isinstance(m, CSRLinear):  # converted by an earlier call: it stays
            kept = m.weight.values().numel() / max(math.prod(m.weight.shape), 1)
            choices.append(SparseChoice(name, "csr", 1.0 - kept, None, None))
        elif type(m) is nn.Linear:
            why = _kept_dense(m, shared)
            if why is None:
                linears.append((name, m))
            else:
                choices.append(SparseChoice(name, f"dense ({why})", 0.0, None, None))
    unsupported = [name for name, m in linears if not _csr_supported(m.weight)]
    if layout == "csr" and unsupported:
        dtype = dict(linears)[unsupported[0]].weight.dtype
        raise error(
            f"to_sparse({unsupported[0]!r})",
            f"torch has no CSR product for {dtype} on this device (its CSR kernels take float32 "
            "and float64 on the CPU); nothing was converted.",
            fix="convert the model to float32 first, or use layout='auto' (it keeps these dense).",
        )
    with torch.no_grad():
        for name, linear in linears:
            weight = linear.weight
            zeros = float((weight == 0).sum()) / max(weight.numel(), 1)
            if name in unsupported:
                choice = SparseChoice(
                    name, f"dense (no CSR kernel for {weight.dtype})", zeros, None, None
                )
            else:
                choice = _choose(name, linear, zeros, batch_size, layout, min_speedup)
            if choice.layout == "csr":
                _make_csr(linear)
            choices.append(choice)
    object.__setattr__(model, "sparse_choices", choices)
    return model


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of tensors that more than one module slot holds (a tied embedding and output layer)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for tensor in [*module._parameters.values(), *module._buffers.values()]:
            if tensor is not None:
                seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _kept_dense(linear: nn.Linear, shared: set[int]) -> str | None:
    """Why a Linear must keep its dense weight, or None."""
    if id(linear.weight) in shared:
        return "tied to another module"  # the other one reads the dense tensor
    if linear._forward_pre_hooks or linear._forward_hooks:
        return "has forward hooks"  # e.g. the old weight_norm recomputes the weight in one
    return None


def _csr_supported(weight: Tensor) -> bool:
    """Whether torch multiplies a CSR tensor of ``weight``'s dtype on its device."""
    if weight.is_cuda:
        return weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    return weight.dtype in (torch.float32, torch.float64)


def _choose(
    name: str,
    linear: nn.Linear,
    zeros: float,
    batch_size: int,
    layout: SparseLayout,
    min_speedup: float,
) -> SparseChoice:
    if layout == "dense" or zeros == 0.0:
        return SparseChoice(name, "dense", zeros, None, None)
    if layout != "csr" and _semi_structured_candidate(linear.weight):
        return _choose_semi_structured(name, linear, zeros, batch_size, min_speedup)
    if layout == "csr":
        return SparseChoice(name, "csr", zeros, None, None)
    if zeros < MIN_ZEROS:
        return SparseChoice(name, "dense", zeros, None, None)
    weight = linear.weight.detach()
    csr = _csr(weight)
    bias = linear.bias.detach() if linear.bias is not None else None  # type: ignore[redundant-expr]
    x = torch.randn(batch_size, linear.in_features, dtype=weight.dtype, device=weight.device)
    dense_ms, sparse_ms = _interleaved_ms(
        lambda: torch.nn.functional.linear(x, weight, bias),
        lambda: _csr_linear(x, csr, bias, linear.out_features),
    )
    faster = dense_ms >= min_speedup * sparse_ms
    return SparseChoice(name, "csr" if faster else "dense", zeros, dense_ms, sparse_ms)


def _semi_structured_candidate(weight: Tensor) -> bool:
    """A CUDA fp16/bf16 weight whose every 4 consecutive entries along the last dim hold at most
    2 nonzeros: the 2:4 pattern ``torch.sparse.to_sparse_semi_structured`` accelerates (the
    pattern of ``mp.masks.n_m(2, 4)``)."""
    if not weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16):
        return False
    if weight.dim() != 2 or weight.shape[-1] % 4:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def _choose_semi_structured(
    name: str,
    linear: nn.Linear,
    zeros: float,
    batch_size: int,
    min_speedup: float,
) -> SparseChoice:
    """Time the 2:4 semi-structured weight against dense (CUDA only; untested on this project's
    CPU-only machines). Kept where faster by ``min_speedup``; torch's own shape limits (e.g. a
    minimum size) keep a weight dense."""
    weight = linear.weight.detach()
    try:
        semi = torch.sparse.to_sparse_semi_structured(weight)
    except (RuntimeError, ValueError):
        return SparseChoice(name, "dense", zeros, None, None)
    bias = linear.bias.detach() if linear.bias is not None else None  # type: ignore[redundant-expr]
    x = torch.randn(batch_size, linear.in_features, dtype=weight.dtype, device=weight.device)

    def synchronized(run: Callable[[], object]) -> Callable[[], object]:
        def timed() -> object:
            out = run()
            torch.cuda.synchronize(weight.device)
            return out

        return timed

    dense_ms, sparse_ms = _interleaved_ms(
        synchronized(lambda: torch.nn.functional.linear(x, weight, bias)),
        synchronized(lambda: torch.nn.functional.linear(x, semi, bias)),
    )
    if dense_ms < min_speedup * sparse_ms:
        return SparseChoice(name, "dense", zeros, dense_ms, sparse_ms)
    linear.weight = nn.Parameter(semi, requires_grad=False)
    return SparseChoice(name, "2:4", zeros, dense_ms, sparse_ms)


def _interleaved_ms(*candidates: Callable[[], object], rounds: int = 7) -> list[float]:
    """Median milliseconds per call of each candidate, run in turns (a warm-up call first)."""
    times: list[list[float]] = [[] for _ in candidates]
    for candidate in candidates:
        candidate()
    for _ in range(rounds):
        for i, candidate in enumerate(candidates):
            start = time.perf_counter()
            candidate()
            times[i].append(1e3 * (time.perf_counter() - start))
    return [statistics.median(t) for t in times]


def _csr(weight: Tensor) -> Tensor:
    """``weight`` as CSR, with 32-bit indices where they fit (half the bytes of torch's int64)."""
    with warnings.catch_warnings():
        # torch warns once that sparse CSR support is in beta; the layout is what is asked for.
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.to_sparse_csr()
    crow, col = csr.crow_indices(), csr.col_indices()
    if max(crow.numel(), int(crow[-1]) if crow.numel() else 0, weight.shape[-1]) < 2**31:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    return torch.sparse_csr_tensor(
        crow, col, csr.values(), tuple(weight.shape), check_invariants=True
    )


def _csr_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    """``x @ weight.T + bias`` with a CSR ``weight``: computed as ``weight @ x.T``, the product
    torch's CSR kernels run fast (CSR times a dense matrix), then transposed back."""
    rows = x.reshape(-1, x.shape[-1])
    if bias is None:
        out = torch.mm(weight, rows.t())
    else:
        out = torch.addmm(bias.unsqueeze(1), weight, rows.t())
    return out.t().reshape(*x.shape[:-1], out_features)


class CSRLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a CSR tensor: what :func:`to_sparse` turns a Linear into.

    A subclass, because ``nn.Linear``'s own forward (``F.linear``) multiplies by the CSR weight
    no faster than by a dense one; this forward computes ``W @ x.T``, which torch's CSR kernels
    run fast. Importable, so ``torch.save(model)`` works; ``isinstance(m, nn.Linear)`` holds.
    """

    def forward(self, input: Tensor) -> Tensor:
        if self.weight.requires_grad:
            raise error(
                "CSRLinear",
                "its CSR weight is set to train, but a sparse weight is for inference: "
                "optimizers cannot step it.",
                fix="train the dense model (maskparam's Mask keeps the zeros), and call "
                "mp.to_sparse after baking; or weight.requires_grad_(False).",
            )
        return _csr_linear(input, self.weight, self.bias, self.out_features)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> CSRLinear:
        # torch's own conversion of a CSR Parameter (.to(float64), .half()) relabels its dtype
        # but leaves the values as they were: convert the parts and build the tensor again.
        weight = self._parameters["weight"]
        assert weight is not None  # set by to_sparse
        self._parameters["weight"] = None
        try:
            super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        finally:
            self._parameters["weight"] = weight
        values = fn(weight.values())
        crow = fn(weight.crow_indices())
        col = fn(weight.col_indices())
        rebuilt = torch.sparse_csr_tensor(
            crow, col, values, tuple(weight.shape), check_invariants=True
        )
        self._parameters["weight"] = nn.Parameter(rebuilt, requires_grad=weight.requires_grad)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CSRLinear:
        # A Parameter's deepcopy clones its data with preserve_format, which a CSR tensor (no
        # strided storage) refuses: the copy gets a clone of its parts instead.
        weight = self.weight
        if id(weight) not in memo:
            copied = torch.sparse_csr_tensor(
                weight.crow_indices().clone(),
                weight.col_indices().clone(),
                weight.values().clone(),
                tuple(weight.shape),
                check_invariants=True,
            )
            memo[id(weight)] = nn.Parameter(copied, requires_grad=False)
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return clone


def _make_csr(linear: nn.Linear) -> None:
    linear.weight = nn.Parameter(_csr(linear.weight.detach()), requires_grad=False)
    if linear.bias is not None:
        linear.bias.requires_grad_(False)
    linear.__class__ = CSRLinear


def sparse_bytes(tensor: Tensor) -> int:
    """Bytes of ``tensor``'s data: values and indices for a sparse CSR tensor."""
    if tensor.layout == torch.sparse_csr:
        parts = (tensor.values(), tensor.crow_indices(), tensor.col_indices())
        return sum(p.numel() * p.element_size() for p in parts)
    return math.prod(tensor.shape) * tensor.element_size()
