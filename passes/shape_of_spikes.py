"""Pass: Shape([wiring of] TTFSDecode(t)) ==> Shape([wiring of] t).

The export computes reshape targets from the shapes of activations, sometimes after a
Reshape/Transpose/Expand chain. A spike-time tensor has the shape of the values it encodes and
wiring moves times as it moves values, so such a chain can read the times directly; the decode
then has no consumer left and dead-code removes it (no float decoding kept alive for a shape).
"""
from __future__ import annotations

from ttfsc.graph import GraphIndex, copy_node
from ttfsc.passes.base import Match, Pass, Rule
from ttfsc.dialect import DECODE
from ttfsc.ttfs import DOMAIN


SHAPES = ("Shape", "Size")
WIRING = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Flatten")


def only_shapes_read(g: GraphIndex, node, depth: int = 8) -> bool:
    """Every value ``node`` produces ends in a Shape/Size, through wiring only."""
    if node.op_type in SHAPES:
        return True
    if node.op_type not in WIRING or depth == 0 or node.output[0] in g.graph_outputs:
        return False
    users = g.consumers.get(node.output[0], [])
    return bool(users) and all(u.input[0] == node.output[0] and only_shapes_read(g, u, depth - 1) for u in users)


def chain_outputs(g: GraphIndex, node) -> set[str]:
    """Outputs of ``node`` and of the wiring after it, up to (not including) the Shape reads."""
    if node.op_type in SHAPES:
        return set()
    out = {node.output[0]}
    for u in g.consumers.get(node.output[0], []):
        out |= chain_outputs(g, u)
    return out


class ShapeOfSpikeTimes(Rule):
    name = "ShapeOfSpikeTimes"

    def pattern(self, g: GraphIndex) -> list[Match]:
        out = []
        for n in list(g.nodes):
            if n.domain or not n.input or not only_shapes_read(g, n):
                continue
            p = g.producer.get(n.input[0])
            if p is not None and p.domain == DOMAIN and p.op_type == DECODE:
                out.append(Match(n, {"decode": p}))
        return out

    def rewrite(self, g: GraphIndex, m: Match) -> None:
        new = copy_node(m.anchor)
        new.input[0] = m.nodes["decode"].input[0]
        retyped = chain_outputs(g, m.anchor)  # these now carry integer times: drop stale float types
        g.replace_node(m.anchor, [new])
        keep = [vi for vi in g.graph.value_info if vi.name not in retyped]
        del g.graph.value_info[:]
        g.graph.value_info.extend(keep)


class ShapeOfSpikes(Pass):
    name = "shape_of_spikes"
    rule_types = (ShapeOfSpikeTimes,)
