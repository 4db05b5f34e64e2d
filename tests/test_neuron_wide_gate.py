"""Gated table neurons (softmax's exp behind a proven two-valued mask) at windows above 256.

Spike times of such windows are uint16, for which onnxruntime's CPU ``Where`` has no kernel; the
lowering must gate on the int64 table index instead (found compiling a stories260K ``--full
--abits 8`` twin, whose exp stage has 1024 levels: the spiking model failed to open).
"""
from __future__ import annotations

import numpy as np
import onnx.helper as h
import pytest

from test_full_passes import Builder, _exp_gated, _out_stage, assert_bit_exact, compile_full, neurons
from ttfsc.neuron import NeuronSpec
from ttfsc.runtime.session import open_session


@pytest.mark.parametrize("bits", [9, 10, 12])
def test_gated_exp_table_above_256_levels(bits):
    """The gated table runs in onnxruntime, equals the QANN, and masked positions fire at gate_time."""
    b = Builder(bits, seed=bits)
    out = _out_stage(b, _exp_gated(b))
    qann = b.model([out])
    snn, _ = compile_full(qann, 1 << bits)
    (node,) = neurons(snn)
    spec = NeuronSpec.from_node(node)
    assert len(spec.table) == 1 << bits and spec.gate_time >= 0
    assert_bit_exact(qann, snn, b.feeds, out)
    snn.graph.output.append(h.make_empty_tensor_value_info(node.output[0]))
    t = open_session(snn).run([node.output[0]], b.feeds)[0]
    keep = np.broadcast_to(b.feeds["keep"], t.shape)
    assert t.dtype == np.uint16
    assert (t[~keep] == spec.gate_time).all() and (~keep).any()
