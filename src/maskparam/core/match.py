"""Selectors: which tensors a rule targets. Pure functions of the selector and a tensor's names.

A selector is one of

* a ``str``: a glob on the whole qualified tensor name (``fnmatch`` rules, case-sensitive;
  ``*`` also crosses dots, so ``"*.weight"`` is every submodule's tensor named exactly
  ``weight``, but not an RNN's ``lstm.weight_ih_l0`` nor ``attn.in_proj_weight``: ``"*weight*"``
  is); a name without wildcards matches itself. A glob that misses tensors only by a suffix or a
  dot (``"*.weight"`` and ``weight_ih_l0``) lists them among the tensors it passes over, with the
  selector that would take them;
* a compiled ``re.Pattern``: full-matched against the qualified name;
* a ``(module_type, tensor_glob)`` tuple: tensors of modules that are instances of
  ``module_type`` (a type or a tuple of types) whose *local* name matches ``tensor_glob``;
* a predicate ``(name, module, tensor) -> bool``.

>>> import re, torch
>>> matches("encoder.*.weight", ["encoder.0.weight"], torch.nn.Linear(1, 1), torch.empty(0))
True
>>> matches(re.compile(r"fc\\d\\.bias"), ["fc1.bias"], torch.nn.Linear(1, 1), torch.empty(0))
True
>>> matches((torch.nn.Conv2d, "weight"), ["c.weight"], torch.nn.Linear(1, 1), torch.empty(0))
False
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from torch import Tensor, nn
from torch import bool as torch_bool

from maskparam.core.tensors import TensorRef, find_tensors
from maskparam.errors import MaskparamError, error

__all__ = [
    "Match",
    "Selector",
    "TensorIndex",
    "check_selector",
    "describe",
    "is_exact_name",
    "match_rule",
    "matches",
    "no_match_error",
]

Selector: TypeAlias = (
    str
    | re.Pattern[str]
    | tuple[type[nn.Module] | tuple[type[nn.Module], ...], str]
    | Callable[[str, nn.Module, Tensor], bool]
)

_GLOB_CHARS = frozenset("*?[")


def is_exact_name(selector: object) -> bool:
    """A string without glob characters: it names one tensor, and naming a wrong one is an error."""
    return isinstance(selector, str) and not _GLOB_CHARS.intersection(selector)


def _is_module_types(candidate: object) -> bool:
    if isinstance(candidate, tuple):
        return len(candidate) > 0 and all(_is_module_types(c) for c in candidate)
    return isinstance(candidate, type) and issubclass(candidate, nn.Module)


def check_selector(selector: object) -> None:
    """Raise a clear error for anything that is not one of the selector kinds above."""
    if isinstance(selector, re.Pattern) and not isinstance(selector.pattern, str):
        raise error(
            f"selector {selector!r}",
            "a regex selector must be compiled from a str (tensor names are str), not bytes.",
            fix="compile the pattern from a str, e.g. re.compile(r'fc\\d\\.weight').",
        )
    if isinstance(selector, (str, re.Pattern)):
        return
    if isinstance(selector, tuple):
        if len(selector) == 2 and _is_module_types(selector[0]) and isinstance(selector[1], str):
            return
        raise error(
            f"selector {selector!r}",
            "a tuple selector must be (module type, tensor name glob).",
            fix="write e.g. (torch.nn.Conv2d, 'weight').",
        )
    if _is_module_types(selector):
        raise error(
            f"selector {describe(selector)}",
            "a module type alone does not say which of its tensors to constrain.",
            fix=f"write ({describe(selector)}, 'weight'), or ({describe(selector)}, '*') for all.",
        )
    if callable(selector):
        return
    raise error(
        f"selector {selector!r}",
        f"a selector cannot be a {type(selector).__name__}.",
        fix="use a glob str, a compiled re.Pattern, a (module type, tensor glob) tuple "
        "or a predicate (name, module, tensor) -> bool.",
    )


def matches(selector: Selector, names: Sequence[str], module: nn.Module, tensor: Tensor) -> bool:
    """Whether ``selector`` selects the tensor known as ``names`` (a tensor may have aliases)."""
    if isinstance(selector, str):
        return any(fnmatch.fnmatchcase(name, selector) for name in names)
    if isinstance(selector, re.Pattern):
        return any(selector.fullmatch(name) is not None for name in names)
    if isinstance(selector, tuple):
        module_types, tensor_glob = selector
        local = names[0].rsplit(".", 1)[-1]
        return isinstance(module, module_types) and fnmatch.fnmatchcase(local, tensor_glob)
    results = [_as_bool(selector(name, module, tensor)) for name in names]
    for result in results:
        if not isinstance(result, bool):
            raise error(
                f"selector {describe(selector)}",
                f"the predicate returned {result!r} ({type(result).__name__}) for {names[0]!r}; "
                "only True or False can select (a truthy value would select by accident).",
                fix="return a bool, e.g. bool(...) of your condition.",
            )
    return any(results)


def _as_bool(result: object) -> object:
    """A one-element bool tensor (``t.sum() != 0``) is a bool; anything else stays as it is."""
    if isinstance(result, Tensor) and result.dtype == torch_bool and result.numel() == 1:
        return bool(result)
    return result


def describe(selector: Any) -> str:
    """A short, readable form of a selector for messages and summaries."""
    if isinstance(selector, str):
        return repr(selector)
    if isinstance(selector, re.Pattern):
        return f"re.compile({selector.pattern!r})"
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, tuple):
        return f"({', '.join(describe(part) for part in selector)})"
    return getattr(selector, "__qualname__", None) or repr(selector)


def is_predicate(selector: object) -> bool:
    """A callable selector, which looks at values (the others only at names and modules)."""
    return callable(selector) and not isinstance(selector, (str, re.Pattern, tuple))


class TensorIndex:
    """Every tensor of a model, found once, with a lookup by any of its names: what each rule
    of one call is matched against."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.refs = find_tensors(model)
        self.by_name = {name: ref for ref in self.refs for name in ref.all_names}


