"""Kernels of the TTFS operators, as subgraphs of onnxruntime's own (native) operators.

Each TTFS node is replaced, when a session opens, by the closed form of its neurons:

* ``TTFSEmit`` with Corollary-1 kernels (uniform psi, theta = b - step/2): the first threshold
  crossing of ``V + k*step >= theta`` is ``t = round(t_ref - V/step)`` clipped to the window,
  i.e. ``QuantizeLinear(Clip(V, a, b), scale=-step, zero_point=t_ref)``. The negative scale
  makes onnxruntime's quantizer produce spike *times* directly, with round-half-to-even on ties
  (tie_rule ``half_even``); ``half_up`` adds an exact tie fix-up.
* ``TTFSEmit`` with any other psi/theta: the crossing is found against the cumulative table
  ``S[k]`` (first k with ``V + S[k] >= theta``), all slots at once, no time loop.
* ``TTFSReceive`` with the step kernel: ``DequantizeLinear(t, -step_in, t_ref_in)`` gives
  ``sum of eta over the steps after each spike`` + C, and the integer weights are applied by
  MatMul on a DequantizeLinear'd int8 weight; onnxruntime fuses that into its integer kernel
  (MatMulIntegerToFloat), exactly as it does for the quantized twin.
* ``TTFSReceive`` with any other eta: a gather from the table ``F[t]`` (ttfs.receive_table).
* ``TTFSDecode``: ``DequantizeLinear(t, -step, t_ref)``.
* Rate baseline: ``RateEmit`` is the IF neuron's count in closed form,
  ``QuantizeLinear(Clip(V, a, b), threshold, zero_point)`` (positive scale: counts, not times);
  ``RateReceive`` is ``DequantizeLinear(counts, threshold_in, zero_point_in)`` -> MatMul on the
  DequantizeLinear'd int8 weight (the QANN's own pattern, fused the same way); ``RateDecode`` is
  that DequantizeLinear alone.
* Continuous-kernel baseline: ``ContinuousEmit`` is the first crossing of ``V + k*step >=
  theta_slot`` in closed form, ``t = clip(N - Floor((V - a) / step), 0, N)`` (ttfs.ContinuousStage:
  a floor, no half-step compensation, so no QuantizeLinear); ``ContinuousDecode`` gathers the
  value table ``a + (N - t)*step``; its receivers are TTFSReceives on the table path.

Why subgraphs and not a C++ library: the matmuls must run on onnxruntime's own integer kernels
anyway, and expressed this way the whole stage fuses into them (docs/theory.md §11; the
benchmark records the measured cost).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ttfsc.dialect import (ContinuousEmitSpec, EmitSpec, RateEmitSpec, RateReceiveSpec, ReceiveSpec,
                           continuous_decode_spec, decode_spec, rate_decode_spec, time_elem_type)
from ttfsc.graph import MS_DOMAIN
from ttfsc.ttfs import (UniformStage, count_dtype, emit_table, is_step_kernel, is_uniform, receive_table, tie_blocked,
                        time_dtype, times_grid)


class Lowering:
    """Collects the nodes and initializers that replace one TTFS node."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, value, hint: str, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def op(self, op_type: str, inputs: list[str], output: str | None = None, domain: str = "", **kw) -> str:
        out = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), domain=domain, **kw))
        return out


def _qdq_domain(T: int) -> str:
    """uint16 spike times (T > 256) need the com.microsoft Q/DQ at opset 18."""
    return "" if time_dtype(T) == np.uint8 else MS_DOMAIN


def decode_times(lw: Lowering, t: str, T: int, t_ref: int, step: float, out: str | None = None) -> str:
    """x = (t - t_ref) * (-step) = (t_ref - t) * step: the spike-time code, read as a value."""
    neg_step, t0 = times_grid(step, t_ref)
    scale = lw.const(neg_step, "neg_step", np.float32)
    zp = lw.const(t0, "t_ref", time_dtype(T))
    return lw.op("DequantizeLinear", [t, scale, zp], out, domain=_qdq_domain(T))


def lower_emit(node: onnx.NodeProto) -> Lowering:
    e = EmitSpec.from_node(node)
    lw = Lowering(node.name or node.output[0])
    if is_uniform(np.asarray(e.psi), e.theta, e.step, e.t_ref):
        emit_uniform(lw, node.input[0], node.output[0], e)
    else:
        _emit_table(lw, node.input[0], node.output[0], e)
    return lw


