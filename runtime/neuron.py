"""Lowering of ``TTFSNeuron`` (described in ``ttfsc.neuron``) to onnxruntime's own operators.

With a ``table``: one Gather on the spike times (no float arithmetic at all; a gate adds one
comparison of the mask with 0 and a select). Otherwise: decode the spike inputs
(DequantizeLinear on times, as TTFSDecode), run ``body`` (the QANN's own float ops) and emit
through the Corollary-1 quantizer of the output grid, the same closed form as a TTFSEmit.
Either way the neuron computes what the QANN computes, bit for bit; its kernels (eta, psi,
theta) are checked apart, by ``ttfsc inspect --neurons``.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ttfsc.graph import copy_node
from ttfsc.neuron import NeuronSpec
from ttfsc.runtime.kernels import Lowering, decode_times, emit_uniform
from ttfsc.ttfs import time_dtype


def lower_neuron(node: onnx.NodeProto) -> Lowering:
    """Gather on the realised table, or decode -> the QANN's float body -> Corollary-1 emission."""
    spec = NeuronSpec.from_node(node)
    lw = Lowering(node.name or node.output[0])
    if spec.table:
        entries = list(spec.table) + ([spec.gate_time] if spec.gate_time >= 0 else [])
        table = lw.const(np.asarray(entries, dtype=time_dtype(spec.emit.T)), "table")
        idx = lw.op("Cast", [node.input[0]], to=TensorProto.INT64)
        if spec.gate_time >= 0:
            # The gate selects on the int64 index (masked positions read the extra last entry,
            # gate_time): onnxruntime's CPU Where has no uint16 kernel, which windows > 256 use.
            open_ = lw.op("Equal", [node.input[spec.n_spike], lw.const(np.zeros((), np.float32), "zero")])
            idx = lw.op("Where", [open_, idx, lw.const(np.asarray(len(spec.table), np.int64), "gate_index")])
        lw.op("Gather", [table, idx], node.output[0], axis=0)
        return lw
    v = inline_body(lw, node, spec)
    emit_uniform(lw, v, node.output[0], spec.emit)
    return lw


def inline_body(lw: Lowering, node: onnx.NodeProto, spec: NeuronSpec) -> str:
    """Copy ``body`` into the lowering: spike inputs decoded, every inner tensor renamed; returns V."""
    rename: dict[str, str] = {}
    for j, inp in enumerate(spec.body.input):
        src = node.input[j]
        if j < spec.n_spike:
            src = decode_times(lw, src, spec.windows_in[j], spec.t_refs_in[j], spec.steps_in[j])
        rename[inp.name] = src
    prefix = lw.prefix
    for n in spec.body.node:
        c = copy_node(n)
        c.name = f"{prefix}/body/{n.name or n.output[0]}"
        for k, x in enumerate(c.input):
            if x:
                c.input[k] = rename.setdefault(x, f"{prefix}/body/{x}")
        for k, x in enumerate(c.output):
            if x:
                c.output[k] = rename.setdefault(x, f"{prefix}/body/{x}")
        lw.nodes.append(c)
    return rename[spec.body.output[0].name]
