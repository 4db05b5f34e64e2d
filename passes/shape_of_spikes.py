"""Pass: Shape(TTFSDecode(t)) ==> Shape(t).

The export computes reshape targets from the shapes of activations. A spike-time tensor has
the shape of the values it encodes, so such a Shape can read the times directly; the decode
then has no consumer left and dead-code removes it (no float decoding kept alive for a shape).
"""
from __future__ import annotations

from ttfsc.passes.base import GraphIndex, Match, Pass, Rule
from ttfsc.runtime.ops import DECODE
from ttfsc.ttfs import DOMAIN


class ShapeOfSpikeTimes(Rule):
    name = "ShapeOfSpikeTimes"

    def pattern(self, g: GraphIndex) -> list[Match]:
        out = []
        for n in list(g.nodes):
            if n.op_type in ("Shape", "Size") and not n.domain:
                p = g.producer.get(n.input[0])
                if p is not None and p.domain == DOMAIN and p.op_type == DECODE:
                    out.append(Match(n, {"decode": p}))
        return out

    def rewrite(self, g: GraphIndex, m: Match) -> None:
        new = type(m.anchor)()
        new.CopyFrom(m.anchor)
        new.input[0] = m.nodes["decode"].input[0]
        g.replace_node(m.anchor, [new])


class ShapeOfSpikes(Pass):
    name = "shape_of_spikes"

    def __init__(self):
        self.rules = (ShapeOfSpikeTimes(),)
