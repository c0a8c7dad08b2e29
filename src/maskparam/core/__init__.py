"""What every stage stands on: the :class:`~maskparam.core.constraint.Constraint` and
:class:`~maskparam.core.constraint.Spec` base classes, tensor discovery and rule matching, the
compact layout's positions, optimizer state moves, atomic loads, and the workarounds for
``torch.nn.utils.parametrize`` internals. Nothing here names a concrete constraint.
"""
