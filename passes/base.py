"""Rule/pass machinery shared by every pass.

Modelled on onnxscript's rewriter: a rule is a small class with ``pattern`` (what it looks at),
``check`` (whether a match may be rewritten, returning a reason when not) and ``rewrite``.
A pass is an ordered list of rules run over the graph; it reports what it changed and why it
left matches alone, so ``ttfsc compile --json`` can show both.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx

from ttfsc.graph import GraphIndex


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
    """An ordered set of rules. Each rule sees the graph as the previous one left it.

    A pass declares its rules as ``rule_types``; each pass object builds its own instances, since a
    rule may keep what it learnt about the one graph it runs on (NeuronRule caches tensor types).
    A pass whose rules take arguments builds them in its own ``__init__``.
    """

    name = "pass"
    rule_types: tuple[type[Rule], ...] = ()

    def __init__(self) -> None:
        self.rules: tuple[Rule, ...] = tuple(rule() for rule in self.rule_types)

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
