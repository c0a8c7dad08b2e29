"""Discovery: every tensor of a model, under the names a user sees (``fc.weight``, not
``fc.parametrizations.weight.original``), with shared modules and tied weights recognised."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parametrize

from maskparam.core.parametrize import (
    maskparam_constraints,
    parametrization_list,
    parametrized_names,
)
from maskparam.errors import error

__all__ = ["TensorRef", "find_tensors", "refuse_sparse"]


def _first_original(plist: parametrize.ParametrizationList) -> Tensor:
    return plist.original if plist.is_tensor else cast(Tensor, plist.original0)


@dataclass(eq=False)
class TensorRef:
    """One tensor slot of a model: ``module.<local_name>``, reachable as ``names``."""

    names: list[str]
    module: nn.Module
    local_name: str
    is_parameter: bool
    # Other modules holding the same tensor object (tied weights): (qualified name, module, local).
    tied: list[tuple[str, nn.Module, str]] = field(default_factory=list)
    # Other local names of the same tensor in the same module (``m.b = m.a``).
    local_aliases: list[str] = field(default_factory=list)

    @property
    def tied_names(self) -> list[str]:
        return [name for name, _, _ in self.tied]

    @property
    def all_names(self) -> list[str]:
        """Every name the tensor is known by: aliases and tied slots included."""
        return [*self.names, *self.tied_names]

    @property
    def holders(self) -> list[tuple[nn.Module, str]]:
        """Every (module, local name) that holds the tensor: itself first, then tied ones."""
        return [(self.module, self.local_name), *((m, local) for _, m, local in self.tied)]

    @property
    def name(self) -> str:
        """The first qualified name under which the tensor was found."""
        return self.names[0]

    @property
    def is_parametrized(self) -> bool:
        return parametrize.is_parametrized(self.module, self.local_name)

    @property
    def parametrizations(self) -> list[nn.Module]:
        if not self.is_parametrized:
            return []
        return list(parametrization_list(self.module, self.local_name))

    @property
    def has_constraint(self) -> bool:
        """Whether maskparam already constrains this tensor."""
        return bool(maskparam_constraints(self.module, self.local_name))

    @property
    def storage(self) -> Tensor:
        """The stored tensor: the tensor itself, or the (first) original of a parametrized one."""
        if not self.is_parametrized:
            return getattr(self.module, self.local_name)  # type: ignore[no-any-return]
        return _first_original(parametrization_list(self.module, self.local_name))

    @cached_property
    def value(self) -> Tensor:
        """The tensor as the module's forward sees it (evaluates parametrizations, no grad)."""
        with torch.no_grad():
            return getattr(self.module, self.local_name)  # type: ignore[no-any-return]

    @property
    def dtype(self) -> torch.dtype:
        # Registered parametrizations may not change the dtype (unless unsafe), so the stored
        # tensor's dtype is the effective one without evaluating anything.
        return self.storage.dtype

    @property
    def not_a_weight(self) -> str | None:
        """Why a wildcard passes over this tensor although it could be constrained, or None.

        A wildcard selects what a user means by "the model's weights": parameters that train.
        Buffers (RoPE's ``inv_freq``, a user's statistics) and frozen parameters (Whisper's
        sinusoidal positions) are constrained only when a rule names them exactly.
        """
        if not self.is_parameter:
            return "is a buffer, not a trainable parameter"
        if not self.has_constraint and not self.storage.requires_grad:
            return "is a frozen parameter (requires_grad=False)"
        return None

    @property
    def unconstrainable(self) -> str | None:
        """Why this tensor can never be constrained, or None."""
        if self.storage.layout != torch.strided:
            return (
                f"is stored {str(self.storage.layout).removeprefix('torch.')} (mp.to_sparse): "
                "constraints work on the dense model, before to_sparse"
            )
        if not (self.dtype.is_floating_point or self.dtype.is_complex):
            return f"has dtype {self.dtype}; only floating-point and complex tensors can be constrained"
        if isinstance(self.module, _NormBase) and self.local_name in (
            "running_mean",
            "running_var",
        ):
            return (
                f"is a running statistic that {type(self.module).__name__} updates in place: a "
                "parametrized buffer would silently stop updating"
            )
        if (
            not self.is_parameter
            and not self.is_parametrized
            and self.local_name in self.module._non_persistent_buffers_set
        ):
            return (
                "is a non-persistent buffer (derived, not saved): torch's parametrize would save "
                "it, and baking would leave it in the state_dict"
            )
        return None


def find_tensors(model: nn.Module) -> list[TensorRef]:
    """Every parameter, buffer and parametrized tensor of ``model``, in registration order."""
    refs: list[TensorRef] = []
    by_tensor: dict[int, TensorRef] = {}
    visiting: set[int] = set()

    def add(module: nn.Module, prefix: str, local: str, tensor: Tensor, is_param: bool) -> None:
        qualified = prefix + local
        ref = by_tensor.get(id(tensor))
        if ref is None:
            ref = TensorRef([qualified], module, local, is_param)
            by_tensor[id(tensor)] = ref
            refs.append(ref)
        elif ref.module is module:
            ref.names.append(qualified)  # the same module reached by another path
            if local != ref.local_name and local not in ref.local_aliases:
                ref.local_aliases.append(local)
        else:
            ref.tied.append((qualified, module, local))

    def visit(module: nn.Module, prefix: str) -> None:
        if id(module) in visiting:  # a module that contains itself: nothing new below
            return
        visiting.add(id(module))
        parametrized = parametrized_names(module)
        for local, param in module._parameters.items():
            if param is not None:
                add(module, prefix, local, param, is_param=True)
        for local, buffer in module._buffers.items():
            if buffer is not None:
                add(module, prefix, local, buffer, is_param=False)
        for local in parametrized:
            original = _first_original(parametrization_list(module, local))
            add(module, prefix, local, original, is_param=isinstance(original, nn.Parameter))
        for child_name, child in module._modules.items():
            # A parametrized module's "parametrizations" holds the originals and our masks:
            # implementation detail, never a target.
            if child is not None and not (parametrized and child_name == "parametrizations"):
                visit(child, f"{prefix}{child_name}.")
        visiting.discard(id(module))

    visit(model, "")
    return refs


def refuse_sparse(model: nn.Module, caller: str) -> None:
    """Refuse, naming the tensor, a model that :func:`to_sparse` converted: ``caller`` works on
    the dense tensors of a model that trains."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.layout != torch.strided:
            raise error(
                f"{caller} ({name!r})",
                f"the tensor is stored {str(tensor.layout).removeprefix('torch.')} by mp.to_sparse: "
                "a converted model is for inference.",
                fix=f"call {caller} on the dense model (before to_sparse), or save this one with "
                "model.state_dict().",
            )
