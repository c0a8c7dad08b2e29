"""Where :class:`CSRLinear` lived in 0.2: pickles of ``to_sparse`` models name this module."""

from __future__ import annotations

from maskparam.export.sparse import CSRLinear

__all__ = ["CSRLinear"]
