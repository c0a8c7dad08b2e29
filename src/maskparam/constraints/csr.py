"""The CSR layout of a Mask on a Linear weight: the kept entries train without a dense weight.

``mp.Mask(mask, layout="csr")`` stores a weight as :mod:`~maskparam.constraints.compact` does
(the kept entries in row-major order, which is exactly the order of a CSR tensor's values), and
the module computes with them as a sparse matrix: the forward is ``W @ x.T`` with ``W`` in CSR,
the input's gradient ``W.T @ grad.T`` with the transposed structure (built once per mask), and
the weight's gradient ``torch.sparse.sampled_addmm`` at the kept entries only. A masked entry
does not exist, so it cannot train and costs nothing: at 90% zeros a step of an MLP costs about
half a dense one (benchmarks/results/sparse_training.md).

Only the module's own forward takes this path (maskparam's class for the module has it, like
an RNN's): anything that reads ``module.weight`` (``mp.verify``, a hook, a fused fast path,
baking) gets the dense effective weight, computed as the compact layout computes it. Where the
sparse path cannot run the call (autocast, torch.func / forward-mode AD / tracing / export, a
sparse input or one of another dtype or device, another parametrization stacked on the weight)
the forward computes densely from the same entries: the
same result up to float rounding for finite inputs. (An inf or NaN input value meets only the
kept entries in the sparse product; the dense product multiplies it by the masked zeros too,
and 0 * inf is NaN.)
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize
from typing_extensions import override

from maskparam.constraints.compact import CompactConstraint
from maskparam.core.parametrize import give_own_class
from maskparam.errors import error

__all__ = [
    "CSRConstraint",
    "CSRStructure",
    "check_csr_target",
    "conv1d_class",
    "csr_kernels_problem",
    "csr_linear",
    "csr_switch_problem",
    "switch_to_csr",
    "training_steps",
    "trains_as_csr",
]


def conv1d_class() -> type[nn.Module] | None:
    """``transformers``' Conv1D where transformers is imported (a model holding one imported it);
    never imported here: transformers is not a dependency."""
    module = sys.modules.get("transformers.pytorch_utils")
    found = getattr(module, "Conv1D", None)
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def _plain_class(module: nn.Module) -> type:
    """The module's class before torch's parametrize (and maskparam) gave it one of its own: the
    injected class's only base."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def check_csr_target(subject: str, module: nn.Module, local_name: str, n_specs: int) -> None:
    """Refuse ``layout="csr"`` on a tensor it cannot compute: only the ``weight`` of a module of
    exactly ``nn.Linear`` or ``transformers``' Conv1D (a subclass may read its weight elsewhere,
    as ``MultiheadAttention`` reads ``out_proj.weight``), as the tensor's only constraint (the
    sparse forward reads the stored entries, past anything stacked after them)."""
    cls = _plain_class(module)
    if local_name != "weight" or cls not in (nn.Linear, conv1d_class()):
        raise error(
            subject,
            f"layout='csr' computes a Linear's forward from its CSR weight; this is "
            f"{cls.__name__}.{local_name}.",
            fix="use layout='csr' on the weight of an nn.Linear (or transformers' Conv1D), and "
            "layout='compact' elsewhere.",
        )
    if n_specs != 1:
        raise error(
            subject,
            "layout='csr' computes the forward from the stored entries, so it must be the "
            f"only constraint on the tensor (this rule stacks {n_specs}).",
            fix="use layout='compact' to stack constraints.",
        )


def _kernels_run(device_type: str, dtype: torch.dtype) -> str | None:
    """torch's error where its CSR kernels (product, sampled product) do not run for ``dtype``
    on ``device_type``, else None: tried on a 2 x 2 matrix (at apply and in to_sparse, never in
    a forward), rather than a list of dtypes that torch's next release would outdate."""
    device = torch.device(device_type)
    try:
        values = torch.ones(2, dtype=dtype, device=device)
        crow = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
        col = torch.tensor([0, 1], dtype=torch.int32, device=device)
        dense = torch.ones(2, 2, dtype=dtype, device=device)
        matrix = _csr_tensor(crow, col, values, (2, 2))
        torch.mm(matrix, dense)
        torch.sparse.sampled_addmm(matrix, dense, dense, beta=0.0)
    except (RuntimeError, NotImplementedError) as failure:
        return str(failure).splitlines()[0]
    return None


