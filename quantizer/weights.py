"""Weights in bounded memory: block iteration and the symmetric per-channel weight grid.

Why blocks: a real model's weights (SmolLM2's embedding is 113 MB, larger models' GBs) are read
memory-mapped from external data and transformed or quantized a block of rows or columns at a
time, so neither the rotation nor the quantizer holds a whole float copy of a large weight.

The weight grid: per output channel (axis 1 of ``[in, out]``), symmetric, zero point 0, codes
``clip(round_half_even(W / scale), -qmax, qmax)`` with ``scale = max|W[:, c]| / qmax``
(``ttfsc.ttfs.grid_codes``; qmax = 127 at 8 bits, 7 at 4 bits, config.WEIGHT_BITS).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ttfsc.errors import TtfscError
from ttfsc.ttfs import grid_codes

BLOCK_BYTES = 64 << 20  # float32 bytes of a weight processed at once


def row_blocks(w: np.ndarray) -> Iterator[slice]:
    """Slices of whole rows of ``w`` [rows, cols], each at most BLOCK_BYTES of float32."""
    rows = max(1, BLOCK_BYTES // max(1, w.shape[1] * 4))
    return (slice(r, r + rows) for r in range(0, w.shape[0], rows))


def col_blocks(w: np.ndarray) -> Iterator[slice]:
    """Slices of whole columns of ``w`` [rows, cols], each at most BLOCK_BYTES of float32."""
    cols = max(1, BLOCK_BYTES // max(1, w.shape[0] * 4))
    return (slice(c, c + cols) for c in range(0, w.shape[1], cols))


def weight_scales(w: np.ndarray, qmax: int, name: str) -> np.ndarray:
    """Per-output-channel scale max|W[:, c]| / qmax (1.0 for an all-zero column: codes are 0 anyway)."""
    amax = np.zeros(w.shape[1], dtype=np.float32)
    for r in row_blocks(w):
        block = np.asarray(w[r], dtype=np.float32)
        if not np.all(np.isfinite(block)):
            raise TtfscError(f"weight {name}: contains inf/NaN; the checkpoint is corrupt, re-export it.")
        amax = np.maximum(amax, np.abs(block).max(axis=0))
    scale = amax / np.float32(qmax)
    scale[scale == 0] = 1.0
    return scale.astype(np.float32)


def weight_codes(block: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Symmetric codes round-half-even(W / scale) in [-qmax, qmax], int8."""
    return grid_codes(block, scale, 0, -qmax, qmax).astype(np.int8)