@dataclass
class Match:
    """What one rule matched: ``targets``, the tensors it constrains, and ``passed_over``, those
    it selects but a wildcard passes over, with the reason, then the ``near_misses``: weights a
    glob misses only by a suffix or a dot (``"*.weight"`` and an RNN's ``weight_ih_l0``), with
    the selector that would take them."""

    selector: Selector
    targets: list[TensorRef]
    skipped: list[tuple[TensorRef, str]]
    near_misses: list[tuple[TensorRef, str]] = field(default_factory=list)

    @property
    def passed_over(self) -> list[tuple[TensorRef, str]]:
        return [*self.skipped, *self.near_misses]

    @property
    def exact(self) -> bool:
        return is_exact_name(self.selector)


def match_rule(selector: Selector, index: TensorIndex) -> Match:
    """The one rule matcher (``apply_mask``, ``preview``, ``update_masks``, ``GradualPruning``).

    An exact name is a dict lookup (thousands of exact rules stay linear) and constrains the
    tensor it names whatever it is, or is refused when the tensor can never be constrained
    (an integer buffer). A wildcard passes over tensors that cannot be constrained and over
    what is not a weight (buffers, frozen parameters); a predicate decides the latter itself.
    """
    check_selector(selector)
    exact = is_exact_name(selector)
    if exact:
        found = index.by_name.get(selector) if isinstance(selector, str) else None
        selected = [found] if found is not None else []
    else:
        selected = [ref for ref in index.refs if _selects(selector, ref)]
    targets: list[TensorRef] = []
    passed_over: list[tuple[TensorRef, str]] = []
    for ref in selected:
        why = ref.unconstrainable
        if why is None and not (exact or is_predicate(selector)):
            why = ref.not_a_weight
        if why is None:
            targets.append(ref)
        else:
            passed_over.append((ref, why))
    if exact and passed_over:
        ref, why = passed_over[0]
        raise error(
            f"rule {describe(selector)}",
            f"the tensor {ref.name!r} {why}.",
            fix="remove this rule (wildcards pass over such tensors).",
        )
    near = near_misses(selector, index, {id(ref) for ref in selected}) if not exact else []
    return Match(selector, targets, passed_over, near)


