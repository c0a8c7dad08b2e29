"""A compatibility name: pickled ``to_sparse`` models refer to ``maskparam._sparse.CSRLinear``."""

from __future__ import annotations

from maskparam.export.sparse import CSRLinear

__all__ = ["CSRLinear"]
