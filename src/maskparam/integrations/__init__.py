"""Callbacks for the trainers people use, one module per framework. Each imports its framework
when it is imported itself (``import maskparam`` never does), and needs its extra installed:

* :mod:`maskparam.integrations.transformers` (``pip install maskparam[transformers]``): a
  ``transformers.TrainerCallback`` that drives a :class:`~maskparam.GradualPruning`;
* :mod:`maskparam.integrations.lightning` (``pip install maskparam[lightning]``): Lightning
  callbacks, the same schedule driver and ``ModelPruning``, the counterpart of Lightning's own
  whose masks are maskparam ``Mask`` constraints (exact zeros, saved in every checkpoint).

The schedule's progress itself lives in the model's state_dict, so a checkpoint written by either
framework resumes it (see docs/trainers.md).
"""
