"""Gated table neurons (softmax's exp behind a proven two-valued mask) at windows above 256.

Spike times of such windows are uint16, for which onnxruntime's CPU ``Where`` has no kernel; the
lowering must gate on the int64 table index instead (found compiling a stories260K ``--full
--abits 8`` twin, whose exp stage has 1024 levels: the spiking model failed to open).
"""
from __future__ import annotations

import numpy as np
import pytest

from test_full_passes import assert_gated_exp


@pytest.mark.parametrize("bits", [9, 10, 12])
def test_gated_exp_table_above_256_levels(bits):
    """The gated table runs in onnxruntime, equals the QANN, and masked positions fire at gate_time."""
    assert assert_gated_exp(bits).dtype == np.uint16