def emit_uniform(lw: Lowering, v: str, t: str, e: EmitSpec) -> None:
    """Corollary 1's emission in closed form: potential ``v`` to spike times ``t`` (also a TTFSNeuron's)."""
    stage = e.stage()
    # a negative scale makes the quantizer produce spike times; ties go to the earlier spike
    neg_step, t_ref = times_grid(stage.step, e.t_ref)
    _quantize(lw, v, t, neg_step, t_ref, e.N, stage.clip_bounds(), e.tie_rule, "Floor")


def _quantize(lw: Lowering, v: str, out: str, scale: float, zp: int, N: int,
              bounds: tuple[np.float32, np.float32], tie_rule: str, half_up_tie: str) -> None:
    """Clip to the window, then round(v / scale) + zp into 0..N as the window's integer type.

    ``half_even`` is onnxruntime's own QuantizeLinear (the QANN's rounding, bit for bit);
    ``half_up`` rounds exact ties with ``half_up_tie`` (Floor or Ceil of v/scale, whichever is the
    larger code), everything else with Round.
    """
    lo, hi = bounds
    # Min/Max rather than Clip: onnxruntime's Clip+QuantizeLinear fusion misjudges a negative
    # scale's range as covered and would drop the window's clip (measured on stories260K).
    vc = lw.op("Max", [lw.op("Min", [v, lw.const(hi, "b", np.float32)]), lw.const(lo, "a", np.float32)])
    sc = lw.const(np.float32(scale), "scale", np.float32)
    if tie_rule == "half_even":
        lw.op("QuantizeLinear", [vc, sc, lw.const(zp, "zp", time_dtype(N + 1))], out, domain=_qdq_domain(N + 1))
        return
    w = lw.op("Div", [vc, sc])
    fl = lw.op("Floor", [w])
    tie = lw.op("Equal", [lw.op("Sub", [w, fl]), lw.const(np.float32(0.5), "half", np.float32)])
    r = lw.op("Where", [tie, lw.op(half_up_tie, [w]), lw.op("Round", [w])])
    k = lw.op("Add", [r, lw.const(np.float32(zp), "zp_f", np.float32)])
    k = lw.op("Clip", [k, lw.const(np.float32(0), "zero", np.float32), lw.const(np.float32(N), "N", np.float32)])
    lw.op("Cast", [k], out, to=time_elem_type(N + 1))


def _emit_table(lw: Lowering, v: str, t: str, e: EmitSpec) -> None:
    """First slot k with V + S[k] >= theta (tie rule applied), or N (silent)."""
    S = emit_table(np.asarray(e.psi), e.N).astype(np.float32)
    vk = lw.op("Add", [lw.op("Unsqueeze", [v, lw.const(np.array([-1], np.int64), "ax")]), lw.const(S, "S", np.float32)])
    theta = lw.const(np.float32(e.theta), "theta", np.float32)
    cross = lw.op("GreaterOrEqual", [vk, theta])
    if e.tie_rule == "half_even":
        skip = lw.op("And", [lw.op("Equal", [vk, theta]), lw.const(tie_blocked(e.t_ref, e.N), "odd_slot", np.bool_)])
        cross = lw.op("And", [cross, lw.op("Not", [skip])])
    ci = lw.op("Cast", [cross], to=TensorProto.INT32)
    first = lw.op("ArgMax", [ci], axis=-1, keepdims=0, select_last_index=0)
    any_ = lw.op("Cast", [lw.op("ReduceMax", [ci, lw.const(np.array([-1], np.int64), "ax")], keepdims=0)],
                 to=TensorProto.BOOL)
    k = lw.op("Where", [any_, first, lw.const(np.int64(e.N), "N", np.int64)])
    lw.op("Cast", [k], t, to=time_elem_type(e.T))


def lower_receive(node: onnx.NodeProto) -> Lowering:
    r = ReceiveSpec.from_node(node)
    lw = Lowering(node.name or node.output[0])
    t = node.input[0]
    a_in = UniformStage.from_timing(r.step_in, r.t_ref_in, r.T_in).a
    if is_step_kernel(np.asarray(r.eta), r.step_in) and np.float32(r.c_offset) == a_in and r.gain == 1.0:
        _receive_matmul(lw, node, decode_times(lw, t, r.T_in, r.t_ref_in, r.step_in))
        return lw
    F = receive_table(np.asarray(r.eta), r.c_offset, r.T_in - 1).astype(np.float32)
    x = lw.op("Gather", [lw.const(F, "F", np.float32), lw.op("Cast", [t], to=TensorProto.INT64)], axis=0)
    v = lw.op("MatMul", [x, _weight(lw, node)])
    lw.op("Mul", [v, lw.const(np.float32(r.gain), "gain", np.float32)], node.output[0])
    return lw


