"""A compatibility name: whole-model pickles of models baked by maskparam 0.2 hold the load
guard's hook as ``maskparam._load_guard.check_checkpoint`` (baking now takes the hook off)."""

from __future__ import annotations

from maskparam.core.load_guard import check_checkpoint

__all__ = ["check_checkpoint"]