def csr_kernels_problem(tensor: Tensor) -> str | None:
    """Why torch cannot train ``tensor``'s dtype as CSR on its device (None: it can)."""
    if not tensor.is_floating_point():
        return f"{tensor.dtype} is not a floating-point dtype"
    problem = _kernels_run(tensor.device.type, tensor.dtype)
    if problem is None:
        return None
    return f"torch has no CSR kernel for {tensor.dtype} on {tensor.device.type} ({problem})"


def _csr_tensor(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        # torch warns once that sparse CSR support is in beta; the layout is what is asked for.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


@dataclass(frozen=True)
class CSRStructure:
    """The CSR indices of a stored matrix ``S`` (the kept entries of a ``(rows, cols)`` tensor,
    row-major) and of its transpose: ``S.T``'s values are ``values[perm]``. Derived from the
    mask, once per mask; 32-bit indices where they fit (torch's CPU kernels run faster)."""

    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm: Tensor
    shape: tuple[int, int]

    @classmethod
    def of(cls, positions: Tensor, shape: tuple[int, int]) -> CSRStructure:
        """The structure of the kept entries at flat ``positions`` (ascending) of ``shape``."""
        rows_n, cols_n = shape
        small = max(rows_n, cols_n, positions.numel()) < 2**31
        dtype = torch.int32 if small else torch.int64
        rows = torch.div(positions, cols_n, rounding_mode="floor")
        cols = positions - rows * cols_n
        crow = positions.new_zeros(rows_n + 1)
        crow[1:] = torch.bincount(rows, minlength=rows_n).cumsum(0)
        perm = torch.sort(cols, stable=True).indices  # column-major order of the kept entries
        crow_t = positions.new_zeros(cols_n + 1)
        crow_t[1:] = torch.bincount(cols, minlength=cols_n).cumsum(0)
        return cls(
            crow.to(dtype), cols.to(dtype), crow_t.to(dtype), rows[perm].to(dtype), perm, shape
        )

    def matrix(self, values: Tensor) -> Tensor:
        """``S`` as a CSR tensor with ``values``."""
        return _csr_tensor(self.crow, self.col, values, self.shape)

    def transposed(self, values: Tensor) -> Tensor:
        """``S.T`` as a CSR tensor, from ``S``'s ``values``."""
        rows_n, cols_n = self.shape
        return _csr_tensor(
            self.crow_t, self.col_t, values.index_select(0, self.perm), (cols_n, rows_n)
        )


def _sparse_times_dense(matrix: Tensor, dense: Tensor) -> Tensor:
    """``matrix @ dense`` for a CSR ``matrix`` and a row-major ``dense``, written into a new
    tensor: ``torch.mm`` would zero a result and copy it into another first. ``beta=0`` makes
    the kernel ignore the new tensor's contents (NaN included), as ``torch.addmm`` documents."""
    out = dense.new_empty(matrix.shape[0], dense.shape[1])
    return torch.addmm(out, matrix, dense, beta=0.0, out=out)


class _CSRLinear(torch.autograd.Function):
    """``y = x @ A.T + bias`` where ``A`` is the stored matrix ``S`` (``nn.Linear``'s
    ``(out, in)`` weight) or, for ``stored_transposed``, ``S.T`` (``Conv1D``'s ``(in, out)``).

    Every product is CSR times a row-major dense matrix, the form torch's CPU kernels (MKL) take
    without copying: ``y.T = A @ x.T``, then ``x.grad.T = A.T @ grad.T`` through the other
    orientation of ``S``, and the values' gradient at the kept entries only
    (``sampled_addmm``). ``x.T`` and ``grad.T`` are made row-major once each and shared by the
    two products that read them (otherwise each product copies its own); the output and the
    input's gradient are contiguous, as ``nn.Linear``'s (a transposed gradient made the next
    elementwise backward, e.g. ReLU's, run a strided loop several times slower than the copy)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        values: Tensor,
        bias: Tensor | None,
        structure: CSRStructure,
        stored_transposed: bool,
    ) -> Tensor:
        x_t = x.t().contiguous()
        a = structure.transposed(values) if stored_transposed else structure.matrix(values)
        y_t = _sparse_times_dense(a, x_t)
        ctx.save_for_backward(x_t, values)
        ctx.structure = structure
        ctx.stored_transposed = stored_transposed
        ctx.has_bias = bias is not None
        if bias is None:
            return y_t.t().contiguous()
        # The bias added in the pass that lays the output out row-major (one pass, not two).
        return torch.add(y_t.t(), bias, out=x.new_empty(y_t.shape[::-1]))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a gradient of this gradient
            raise error(
                "Mask(layout='csr')",
                "the CSR layout computes first derivatives only; this backward was asked to "
                "build a graph for a second one (create_graph=True, e.g. a gradient penalty).",
                fix="use layout='compact' for the weights a second derivative passes through.",
            )
        if _transforming(grad):  # is_grads_batched, a vectorized jacobian: vmap over this
            raise error(
                "Mask(layout='csr')",
                "the CSR layout's backward does not run under vmap (batched gradients: "
                "is_grads_batched=True, jacobian(vectorize=True)).",
                fix="use layout='compact' for these weights, or compute the gradients one by one.",
            )
        x_t, values = ctx.saved_tensors
        structure: CSRStructure = ctx.structure
        g_t = grad.t().contiguous()
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            transposed = ctx.stored_transposed
            a_t = structure.matrix(values) if transposed else structure.transposed(values)
            grad_x = _sparse_times_dense(a_t, g_t).t().contiguous()
        if ctx.needs_input_grad[1]:
            # dS at S's kept entries: grad.T @ x for a Linear's S, x.T @ grad for a Conv1D's
            # (sampled_addmm reads its second factor transposed: x_t and g_t as they are).
            left, right = (x_t, g_t.t()) if ctx.stored_transposed else (g_t, x_t.t())
            # Zeros, not uninitialised memory: beta=0 does not cancel a NaN in the pattern.
            pattern = structure.matrix(values.new_zeros(values.shape))
            grad_values = torch.sparse.sampled_addmm(pattern, left, right, beta=0.0).values()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g_t.sum(1)
        return grad_x, grad_values, grad_bias, None, None


class CSRConstraint(CompactConstraint):
    """A compact Mask (the kept entries, row-major, are the stored Parameter) whose module
    computes with them as a CSR matrix (:data:`module_forward`). Its state_dict, optimizer state
    and update behaviour are the compact layout's; the structure is derived from the mask and
    rebuilt when it changes (``update_masks``, a load, a move to another device)."""

    @override
    def relayout(self, free: Tensor) -> None:
        return None  # asked for explicitly: a new mask keeps the CSR layout

    @override
    def in_other_layout(self, state: Any, shape: torch.Size) -> None:
        return None  # a dense checkpoint's entries are translated; the layout stays CSR

    def structure(self) -> CSRStructure:
        """The CSR structure of the current mask (derived again where the positions were)."""
        positions = self.positions()
        cached: tuple[Tensor, CSRStructure] | None = self.__dict__.get("_structure")
        if cached is not None and cached[0] is positions:
            return cached[1]
        rows_n, cols_n = self.shape
        structure = CSRStructure.of(positions, (rows_n, cols_n))
        self.__dict__["_structure"] = (positions, structure)
        return structure

    def runs(self, x: Tensor, stored: Tensor, bias: Tensor | None) -> bool:
        """Whether the sparse path computes ``x`` with ``stored`` (and ``bias``): a dense input
        of the same dtype and device (the bias too), no autocast (which would compute in
        another dtype), and a CSR kernel for the dtype. Elsewhere the module's own forward
        gives its own result or its own error."""
        return (
            not _transforming(x, stored)  # first: a tracer warns at the checks below
            and x.layout == torch.strided
            and (bias is None or (bias.dtype == stored.dtype and bias.device == stored.device))
            and x.dtype == stored.dtype
            and x.device == stored.device
            and x.dim() >= 1
            and x.numel() > 0
            and stored.numel() > 0
            and not torch.is_autocast_enabled(x.device.type)
            # The dtypes the build's probe (csr_kernels_problem) passes, read without it: a
            # model converted after apply (.half() on the CPU) computes densely.
            and (stored.dtype in (torch.float32, torch.float64) or stored.device.type != "cpu")
        )

    @classmethod
    def adopt(cls, compact: CompactConstraint) -> CSRConstraint:
        """Make a compact Mask (of a Linear weight: see :func:`csr_switch_problem`) this layout
        in place: its buffers, its stored entries and any optimizer's state for them are
        already the CSR layout's, so the same object changes class (everything that holds it,
        its stack and its state_dict keys stay). The module then needs its class again
        (``give_own_class``) for the sparse forward."""
        compact.__class__ = cls
        compact.description = compact.description.replace(", compact)", ", csr)")
        compact.template = compact.template.replace(", compact)", ", csr)")
        compact.auto_layout = False  # chosen for speed: a new mask keeps it
        assert isinstance(compact, cls)
        return compact

    @override
    def module_forward(self) -> Callable[..., Tensor]:
        forward: Callable[..., Tensor] = csr_forward
        return forward


def csr_linear(
    x: Tensor,
    values: Tensor,
    bias: Tensor | None,
    structure: CSRStructure,
    *,
    stored_transposed: bool,
) -> Tensor:
    """``x @ W.T + bias`` through the CSR path, where ``W`` is the Linear weight whose kept
    entries ``values`` stand at ``structure`` (a Conv1D's ``(in, out)`` weight:
    ``stored_transposed``). Differentiable in ``x``, ``values`` and ``bias``."""
    rows_n, cols_n = structure.shape
    in_features, out_features = (rows_n, cols_n) if stored_transposed else (cols_n, rows_n)
    if x.dim() == 0 or x.shape[-1] != in_features:
        n = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        got = f"{n}x{x.shape[-1]}" if x.dim() else "a 0-d tensor"
        # nn.Linear's words, not those of the transposed product computed here.
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied ({got} and {in_features}x{out_features})"
        )
    if values.shape != (structure.col.numel(),):
        # A CSR tensor is built without checks (a check per call would cost a pass): entries
        # that do not fit the mask would be read past their end.
        raise error(
            "Mask(layout='csr')",
            f"the stored entries are {tuple(values.shape)}, the mask keeps "
            f"{structure.col.numel()}: they do not fit.",
            fix="give the mask and its stored entries together (load_state_dict of both, or "
            "mp.update_masks).",
        )
    rows = x.reshape(-1, in_features)
    y = _CSRLinear.apply(rows, values, bias, structure, stored_transposed)  # type: ignore[no-untyped-call]
    return y.reshape(*x.shape[:-1], out_features)  # type: ignore[no-any-return]


def csr_switch_problem(module: nn.Module) -> str | None:
    """Why ``mp.to_sparse`` cannot switch ``module``'s weight to the CSR layout (None: it can):
    it must be an ``nn.Linear`` or Conv1D weight whose only parametrization is a compact Mask,
    of a dtype torch's CSR kernels train."""
    if _plain_class(module) not in (nn.Linear, conv1d_class()):
        return f"a {_plain_class(module).__name__}: its forward may read the weight elsewhere"
    if not parametrize.is_parametrized(module, "weight"):
        return "not masked: to_sparse keeps a constrained model's other weights as they are"
    stack = parametrize_list(module)
    first = stack[0]
    if not isinstance(first, CompactConstraint) or first.mask_for_free(first.free) is None:
        return "not a compact Mask: only the kept entries of a Mask can be CSR values"
    if len(stack) != 1:
        return "another parametrization is stacked on the Mask"
    return csr_kernels_problem(stack.original)