def _receive_matmul(lw: Lowering, node: onnx.NodeProto, x: str) -> None:
    """MatMul of decoded inputs with the (dequantized) weights, straight into the node's output."""
    lw.op("MatMul", [x, _weight(lw, node)], node.output[0])


def _weight(lw: Lowering, node: onnx.NodeProto) -> str:
    """Integer weights dequantized per output channel (fused by onnxruntime), or float weights."""
    if len(node.input) < 3 or not node.input[2]:
        return node.input[1]
    inputs = [node.input[1], node.input[2]] + ([node.input[3]] if len(node.input) > 3 and node.input[3] else [])
    return lw.op("DequantizeLinear", inputs, axis=1)


def lower_decode(node: onnx.NodeProto) -> Lowering:
    T, t_ref, step = decode_spec(node)
    lw = Lowering(node.name or node.output[0])
    decode_times(lw, node.input[0], T, t_ref, step, node.output[0])
    return lw


# ---------------------------------------------------------------- rate-coded baseline

def _dequantize_counts(lw: Lowering, c: str, N: int, threshold: float, zp: int, out: str | None = None) -> str:
    """x = (c - z) * threshold: a spike count read as the QANN's dequantized value."""
    scale = lw.const(np.float32(threshold), "threshold", np.float32)
    return lw.op("DequantizeLinear", [c, scale, lw.const(zp, "zp", count_dtype(N))], out, domain=_qdq_domain(N + 1))


def lower_rate_emit(node: onnx.NodeProto) -> Lowering:
    """Closed form of the IF neuron's count: QuantizeLinear with the positive scale (ttfs.RateStage)."""
    e = RateEmitSpec.from_node(node)
    lw = Lowering(node.name or node.output[0])
    stage = e.stage()
    _quantize(lw, node.input[0], node.output[0], stage.threshold, e.zero_point, e.N, stage.clip_bounds(),
              e.tie_rule, "Ceil")
    return lw


def lower_rate_receive(node: onnx.NodeProto) -> Lowering:
    """DequantizeLinear(counts) -> MatMul(DQ(int8 W)): the QANN's own pattern, fused the same way."""
    r = RateReceiveSpec.from_node(node)
    lw = Lowering(node.name or node.output[0])
    _receive_matmul(lw, node, _dequantize_counts(lw, node.input[0], r.N_in, r.threshold_in, r.zero_point_in))
    return lw


def lower_rate_decode(node: onnx.NodeProto) -> Lowering:
    N, threshold, zp = rate_decode_spec(node)
    lw = Lowering(node.name or node.output[0])
    _dequantize_counts(lw, node.input[0], N, threshold, zp, node.output[0])
    return lw


# ---------------------------------------------------------------- continuous-kernel baseline

def lower_continuous_emit(node: onnx.NodeProto) -> Lowering:
    """t = clip(N - floor((V - a) / step), 0, N): the constant-psi neuron's first crossing of theta.

    Element-wise float32 ops only (no [.., N] table: N reaches 8191); ContinuousStage.times is
    the same arithmetic in numpy and the simulator steps the neuron itself.
    """
    st = ContinuousEmitSpec.from_node(node).stage()
    lw = Lowering(node.name or node.output[0])
    d = lw.op("Sub", [node.input[0], lw.const(np.float32(st.a), "a", np.float32)])
    u = lw.op("Floor", [lw.op("Div", [d, lw.const(st.step, "step", np.float32)])])
    k = lw.op("Sub", [lw.const(np.float32(st.N), "N", np.float32), u])
    k = lw.op("Clip", [k, lw.const(np.float32(0), "zero", np.float32), lw.const(np.float32(st.N), "N_hi", np.float32)])
    lw.op("Cast", [k], node.output[0], to=time_elem_type(st.T))
    return lw


def lower_continuous_decode(node: onnx.NodeProto) -> Lowering:
    """x = a + (N - t) * step, gathered from the stage's value table (the receivers' own table)."""
    st = continuous_decode_spec(node)
    lw = Lowering(node.name or node.output[0])
    idx = lw.op("Cast", [node.input[0]], to=TensorProto.INT64)
    lw.op("Gather", [lw.const(st.values(), "values", np.float32), idx], node.output[0], axis=0)
    return lw

