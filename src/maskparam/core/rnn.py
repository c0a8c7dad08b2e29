"""``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with constrained weights (pytorch issue 65688).

An ``RNNBase`` does not read its weights by attribute: it computes with ``self._flat_weights``,
a list filled at construction and by ``_apply``. A parametrized weight is a property that
computes a new tensor on every read, so the list must be rebuilt before every forward.
torch's own ``_update_flat_weights`` notices the change, but only by evaluating every
parametrization twice to compare it (``hasattr`` + ``getattr``) and twice more to rebuild, and
it leaves the computed tensors, with their autograd graph, in ``_flat_weights``, where
``copy.deepcopy`` (``AveragedModel``) refuses them. So maskparam's class for a constrained RNN
(see ``give_own_class``) replaces three methods:

* ``_update_flat_weights``, the first thing ``RNN/LSTM/GRU.forward`` does: rebuild the list,
  one evaluation per constrained weight (this is the hot path: nothing else);
* ``flatten_parameters``: a no-op. On CUDA, cuDNN's flattening copies the weights into one
  buffer and points each tensor at its slice; a computed weight is a fresh tensor every forward
  and cannot live there, so the module runs non-flattened (cuDNN copies the weights per call,
  and torch may warn once that they are "not part of single contiguous chunk of memory").
  On CPU flattening does nothing anyway;
* ``__deepcopy__``: the copy gets ``_flat_weights`` rebuilt from its own tensors.

Baking gives the module back its class (torch restores it) and points ``_flat_weights`` at the
baked Parameters again (:func:`reset_flat_weights`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from maskparam.core.constraint import Constraint

__all__ = ["constrains_flat_weights", "refresh_flat_weights", "reset_flat_weights", "rnn_methods"]


def constrains_flat_weights(module: nn.Module) -> bool:
    """Whether ``module`` is an RNN one of whose flat weights maskparam constrains."""
    if not isinstance(module, nn.RNNBase) or not parametrize.is_parametrized(module):
        return False
    plists = cast(nn.ModuleDict, module.parametrizations)
    return any(
        name in plists and any(isinstance(p, Constraint) for p in cast(nn.ModuleList, plists[name]))
        for name in module._flat_weights_names
    )


def refresh_flat_weights(module: nn.RNNBase) -> None:
    """Point ``_flat_weights`` at the tensors the module has now (constrained ones computed).

    ``getattr(module, name, None)``, not torch's ``hasattr`` then ``getattr``: each evaluates a
    parametrization. The weak references torch keeps to compare are not rebuilt: only its
    ``_update_flat_weights``, which this replaces, reads them.
    """
    module._flat_weights = [getattr(module, name, None) for name in module._flat_weights_names]


def _keep_unflattened(self: nn.RNNBase) -> None:
    """No cuDNN flattening while a weight is computed: see the module docstring."""


def _deepcopying(inner: Callable[[Any, dict[int, Any]], Any]) -> Callable[[Any, Any], Any]:
    def __deepcopy__(self: nn.RNNBase, memo: dict[int, Any]) -> Any:
        flat = self.__dict__.get("_flat_weights")
        if flat is not None and id(flat) not in memo:
            # After a forward the list holds computed tensors with their graph, which deepcopy
            # refuses; the copy rebuilds it from its own tensors instead.
            memo[id(flat)] = [None] * len(flat)
        replica = inner(self, memo)
        if flat is not None and isinstance(replica, nn.RNNBase):
            with torch.no_grad():
                refresh_flat_weights(replica)
        return replica

    __deepcopy__.__wrapped__ = inner  # type: ignore[attr-defined]  # undone by rnn_methods
    return __deepcopy__


def rnn_methods(module: nn.Module, namespace: dict[str, Any], bases: tuple[type, ...]) -> None:
    """Put maskparam's RNN methods in the ``namespace`` of a new class for ``module`` while it
    constrains a flat weight; take them out again once it does not (a user's parametrization
    may keep the class after maskparam's are baked)."""
    deepcopy = namespace.pop("__deepcopy__", None)
    inner = getattr(deepcopy, "__wrapped__", deepcopy)  # torch's default_deepcopy, if it added one
    if inner is not None:
        namespace["__deepcopy__"] = inner
    for name in ("_update_flat_weights", "flatten_parameters"):
        if namespace.get(name) in (_update_flat_weights, _keep_unflattened):
            del namespace[name]
    if not constrains_flat_weights(module):
        return
    namespace["_update_flat_weights"] = _update_flat_weights
    namespace["flatten_parameters"] = _keep_unflattened
    if inner is None:  # the module's own class defines __deepcopy__, so torch added none
        inner = next(b.__deepcopy__ for b in bases if hasattr(b, "__deepcopy__"))
    namespace["__deepcopy__"] = _deepcopying(inner)


def _update_flat_weights(self: nn.RNNBase) -> None:
    refresh_flat_weights(self)


def reset_flat_weights(module: nn.Module) -> None:
    """torch's own ``_init_flat_weights`` after an apply or a removal, without autograd: the list
    (and torch's weak references to compare) then hold the module's tensors as they are now,
    the baked Parameters themselves once the constraints are gone (and, on CUDA, flattened
    again by a plain module)."""
    if isinstance(module, nn.RNNBase):
        with torch.no_grad():
            module._init_flat_weights()
