"""Rule/pass machinery shared by every pass.

Modelled on onnxscript's rewriter: a rule is a small class with ``pattern`` (what it looks at),
``check`` (whether a match may be rewritten, returning a reason when not) and ``rewrite``.
A pass is an ordered list of rules run over the graph; it reports what it changed and why it
left matches alone, so ``ttfsc compile --json`` can show both.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import onnx

from ttfsc.compiler.modelio import Initializers


class GraphIndex:
    """Producer/consumer maps of a graph, kept current by the edit helpers below."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = Initializers(model)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.nodes: list[onnx.NodeProto] = []
        for n in self.graph.node:  # detached copies: identity stays stable while we edit
            c = onnx.NodeProto()
            c.CopyFrom(n)
            self.nodes.append(c)
        self.rebuild()

    def commit(self) -> None:
        """Write the edited node list back into the graph."""
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)

    def rebuild(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            self._link(node)

    def _link(self, node: onnx.NodeProto) -> None:
        for o in node.output:
            self.producer[o] = node
        for i in node.input:
            if i:
                self.consumers[i].append(node)

    def _unlink(self, node: onnx.NodeProto) -> None:
        for o in node.output:
            if self.producer.get(o) is node:
                del self.producer[o]
        for i in node.input:
            if i:
                self.consumers[i] = [c for c in self.consumers[i] if c is not node]

    def is_const(self, name: str) -> bool:
        return name in self.inits

    def const(self, name: str):
        return self.inits.value(name)

    def used(self, name: str) -> bool:
        return bool(self.consumers.get(name)) or name in self.graph_outputs

    def replace_node(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        """Put ``new`` where ``old`` was (keeps topological order when inputs precede old).

        The maps are updated incrementally: a full rebuild per edit is quadratic on real models.
        """
        pos = next(i for i, n in enumerate(self.nodes) if n is old)
        self.nodes[pos:pos + 1] = new
        self._unlink(old)
        for n in new:
            self._link(n)

    def remove_nodes(self, dead: list[onnx.NodeProto]) -> None:
        ids = {id(n) for n in dead}
        self.nodes = [n for n in self.nodes if id(n) not in ids]
        for n in dead:
            self._unlink(n)


@dataclass
class Match:
    """The nodes a rule matched, plus whatever the rule worked out while checking."""

    anchor: onnx.NodeProto
    nodes: dict[str, Any] = field(default_factory=dict)


class Rule:
    """One rewrite: override pattern/check/rewrite."""

    name = "rule"

    def pattern(self, g: GraphIndex) -> list[Match]:
        raise NotImplementedError

    def check(self, g: GraphIndex, m: Match) -> str | None:
        """None when the match may be rewritten, otherwise the reason it is left alone."""
        return None

    def rewrite(self, g: GraphIndex, m: Match) -> None:
        raise NotImplementedError


@dataclass
class PassReport:
    name: str
    rewritten: Counter = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"pass": self.name, "rewritten": dict(self.rewritten), "skipped": self.skipped}


class Pass:
    """An ordered set of rules. Each rule sees the graph as the previous one left it."""

    name = "pass"
    rules: tuple[Rule, ...] = ()

    def run(self, model: onnx.ModelProto) -> PassReport:
        report = PassReport(self.name)
        g = GraphIndex(model)
        for rule in self.rules:
            for m in rule.pattern(g):
                reason = rule.check(g, m)
                if reason:
                    report.skipped.append({"rule": rule.name, "node": m.anchor.name or m.anchor.output[0],
                                           "reason": reason})
                    continue
                rule.rewrite(g, m)
                report.rewritten[rule.name] += 1
        g.commit()
        return report
