"""Pass: float activation -> linear layers  ==>  ContinuousEmit -> ContinuousDecode -> linear layers.

The continuous-kernel (TTFSFormer-style) baseline of qdq_to_emit. It places its stages exactly
where the QANN has its activation quantizers (the first input of every linear layer, one stage
shared by all linears reading the same tensor), but it starts from the *float* model: there is
no quantizer to be consistent with. Each stage gets the continuous theory's kernels on the
tensor's calibrated float range ``[a, b]`` (ttfsc.ttfs.ContinuousStage), so its output is a
floor quantizer onto T levels, and weights stay float. decode_matmul_to_receive then folds the
decoders into TTFSReceives (table kernel, ``c_offset = a``), as for the other codings.

It is named for its place beside qdq_to_emit/qdq_to_rate in the pipeline; its input is a float
graph plus the ranges (``{tensor: (min, max)}``) that compiler/continuous.py calibrates.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from ttfsc.graph import GraphIndex, copy_node
from ttfsc.passes.base import Match, Pass, Rule
from ttfsc.dialect import ContinuousEmitSpec
from ttfsc.ttfs import ContinuousStage


class ActivationToContinuous(Rule):
    """Give one calibrated float activation a continuous-kernel stage in front of its linears."""

    name = "ActivationToContinuous"

    def __init__(self, T: int, ranges: dict[str, tuple[float, float]]):
        self.T = T
        self.ranges = ranges

    def pattern(self, g: GraphIndex) -> list[Match]:
        out = []
        for x in self.ranges:
            linears = [n for n in g.consumers.get(x, []) if self._is_linear(g, n, x)]
            if linears:
                first = min(linears, key=lambda n: next(i for i, m in enumerate(g.nodes) if m is n))
                out.append(Match(first, {"x": x, "linears": linears}))
        return out

    @staticmethod
    def _is_linear(g: GraphIndex, node: onnx.NodeProto, x: str) -> bool:
        return node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[0] == x \
            and g.is_const(node.input[1])

    def check(self, g: GraphIndex, m: Match) -> str | None:
        lo, hi = self.ranges[m.nodes["x"]]
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return f"calibrated range ({lo}, {hi}) is not finite; the tensor stays float"
        return None

    def rewrite(self, g: GraphIndex, m: Match) -> None:
        x = m.nodes["x"]
        spec = ContinuousEmitSpec.from_stage(ContinuousStage.from_range(*self.ranges[x], self.T), source_tensor=x)
        base = x.strip("/") or "act"
        t, xq = f"{base}/continuous_t", f"{base}/continuous_x"
        stage_nodes = [spec.make_node(x, t, f"{base}/continuous_emit"), spec.make_decode(t, xq, f"{base}/continuous_decode")]
        for mm in m.nodes["linears"]:
            new = copy_node(mm)
            new.input[0] = xq
            g.replace_node(mm, (stage_nodes if mm is m.anchor else []) + [new])


class ActivationsToContinuous(Pass):
    """Every calibrated linear-layer input of a float graph becomes a continuous-kernel stage."""

    name = "qdq_to_continuous"

    def __init__(self, T: int, ranges: dict[str, tuple[float, float]]):
        self.rules = (ActivationToContinuous(T, {k: (float(np.float32(lo)), float(np.float32(hi)))
                                                 for k, (lo, hi) in ranges.items()}),)
