"""Pass: remove what the rewrites left without consumers.

After the emission and reception rewrites, the weight DequantizeLinears (and any Clip or
decode no longer read) are dead; leaving them would keep float weights alive in the graph.
"""
from __future__ import annotations

import onnx

from ttfsc.graph import GraphIndex
from ttfsc.passes.base import Match, Pass, PassReport, Rule


class RemoveDeadNodes(Rule):
    """Weight DequantizeLinears (and anything else) left without consumers."""

    name = "RemoveDeadNodes"

    def pattern(self, g: GraphIndex) -> list[Match]:
        return [Match(n) for n in list(g.nodes) if not any(g.used(o) for o in n.output if o)]

    def rewrite(self, g: GraphIndex, m: Match) -> None:
        g.remove_nodes([m.anchor])


class DeadCode(Pass):
    """Repeat until nothing is dead (a removed node can orphan its producers), then drop initializers."""

    name = "dead_code"
    rule_types = (RemoveDeadNodes,)

    def run(self, model: onnx.ModelProto) -> PassReport:
        total = PassReport(self.name)
        while True:
            r = super().run(model)
            if not r.rewritten:
                break
            total.rewritten.update(r.rewritten)
        total.rewritten["RemoveUnusedInitializers"] = remove_unused_initializers(model)
        return total


def remove_unused_initializers(model: onnx.ModelProto) -> int:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    removed = len(model.graph.initializer) - len(keep)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return removed
