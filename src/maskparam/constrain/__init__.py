"""Attach and remove constraints, and read them back: ``apply_mask``, ``preview``,
``remove_parametrizations``, ``verify``, ``summary``, the accessors and DDP's constant buffers."""
