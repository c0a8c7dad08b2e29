"""Hypothesis strategies the property tests share (imported, not collected)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
SHAPES = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)
MATRIX_SHAPES = st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple)
DENSITIES = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
SEEDS = st.integers(0, 2**31 - 1)

#: Both layouts of the selection constraints: dense (bitwise kernels) and compact (free entries only).
LAYOUTS = st.sampled_from(["dense", "compact"])
