"""Save and load: ``load_state_dict`` (plain or constrained on either side), optimizer state
keyed by tensor names, and ``trainable_state_dict``."""