def trains_as_csr(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored in the CSR layout."""
    if not parametrize.is_parametrized(module, "weight"):
        return False
    return isinstance(parametrize_list(module)[0], CSRConstraint)


def switch_to_csr(module: nn.Module) -> None:
    """Switch ``module``'s compact Mask to the CSR layout, in place (where
    :func:`csr_switch_problem` found nothing against it): the constraint object, its stored
    entries and their optimizer state stay; the module gets its class again, with the sparse
    forward."""
    first = parametrize_list(module)[0]
    assert isinstance(first, CompactConstraint)  # csr_switch_problem checked it
    CSRConstraint.adopt(first)
    give_own_class(module)


def training_steps(
    module: nn.Module, batch_size: int
) -> tuple[Callable[[], object], Callable[[], object]]:
    """A training step of ``module`` (forward and backward, to its kept entries and its input)
    in its compact layout and in the CSR layout, on copies of its entries: its gradients stay.
    What :func:`maskparam.to_sparse` times to choose."""
    stack = parametrize_list(module)
    compact, stored = stack[0], stack.original
    assert isinstance(compact, CompactConstraint)  # csr_switch_problem checked it
    values = stored.detach().clone().requires_grad_()
    raw_bias = getattr(module, "bias", None)
    bias = raw_bias.detach() if isinstance(raw_bias, Tensor) else None
    rows_n, cols_n = compact.shape
    linear = isinstance(module, nn.Linear)
    generator = torch.Generator(device=stored.device).manual_seed(0)  # the caller's RNG untouched
    x = torch.randn(
        batch_size,
        cols_n if linear else rows_n,
        dtype=stored.dtype,
        device=stored.device,
        generator=generator,
    ).requires_grad_()
    structure = CSRStructure.of(compact.positions(), (rows_n, cols_n))

    def compact_step() -> object:
        weight = compact(values)
        if linear:
            y = nn.functional.linear(x, weight, bias)
        else:  # Conv1D: x @ W + b
            y = x @ weight if bias is None else torch.addmm(bias, x, weight)
        return torch.autograd.grad(y.sum(), (values, x))

    def csr_step() -> object:
        y = csr_linear(x, values, bias, structure, stored_transposed=not linear)
        return torch.autograd.grad(y.sum(), (values, x))

    return compact_step, csr_step


def parametrize_list(module: nn.Module) -> parametrize.ParametrizationList:
    plists: Any = module.parametrizations
    return plists["weight"]  # type: ignore[no-any-return]


def _transforming(*tensors: Tensor) -> bool:
    """Whether a transform that the sparse product does not support sees the call: forward-mode
    AD, ``torch.func`` (vmap, grad, jacrev), ``torch.jit.trace`` or ``torch.export``; the dense
    path, which they all support, computes it."""
    if torch._C._get_tracing_state() is not None or torch.compiler.is_exporting():
        return True
    if forward_ad._current_level >= 0:  # inside fwAD.dual_level(): the inputs may be duals
        return True
    functorch = torch._C._functorch
    return any(
        functorch.is_functorch_wrapped_tensor(t)
        or functorch.is_batchedtensor(t)
        or functorch.is_legacy_batchedtensor(t)  # is_grads_batched's vmap
        for t in tensors
    )


def _csr_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
    """The forward of a Linear (or Conv1D) whose weight is stored as CSR: the sparse product
    where it can run the call, the module's own dense forward (same entries) elsewhere."""
    dense_forward: Callable[..., Tensor] = super(type(self), self).forward  # type: ignore[misc]
    if len(args) + len(kwargs) != 1:
        return dense_forward(*args, **kwargs)  # its own error for a wrong call
    input = args[0] if args else next(iter(kwargs.values()))
    if not isinstance(input, Tensor):
        return dense_forward(*args, **kwargs)
    stack = parametrize_list(self)
    first = stack[0]
    stored = stack.original
    raw_bias = self.bias
    bias = raw_bias if isinstance(raw_bias, Tensor) else None
    if len(stack) == 1 and isinstance(first, CSRConstraint) and first.runs(input, stored, bias):
        return csr_linear(
            input,
            stored,
            bias,
            first.structure(),
            stored_transposed=not isinstance(self, nn.Linear),
        )
    return dense_forward(*args, **kwargs)


#: :func:`_csr_forward` as the module's forward; dynamo does not trace sparse tensors, so under
#: ``torch.compile`` it runs eagerly, in one piece (a graph break).
csr_forward = cast(Callable[..., Tensor], torch.compiler.disable(_csr_forward))  # type: ignore[no-untyped-call]
csr_forward.maskparam_forward = True  # type: ignore[attr-defined]  # give_own_class replaces it
