"""Change masks while training: ``update_masks``, ``GradualPruning`` and ``rewind``."""