def _near_globs(glob: str) -> list[str]:
    """Globs a user may have meant by ``glob``: the name going on (``weight_ih_l0``, past
    ``"*.weight"``), and without the dot of ``"*."`` (``in_proj_weight``, a top-level ``weight``)."""
    bases = [glob]
    if glob.startswith("*."):
        bases += [glob[2:], "*" + glob[2:]]
    return [g for base in bases for g in (base, base + "*") if g != glob]


def near_misses(
    selector: Selector, index: TensorIndex, selected: set[int]
) -> list[tuple[TensorRef, str]]:
    """The weights a str glob does not select but would by going on past its end or without
    its leading dot, each with the reason and the selector that would take it."""
    if not isinstance(selector, str) or is_exact_name(selector):
        return []
    globs = _near_globs(selector)
    found = []
    for ref in index.refs:
        if id(ref) in selected or ref.unconstrainable is not None or ref.not_a_weight is not None:
            continue
        glob = next((g for g in globs for n in ref.all_names if fnmatch.fnmatchcase(n, g)), None)
        if glob is None:
            continue
        local = ref.local_name
        if isinstance(ref.module, nn.RNNBase) and local.startswith("weight_"):
            take = "'*weight*' or (torch.nn.RNNBase, 'weight_*')"
            what = f"an RNN's weights are named weight_ih_l<k> and weight_hh_l<k> ({local!r})"
        else:
            take = repr(glob if not is_exact_name(glob) else ref.name)
            what = f"its name is {ref.name!r}"
        why = f"is not selected: {describe(selector)} matches whole names, and {what}; "
        found.append((ref, why + f"select it with {take}"))
    return found


def _selects(selector: Selector, ref: TensorRef) -> bool:
    # Only a predicate looks at values; the others must not evaluate parametrizations.
    predicate = is_predicate(selector)
    tensor = ref.value if predicate else ref.storage
    try:
        return matches(selector, ref.all_names, ref.module, tensor)
    except Exception as failure:
        if not predicate:
            raise
        raise error(
            f"rule {describe(selector)}",
            f"the predicate raised {type(failure).__name__} for tensor {ref.name!r}: {failure}",
            fix="make the predicate return a bool for every (name, module, tensor).",
        ) from failure


def no_match_error(index: TensorIndex, selector: Selector, *, skipped: int) -> MaskparamError:
    """The error for a rule that matched nothing: the closest names, and what it passed over."""
    names = [name for ref in index.refs if ref.unconstrainable is None for name in ref.names]
    details = []
    if isinstance(selector, str):
        close = difflib.get_close_matches(selector, names, n=3, cutoff=0.4)
        if close:
            details.append(f"closest tensor names: {', '.join(map(repr, close))}")
    if not details:
        details.append(
            f"tensor names: {', '.join(map(repr, names[:8]))}{', ...' if len(names) > 8 else ''}"
        )
    near = near_misses(selector, index, set())
    if near:
        shown = ", ".join(repr(ref.name) for ref, _ in near[:4]) + (
            ", ..." if len(near) > 4 else ""
        )
        details.append(f"it misses {len(near)} weight(s) by a suffix or a dot: {shown}")
        details.append(f"{near[0][0].name!r} {near[0][1]}")
        skipped = max(skipped - len(near), 0)  # the count apply gives holds them (passed_over)
    if skipped:
        details.append(
            f"it matched {skipped} tensor(s) that wildcards pass over (buffers, frozen parameters, "
            "integer or bool tensors, running statistics); name one exactly to constrain it"
        )
    return error(
        f"rule {describe(selector)}",
        f"matched no floating-point tensor in {type(index.model).__name__}.",
        *details,
        fix="correct the selector, or pass strict=False to allow rules that match nothing.",
    )
