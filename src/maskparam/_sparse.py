"""A compatibility name: pickled ``to_sparse`` models refer to ``maskparam._sparse.CSRLinear`` and
``maskparam._sparse.SparseChoice`` (where they were defined before ``export/``)."""

from __future__ import annotations

from maskparam.export.sparse import CSRLinear, SparseChoice

__all__ = ["CSRLinear", "SparseChoice"]
