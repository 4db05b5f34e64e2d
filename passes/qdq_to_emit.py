"""Pass: activation [Clip ->] QuantizeLinear -> DequantizeLinear  ==>  TTFSEmit -> TTFSDecode.

Corollary 1: the n-bit quantizer (scale, zero point, codes 0..N) *is* a TTFS neuron with a
step input kernel, psi = scale, theta = b - scale/2, t_ref = N - z and a window of T = N+1 slots.
The QuantizeLinear becomes the emission of that stage (potential -> spike times); every
DequantizeLinear reading its codes becomes a TTFSDecode of the spike times, which the next pass
folds into the receiving MatMuls. A Clip in front of the QuantizeLinear is how ttfsc's QDQ
models carry n < 8 bits in uint8: its range narrows the code range, and the emission's own
window clips exactly the same way, so the Clip is absorbed.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from ttfsc.dialect import EmitSpec, code_range
from ttfsc.graph import GraphIndex
from ttfsc.passes.base import Match, Pass, Rule
from ttfsc.ttfs import UniformStage, bits_for_window, code_of_bound, requantize_params, time_dtype

class WindowMismatch(ValueError):
    """The QDQ model's activation width and -T disagree (and --requantize was not given)."""


class QuantDequantToEmit(Rule):
    """Rewrite one activation quantizer and all the dequantizers that read it."""

    name = "QuantDequantToEmit"

    def __init__(self, T: int | None, requantize: bool = False):
        self.T = T  # None: every stage keeps the QDQ model's own width (mixed windows, -T auto)
        self.requantize = requantize
        self.widths: Counter[int] = Counter()  # code levels -> stages, set by pattern()

    def pattern(self, g: GraphIndex) -> list[Match]:
        out = []
        for q in list(g.nodes):
            if q.op_type != "QuantizeLinear" or g.is_const(q.input[0]):
                continue  # weights are quantized offline; only activations become spikes
            out.append(Match(q, {"clip": self._clip(g, q), "dqs": list(g.consumers.get(q.output[0], []))}))
        # every stage's width, read before any rewrite: a mismatch message must know whether one -T can fit
        self.widths = Counter(found[3] - found[2] + 1 for m in out if not isinstance(found := self._stage(g, m), str))
        return out

    @staticmethod
    def _clip(g: GraphIndex, q: onnx.NodeProto) -> onnx.NodeProto | None:
        p = g.producer.get(q.input[0])
        if p is None or p.op_type != "Clip" or len(g.consumers[p.output[0]]) != 1:
            return None
        if len(p.input) < 3 or not all(g.is_const(n) for n in p.input[1:3]):
            return None
        return p

    def check(self, g: GraphIndex, m: Match) -> str | None:
        found = self._stage(g, m)
        if isinstance(found, str):
            return found
        scale, zp, qmin, qmax = found
        T = qmax - qmin + 1
        if self.T is not None and T != self.T and not self.requantize:
            raise WindowMismatch(self._mismatch(m.anchor, T))
        m.nodes.update(scale=scale, zp=zp, qmin=qmin, qmax=qmax, T_src=T)
        return None

    def _stage(self, g: GraphIndex, m: Match) -> str | tuple[float, int, int, int]:
        """A reason to leave the match alone, or its stage: (scale, zero point, lowest code, highest code)."""
        q = m.anchor
        if len(q.input) < 3 or not (g.is_const(q.input[1]) and g.is_const(q.input[2])):
            return "scale/zero point are not constants (dynamic quantization is not a static TTFS stage)"
        scale, zp = g.const(q.input[1]), g.const(q.input[2])
        if scale.size != 1 or zp.size != 1:
            return "per-channel activation quantization: one TTFS stage needs one scale per tensor"
        if not m.nodes["dqs"] or q.output[0] in g.graph_outputs:
            return "codes are used without a DequantizeLinear"
        for dq in m.nodes["dqs"]:
            if dq.op_type != "DequantizeLinear" or not self._same_params(g, q, dq):
                return f"consumer {dq.name or dq.output[0]} is not a DequantizeLinear with the same scale/zero point"
        qmin, qmax = self._code_range(g, q, m.nodes["clip"], float(scale.reshape(())), int(zp.reshape(())))
        try:
            bits_for_window(qmax - qmin + 1)
        except ValueError:
            return f"{qmax - qmin + 1} code levels is not 2^n for n in 2..12"
        reason = self._reference_time_problem(float(scale.reshape(())), int(zp.reshape(())) - qmin, qmax - qmin + 1)
        if reason:
            return reason
        return float(scale.reshape(())), int(zp.reshape(())), qmin, qmax

    @staticmethod
    def _reference_time_problem(scale: float, z: int, T: int) -> str | None:
        """Why the stage has no spike-time reference, or None.

        Spike times are unsigned integers of the window's type, and the emission writes them with
        t_ref = N - z as the quantizer's zero point: a zero point above the code window (t_ref < 0),
        or so far below it that t_ref exceeds the type, has no such emission (found by the
        property tests, tests/test_property_compile.py).
        """
        t_ref, top = UniformStage(scale, z, T).t_ref, int(np.iinfo(time_dtype(T)).max)
        if 0 <= t_ref <= top:
            return None
        return (f"zero point {z} (relative to the lowest code) puts the stage's reference time t_ref = N - z = {t_ref} "
                f"outside 0..{top}, which its spike times cannot express: re-quantize this tensor with a range that "
                f"contains 0 inside the code window")

    def _mismatch(self, q: onnx.NodeProto, T: int) -> str:
        """-T and the QDQ model disagree: name the one -T that fits, or, when the stages have several
        widths, say that none does and -T auto keeps each stage's own window (a per-node suggestion
        used to send the user from -T 64 to -T 1024 and back)."""
        where = f"node {q.name or q.output[0]}"
        if len(self.widths) > 1:
            mix = ", ".join(f"{n} of {w} levels ({bits_for_window(w)} bits)" for w, n in sorted(self.widths.items()))
            return (f"{where}: the QDQ model has activation stages of several widths ({mix}), so no single -T "
                    f"matches them all and -T {self.T} was given. Use -T auto to keep each stage's own window, "
                    f"or add --requantize (lossy) to re-grid every stage to {self.T} slots.")
        return (f"{where}: the QDQ model quantizes activations to {T} levels "
                f"({bits_for_window(T)} bits) but -T {self.T} was given. Use -T {T}, or add --requantize "
                f"(lossy) to re-grid the activations to {self.T} slots.")

    @staticmethod
    def _same_params(g: GraphIndex, q: onnx.NodeProto, dq: onnx.NodeProto) -> bool:
        if len(dq.input) < 3:
            return False
        if (dq.input[1], dq.input[2]) == (q.input[1], q.input[2]):
            return True
        if not (g.is_const(dq.input[1]) and g.is_const(dq.input[2])):
            return False
        return (np.array_equal(g.const(dq.input[1]), g.const(q.input[1]))
                and np.array_equal(g.const(dq.input[2]), g.const(q.input[2])))

    @staticmethod
    def _code_range(g: GraphIndex, q, clip, scale: float, zp: int) -> tuple[int, int]:
        """Codes the QANN can produce: the zero point type's range, narrowed by a Clip."""
        qmin, qmax = code_range(g.inits.by_name[q.input[2]].data_type)
        if clip is not None:
            lo, hi = (float(g.const(n).reshape(())) for n in clip.input[1:3])
            qmin = max(qmin, code_of_bound(lo, scale, zp))
            qmax = min(qmax, code_of_bound(hi, scale, zp))
        return qmin, qmax

    #: suffix of the tensor the emission writes (spike times here; counts in the rate variant)
    out_suffix = "spike_t"

    def spec(self, scale: float, z: int, T: int, qann_tensor: str, qann_code_min: int) -> EmitSpec:
        """The emission reproducing codes of (scale, z) on the T-slot grid: Corollary 1's stage.

        Subclasses (passes/qdq_to_rate.py) return another coding's spec with the same interface
        (make_node, make_decode); matching, checks and the rewrite itself are shared.
        """
        return EmitSpec.from_stage(UniformStage(scale, z, T), qann_tensor=qann_tensor,
                                   qann_code_min=qann_code_min)

    def rewrite(self, g: GraphIndex, m: Match) -> None:
        q, clip = m.anchor, m.nodes["clip"]
        scale, z, N_src = m.nodes["scale"], m.nodes["zp"] - m.nodes["qmin"], m.nodes["T_src"] - 1
        T = self.T or m.nodes["T_src"]
        if T != m.nodes["T_src"]:
            scale, z = requantize_params(scale, z, N_src, T - 1)
        spec = self.spec(scale, z, T, q.output[0], m.nodes["qmin"])
        v = clip.input[0] if clip is not None else q.input[0]
        t = f"{q.output[0]}/{self.out_suffix}"
        base = q.name or q.output[0]
        g.replace_node(q, [spec.make_node(v, t, f"{base}/emit")])
        for i, dq in enumerate(m.nodes["dqs"]):
            g.replace_node(dq, [spec.make_decode(t, dq.output[0], f"{base}/decode_{i}")])
        if clip is not None:
            g.remove_nodes([clip])


class QdqToEmit(Pass):
    """All activation quantizers of the graph become TTFS emissions."""

    name = "qdq_to_emit"
    rule_types: tuple[type[QuantDequantToEmit], ...] = (QuantDequantToEmit,)

    def __init__(self, T: int | None, requantize: bool = False):
        self.rules = tuple(rule(T, requantize) for rule in self.rule_types)
