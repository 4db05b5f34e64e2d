"""Pass: TTFSDecode -> MatMul(weight: DequantizeLinear(int8 W) or float W)  ==>  TTFSReceive.

The same for the rate-coded baseline: RateDecode -> MatMul  ==>  RateReceive. The coding is read
from the decode node; the receive spec comes from the emission's spec (``receive_spec``), so the
matching and weight checks are shared by both codings.

The receiving neurons integrate incoming spike times through the step kernel eta and the
integer weights; their potential at t_emit is exactly the QANN's dequantized MatMul output.
A decode that still has other (non-MatMul) consumers is kept for them: those standard ops are
fed decoded values, which is what makes the graph hybrid until nonlinear neurons exist.
"""
from __future__ import annotations

from ttfsc.graph import GraphIndex
from ttfsc.passes.base import Match, Pass, Rule
from ttfsc.dialect import EMIT_OF_DECODE, emit_spec
from ttfsc.ttfs import DOMAIN


class DecodeMatMulToReceive(Rule):
    name = "DecodeMatMulToReceive"

    def pattern(self, g: GraphIndex) -> list[Match]:
        out = []
        for dec in list(g.nodes):
            if dec.domain != DOMAIN or dec.op_type not in EMIT_OF_DECODE:
                continue
            for mm in g.consumers.get(dec.output[0], []):
                if mm.op_type == "MatMul" and mm.input[0] == dec.output[0]:
                    out.append(Match(mm, {"decode": dec}))
        return out

    def check(self, g: GraphIndex, m: Match) -> str | None:
        mm = m.anchor
        emit = g.producer.get(m.nodes["decode"].input[0])
        want = EMIT_OF_DECODE[m.nodes["decode"].op_type]
        if emit is None or emit.op_type != want:
            return f"spikes do not come from a {want}"
        m.nodes["emit"] = emit
        w = mm.input[1]
        if g.is_const(w):
            m.nodes["weights"] = [w]
            return None
        dq = g.producer.get(w)
        if dq is None or dq.op_type != "DequantizeLinear" or not g.is_const(dq.input[0]):
            return "second input is not a (dequantized) constant weight: a product of two activations"
        scale = g.const(dq.input[1])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if scale.size != 1 and axis not in (1, -1):
            return f"weight quantized along axis {axis}; a reception needs per-output-channel (axis 1) scales"
        if g.const(dq.input[0]).ndim != 2:
            return "weight is not a 2-D matrix"
        m.nodes["weights"] = [n for n in dq.input]
        return None

    def rewrite(self, g: GraphIndex, m: Match) -> None:
        mm, dec = m.anchor, m.nodes["decode"]
        spec = emit_spec(m.nodes["emit"]).receive_spec()
        w = m.nodes["weights"]
        inputs = [dec.input[0], w[0], w[1] if len(w) > 1 else "", w[2] if len(w) > 2 else ""]
        while inputs and not inputs[-1]:
            inputs.pop()
        g.replace_node(mm, [spec.make_node(inputs, mm.output[0], f"{mm.name or mm.output[0]}/receive")])
        if not g.used(dec.output[0]):
            g.remove_nodes([dec])


class DecodeMatMulToReceivePass(Pass):
    name = "decode_matmul_to_receive"
    rule_types = (DecodeMatMulToReceive,)
