"""Graph toolkit benchmark: ttfsc's protobuf toolkit vs onnxscript's IR (onnx_ir) and rewriter.

Issue 10 asks whether ttfsc's graph toolkit (core/graph.py GraphIndex, passes/base.py Rule/Pass)
and its pass rules should stand on onnxscript's IR and rewriter. This file measures it on one
QDQ model, side by side, each variant in its own process (so peak RSS is each one's own):

1. load     ttfsc.modelio.load_model (onnx.load, external data left on disk)
            vs onnx_ir.load (external tensors lazy, memory-mapped on access)
2. compile  the hybrid compile's core: QdqToEmit(T) + DecodeMatMulToReceivePass + DeadCode
            vs a prototype written here on onnxscript's rewriter (RewriteRuleClassBase rules in
            two RewritePasses, then onnx_ir's RemoveUnusedNodesPass), producing the same ops with
            the same attributes: the attributes come from ttfsc's own specs (ttfsc.dialect
            EmitSpec / ReceiveSpec: the NodeProto they build is copied into the IR node)
3. save     ttfsc.modelio.save_model vs onnx_ir.save (external data)
4. convert  onnx_ir Model -> onnx.ModelProto -> onnx_ir Model (ir.serde), the price of handing an
            IR model to the parts that work on ModelProto (runtime lowering, verify)

then checks that both compiled models are the same graph (same nodes by name, op, domain, inputs,
outputs and attributes; same initializers, bytes included) and that they give bit-identical logits
in ttfsc.runtime.open_session on one random token sequence.

  python benchmarks/graph_toolkit.py --qdq /tmp/eq/s260/old/model.qdq.onnx -T 64 --reps 5

Prints a markdown table: step, ttfsc ms, onnxscript ms, ratio, peak RSS of both. Timings are the
median of --reps child processes per variant (ttfsc and onnxscript runs interleaved); the peak
RSS column is ru_maxrss of the child after that step (cumulative: load, then load + compile, ...),
median over the reps.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

DOMAIN = "ai.ttfsc"
STEPS = ("import", "load", "compile", "save", "to_proto", "from_proto")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class Steps:
    """Wall time of each step of one child, and its peak RSS when the step ends (``with steps("load"): ...``)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.rss: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.times[name], self.rss[name] = time.perf_counter() - t0, _rss_mb()


# ====================================================================== ttfsc's own toolkit

def child_ttfsc(qdq: str, T: int, out: str) -> dict:
    step = Steps()
    with step("import"):
        import onnx

        from ttfsc.modelio import load_model, save_model
        from ttfsc.passes.dead_code import DeadCode
        from ttfsc.passes.decode_matmul_to_receive import DecodeMatMulToReceivePass
        from ttfsc.passes.qdq_to_emit import QdqToEmit
    with step("load"):
        model = load_model(qdq)
    with step("compile"):
        reports = [p.run(model).as_dict() for p in (QdqToEmit(T), DecodeMatMulToReceivePass(), DeadCode())]
        if not any(o.domain == DOMAIN for o in model.opset_import):  # as compiler/pipeline.run_passes does
            model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    with step("save"):
        save_model(model, out)
    counts = {r["pass"]: r["rewritten"] for r in reports}
    return {"times": step.times, "rss": step.rss, "rewritten": counts, "nodes": len(model.graph.node)}


# ====================================================================== the onnxscript prototype

def build_ir_rules(T: int | None, requantize: bool = False):
    """The two rewrite passes of the prototype, as onnxscript rule sets.

    Returns (qdq_rules, receive_rules, skipped): ``skipped`` collects (rule, node, reason) for
    matches a check refused, the part of ttfsc's PassReport the rewriter has no place for.
    """
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter import RewriteRuleClassBase, RewriteRuleSet

    from ttfsc.dialect import EmitSpec, code_range, emit_spec
    from ttfsc.passes.qdq_to_emit import WindowMismatch
    from ttfsc.ttfs import UniformStage, bits_for_window, code_of_bound, requantize_params

    skipped: list[tuple[str, str, str]] = []

    def init_array(v):
        """Value of an initializer (memory-mapped if external), None for anything else.

        ttfsc's rules call a tensor constant only when it is an initializer (GraphIndex.is_const),
        so the prototype does the same rather than also following Constant nodes.
        """
        if v is None or not v.is_initializer() or v.const_value is None:
            return None
        return v.const_value.numpy()

    def emit_node(op, proto: onnx.NodeProto, inputs: list):
        """Create the IR node for ``proto`` (built by a ttfsc spec) on the rewriter's tape."""
        attrs = {a.name: ir.serde.deserialize_attribute(a) for a in proto.attribute}
        return op.op(proto.op_type, *inputs, _domain=proto.domain, _version=1, _outputs=list(proto.output),
                     _name=proto.name, **attrs)

    class _Stage:
        """What one activation quantizer becomes: decided once, shared by all its dequantizers."""

        __slots__ = ("clip", "spec", "v", "dqs", "emit", "t_name", "base")

        def __init__(self, clip, spec, v, dqs, t_name, base):
            self.clip, self.spec, self.v, self.dqs, self.t_name, self.base = clip, spec, v, dqs, t_name, base
            self.emit = None

    class QdqToEmitRule(RewriteRuleClassBase):
        """[Clip ->] QuantizeLinear -> DequantizeLinear ==> TTFSEmit -> TTFSDecode, anchored at each DQ.

        A quantizer read by several dequantizers (q/k/v share one) makes the Q's output a value
        with uses outside any one match, which the rewriter refuses when it removes matched nodes.
        So ``remove_nodes=False``: a match only redirects the DQ's output to the new decode; the
        Q, the Clip and the DQs, left without consumers, go in the dead-node pass. The decision
        for a quantizer (check) and its one TTFSEmit are made on its first DQ and kept in
        ``stages`` (keyed by the Q node), so every DQ of one Q reads the same emission, as in ttfsc.
        """

        def __init__(self, with_clip: bool, stages: dict):
            super().__init__(name=f"QdqToEmit{'Clip' if with_clip else ''}", remove_nodes=False)
            self.with_clip = with_clip
            self.stages = stages

        def pattern(self, op, x, lo, hi, qs, qz, ds, dz):
            v = op.Clip(x, lo, hi, _outputs=["clipped"]) if self.with_clip else x
            codes = op.QuantizeLinear(v, qs, qz, _outputs=["codes"])
            return op.DequantizeLinear(codes, ds, dz, _outputs=["decoded"])

        def check(self, context, x, lo, hi, qs, qz, ds, dz, codes, decoded, **_):
            q = codes.producer()
            if q in self.stages:
                st = self.stages[q]
                return st is not None and st.clip == self.with_clip
            if self.with_clip:
                clip = q.inputs[0].producer()
                if len(clip.outputs[0].uses()) != 1 or init_array(lo) is None or init_array(hi) is None:
                    return False  # not absorbable: the rule without Clip takes this quantizer
            else:
                clip = None
            reason = self._refuse(q, clip, qs, qz)
            if isinstance(reason, str):
                if reason != "weight quantizer":  # ttfsc's pattern leaves these out silently
                    skipped.append((self.name, q.name or codes.name, reason))
                self.stages[q] = None
                return False
            self.stages[q] = reason
            return True

        def _refuse(self, q, clip, qs, qz):
            """ttfsc's QuantDequantToEmit.check, on IR values: a reason string, or the stage."""
            if init_array(q.inputs[0]) is not None:
                return "weight quantizer"  # ttfsc's pattern skips these silently
            scale, zp = init_array(qs), init_array(qz)
            if scale is None or zp is None:
                return "scale/zero point are not constants (dynamic quantization is not a static TTFS stage)"
            if scale.size != 1 or zp.size != 1:
                return "per-channel activation quantization: one TTFS stage needs one scale per tensor"
            codes = q.outputs[0]
            dqs = [u.node for u in codes.uses()]
            if not dqs or codes.is_graph_output():
                return "codes are used without a DequantizeLinear"
            for dq in dqs:
                if dq.op_type != "DequantizeLinear" or dq.domain != "" or not self._same_params(q, dq):
                    return f"consumer {dq.name} is not a DequantizeLinear with the same scale/zero point"
            scale_f, zp_i = float(scale.reshape(())), int(zp.reshape(()))
            qmin, qmax = code_range(qz.const_value.dtype.value)  # ttfsc's table and rounding, on IR values
            if clip is not None:
                lo_v, hi_v = (float(init_array(v).reshape(())) for v in clip.inputs[1:3])
                qmin = max(qmin, code_of_bound(lo_v, scale_f, zp_i))
                qmax = min(qmax, code_of_bound(hi_v, scale_f, zp_i))
            T_src = qmax - qmin + 1
            try:
                bits_for_window(T_src)
            except ValueError:
                return f"{T_src} code levels is not 2^n for n in 2..12"
            if T is not None and T_src != T and not requantize:
                raise WindowMismatch(f"node {q.name}: {T_src} levels in the QDQ model, -T {T} given")
            z, Tw = zp_i - qmin, T or T_src
            if Tw != T_src:
                scale_f, z = requantize_params(scale_f, z, T_src - 1, Tw - 1)
            spec = EmitSpec.from_stage(UniformStage(scale_f, z, Tw), qann_tensor=codes.name, qann_code_min=qmin)
            v = clip.inputs[0] if clip is not None else q.inputs[0]
            return _Stage(clip is not None, spec, v, dqs, f"{codes.name}/spike_t", q.name or codes.name)

        @staticmethod
        def _same_params(q, dq) -> bool:
            if len(dq.inputs) < 3:
                return False
            if dq.inputs[1] is q.inputs[1] and dq.inputs[2] is q.inputs[2]:
                return True
            a = [init_array(v) for v in (dq.inputs[1], dq.inputs[2], q.inputs[1], q.inputs[2])]
            return None not in a and np.array_equal(a[0], a[2]) and np.array_equal(a[1], a[3])

        def rewrite(self, op, codes, decoded, **_):
            st: _Stage = self.stages[codes.producer()]
            if st.emit is None:  # first DQ of this quantizer: the emission goes on this tape
                st.emit = emit_node(op, st.spec.make_node(st.v.name, st.t_name, f"{st.base}/emit"), [st.v])
            i = st.dqs.index(decoded.producer())
            return emit_node(op, st.spec.make_decode(st.t_name, decoded.name, f"{st.base}/decode_{i}"), [st.emit])

    class DecodeMatMulToReceiveRule(RewriteRuleClassBase):
        """TTFSDecode(TTFSEmit(.)) -> MatMul(., W) ==> TTFSReceive, W = DequantizeLinear(int W) or float W.

        ``weights``: "dq3" (DQ with zero point), "dq2" (without) or "const" (a float initializer).
        ``remove_nodes=False`` again: one decode feeds several MatMuls (q, k, v) and other ops.
        """

        def __init__(self, weights: str):
            super().__init__(name=f"DecodeMatMulToReceive_{weights}", remove_nodes=False)
            self.weights = weights

        def pattern(self, op, v, w, ws, wz):
            t = op.TTFSEmit(v, _domain=DOMAIN, _outputs=["times"])
            x = op.TTFSDecode(t, _domain=DOMAIN)
            if self.weights == "dq3":
                W = op.DequantizeLinear(w, ws, wz, _outputs=["wdq"])
            elif self.weights == "dq2":
                W = op.DequantizeLinear(w, ws, _outputs=["wdq"])
            else:
                W = w
            return op.MatMul(x, W, _outputs=["out"])

        def check(self, context, w, ws, wz, out, wdq=None, **_):
            arr_w = w.const_value if w.is_initializer() else None
            if arr_w is None:
                if self.weights != "const":
                    skipped.append((self.name, out.producer().name, "weight is not a constant"))
                return False
            if self.weights == "const":
                return True
            scale = init_array(ws)
            axis_attr = wdq.producer().attributes.get("axis")
            axis = axis_attr.as_int() if axis_attr is not None else 1
            reason = None
            if scale is None:
                reason = "weight scale is not a constant"
            elif scale.size != 1 and axis not in (1, -1):
                reason = f"weight quantized along axis {axis}; a reception needs per-output-channel (axis 1) scales"
            elif len(arr_w.shape) != 2:
                reason = "weight is not a 2-D matrix"
            if reason:
                skipped.append((self.name, out.producer().name, reason))
                return False
            return True

        def rewrite(self, op, times, w, ws, wz, out, **_):
            spec = emit_spec(ir.serde.serialize_node(times.producer())).receive_spec()
            ins = [times, w] + ([ws] if self.weights != "const" else []) + ([wz] if self.weights == "dq3" else [])
            mm = out.producer()
            proto = spec.make_node([x.name for x in ins], out.name, f"{mm.name or out.name}/receive")
            return emit_node(op, proto, ins)

    stages: dict = {}
    qdq = RewriteRuleSet([QdqToEmitRule.rule(True, stages), QdqToEmitRule.rule(False, stages)])
    recv = RewriteRuleSet([DecodeMatMulToReceiveRule.rule(k) for k in ("dq3", "dq2", "const")])
    return qdq, recv, skipped


def compile_ir(model, T: int | None) -> dict:
    """The prototype's hybrid compile core, in place on an onnx_ir Model."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.rewriter import RULE_NAME_TAG, RewritePass

    qdq, recv, skipped = build_ir_rules(T)
    counts = {}
    n0, i0 = len(model.graph), len(model.graph.initializers)
    for name, rules in (("qdq_to_emit", qdq), ("decode_matmul_to_receive", recv)):
        # RewritePass(rules)(model) runs exactly this; called directly to get the number of rewrites.
        # A rule set with remove_nodes=False rules already ends with RemoveUnusedNodesPass.
        counts[name] = rules.apply_to_model(model)
    assert RewritePass
    RemoveUnusedNodesPass()(model)  # dead code (nodes and initializers): a no-op after the rule sets' own sweep
    counts["nodes_delta"] = len(model.graph) - n0
    counts["initializers_removed"] = i0 - len(model.graph.initializers)
    for node in model.graph:  # the rewriter tags every new node with its rule name; ttfsc's graphs carry no tag
        node.metadata_props.pop(RULE_NAME_TAG, None)
    return {"rewritten": counts, "skipped": len(skipped)}


def child_onnxscript(qdq: str, T: int, out: str) -> dict:
    step = Steps()
    with step("import"):
        import onnx_ir as ir
        import onnxscript.rewriter  # noqa: F401 - import cost belongs to this variant

        import ttfsc.dialect  # noqa: F401 - the specs the prototype reuses
    with step("load"):
        model = ir.load(qdq)
    with step("compile"):
        info = compile_ir(model, T)
    with step("save"):
        ir.save(model, out, external_data=Path(out).name + ".data", size_threshold_bytes=1025)
    with step("to_proto"):
        proto = ir.serde.serialize_model(model)  # ir.to_proto
    with step("from_proto"):
        back = ir.serde.deserialize_model(proto)  # ir.from_proto
    assert len(back.graph) == len(model.graph)
    return {"times": step.times, "rss": step.rss, "rewritten": info["rewritten"], "skipped": info["skipped"],
            "nodes": len(model.graph)}


# ====================================================================== correctness of the prototype

def _node_key(n) -> tuple:
    attrs = tuple(sorted((a.name, a.SerializeToString()) for a in n.attribute))
    return (n.name, n.op_type, n.domain, tuple(n.input), tuple(n.output), attrs)


def compare_graphs(a_path: str, b_path: str) -> dict:
    """Same graph? Op multisets, TTFS attributes per node name, whole nodes, initializers, opsets."""
    import numpy as np
    import onnx

    from ttfsc.modelio import tensor_value
    a, b = (onnx.load(p, load_external_data=False) for p in (a_path, b_path))
    ops = [Counter((n.op_type, n.domain) for n in m.graph.node) for m in (a, b)]
    ttfs = [{n.name: {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
             for n in m.graph.node if n.domain == DOMAIN} for m in (a, b)]
    nodes = [Counter(_node_key(n) for n in m.graph.node) for m in (a, b)]
    inits = [{t.name: t for t in m.graph.initializer} for m in (a, b)]
    same_bytes = inits[0].keys() == inits[1].keys() and all(
        np.array_equal(tensor_value(inits[0][k], str(Path(a_path).parent)),
                       tensor_value(inits[1][k], str(Path(b_path).parent))) for k in inits[0])
    only_a = nodes[0] - nodes[1]
    only_b = nodes[1] - nodes[0]
    return {"ops_equal": ops[0] == ops[1], "ttfs_nodes": len(ttfs[0]), "ttfs_attrs_equal": ttfs[0] == ttfs[1],
            "nodes_equal": not only_a and not only_b, "only_ttfsc": [k[:3] for k in list(only_a)[:5]],
            "only_onnxscript": [k[:3] for k in list(only_b)[:5]],
            "initializers_equal": same_bytes, "n_initializers": (len(inits[0]), len(inits[1])),
            "metadata_equal": ({p.key: p.value for p in a.metadata_props}
                               == {p.key: p.value for p in b.metadata_props}),
            "value_info": (len(a.graph.value_info), len(b.graph.value_info)),
            "opsets": ({o.domain: o.version for o in a.opset_import} == {o.domain: o.version for o in b.opset_import}),
            "graph_io_equal": ([i.SerializeToString() for i in a.graph.input]
                               == [i.SerializeToString() for i in b.graph.input]
                               and [o.name for o in a.graph.output] == [o.name for o in b.graph.output])}


def compare_logits(a_path: str, b_path: str, tokens: int = 32, seed: int = 0) -> dict:
    """Both compiled models in ttfsc.runtime.open_session on one random token sequence: same logits?"""
    import numpy as np

    from ttfsc.runtime.generate import Generator
    from ttfsc.runtime.session import open_session
    out = []
    vocab = None
    for p in (a_path, b_path):
        gen = Generator(open_session(p), str(Path(p).parent))
        if vocab is None:
            vocab = int(gen.config.get("vocab_size") or 256)
            ids = [int(gen.config.get("bos_token_id") or 1)] + [int(x) for x in
                                                                np.random.default_rng(seed).integers(3, vocab, tokens)]
        out.append(gen.logits(ids))
    return {"tokens": len(ids), "logits_equal": bool(np.array_equal(out[0], out[1])),
            "max_abs_diff": float(np.abs(out[0] - out[1]).max())}


# ====================================================================== the several-consumer cases

def selftest() -> dict:
    """A small graph with the cases the two QANNs lack: one Clip -> Q read by two DQs (the second
    through an equal zero point in another initializer), one decode read by two MatMuls and an
    Add, a Q without Clip, a MatMul on a float weight, and a Q whose DQ has another scale (a skip).
    Both toolkits compile it; the graphs must be equal."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from ttfsc.passes.dead_code import DeadCode
    from ttfsc.passes.decode_matmul_to_receive import DecodeMatMulToReceivePass
    from ttfsc.passes.qdq_to_emit import QdqToEmit
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.float32(x), n) for n, x in
             (("lo", -31 / 32), ("hi", 1.0), ("s", 1 / 32), ("s2", 0.05))]
    inits += [numpy_helper.from_array(np.uint8(31), "z"), numpy_helper.from_array(np.uint8(32), "z2"),
              numpy_helper.from_array(np.uint8(31), "z_dup")]
    for k in range(3):
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (8, 8)).astype(np.int8), f"W{k}"),
                  numpy_helper.from_array(rng.random(8).astype(np.float32) / 100, f"ws{k}"),
                  numpy_helper.from_array(np.zeros(8, np.int8), f"wz{k}")]
    inits.append(numpy_helper.from_array(rng.random((8, 8)).astype(np.float32), "Wf"))
    N = helper.make_node
    nodes = [N("Clip", ["x", "lo", "hi"], ["xc"], name="clip"),
             N("QuantizeLinear", ["xc", "s", "z"], ["xq"], name="q"),
             N("DequantizeLinear", ["xq", "s", "z"], ["xd1"], name="dq1"),
             N("DequantizeLinear", ["xq", "s", "z_dup"], ["xd2"], name="dq2")]
    for k in range(3):
        nodes.append(N("DequantizeLinear", [f"W{k}", f"ws{k}", f"wz{k}"], [f"Wd{k}"], name=f"wdq{k}", axis=1))
    nodes += [N("MatMul", ["xd1", "Wd0"], ["m0"], name="mm0"), N("MatMul", ["xd1", "Wd1"], ["m1"], name="mm1"),
              N("Add", ["xd1", "xd2"], ["a"], name="add"), N("MatMul", ["xd2", "Wd2"], ["m2"], name="mm2"),
              N("Add", ["m0", "m1"], ["y0"], name="sum"),
              N("QuantizeLinear", ["y0", "s2", "z2"], ["yq"], name="q2"),   # its DQ has another scale: a skip
              N("DequantizeLinear", ["yq", "s", "z2"], ["yd"], name="dq3"),
              N("Add", ["m2", "a"], ["y1"], name="sum2"),
              N("QuantizeLinear", ["y1", "s", "z"], ["y1q"], name="q3"),  # no Clip: 256 levels (only -T auto)
              N("DequantizeLinear", ["y1q", "s", "z"], ["y1d"], name="dq4"),
              N("MatMul", ["y1d", "Wf"], ["mf"], name="mmf")]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8])  # noqa: E731
    graph = helper.make_graph(nodes, "selftest", [vi("x")], [vi("yd"), vi("mf")], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    out = {}
    for T in (64, None, 32):  # 64: q3 refuses (WindowMismatch) in both; None (-T auto): all; 32: refuse
        a = onnx.ModelProto()
        a.CopyFrom(proto)
        try:
            skips_a = sum(len(p.run(a).skipped) for p in (QdqToEmit(T), DecodeMatMulToReceivePass(), DeadCode()))
            a.opset_import.append(helper.make_opsetid(DOMAIN, 1))
            ra = "ok"
        except Exception as exc:  # noqa: BLE001 - both must refuse the same way
            ra = type(exc).__name__
        b = ir.from_proto(proto)
        try:
            skips_b = compile_ir(b, T)["skipped"]
            b = ir.to_proto(b)
            rb = "ok"
        except Exception as exc:  # noqa: BLE001
            rb = type(exc).__name__
        key = f"T={T}"
        out[key] = {"ttfsc": ra, "onnxscript": rb}
        if ra == rb == "ok":
            na, nb = Counter(_node_key(n) for n in a.graph.node), Counter(_node_key(n) for n in b.graph.node)
            out[key].update(nodes_equal=na == nb, skipped={"ttfsc": skips_a, "onnxscript": skips_b},
                            ops=dict(Counter(n.op_type for n in a.graph.node)),
                            initializers_equal=sorted(t.SerializeToString() for t in a.graph.initializer)
                            == sorted(t.SerializeToString() for t in b.graph.initializer),
                            diff=[k[:3] for k in (na - nb) + (nb - na)][:6])
    return out


# ====================================================================== stage groups of a --full twin

def group_shapes(path: str) -> dict:
    """What the neuron passes match on a `quantize --full` twin: how many groups, how big, how many shapes.

    Runs QdqToEmit(-T auto) and DecodeMatMulToReceivePass, then neuron_groups.extract_group on every
    emission, as the neuron passes do. A group's *structure* is its node list written with op types
    and input roles (spike k, side input, constant, earlier node): the number of distinct structures
    is the number of fixed onnxscript patterns that would be needed to match them one by one
    (before merging near-twins with OrValue / commute).
    """
    from ttfsc.graph import GraphIndex
    from ttfsc.modelio import load_model
    from ttfsc.passes.decode_matmul_to_receive import DecodeMatMulToReceivePass
    from ttfsc.passes.neuron_groups import extract_group, spike_dependent
    from ttfsc.passes.qdq_to_emit import QdqToEmit
    from ttfsc.passes.elementwise_neurons import ElementwiseNeurons
    from ttfsc.passes.kv_relay import KvRelay
    from ttfsc.passes.linear_neurons import LinearNeurons
    from ttfsc.passes.product_neurons import ProductNeurons
    from ttfsc.passes.rmsnorm_neurons import RMSNormNeurons
    from ttfsc.passes.softmax_neurons import SoftmaxNeurons
    neuron_passes = (ElementwiseNeurons, RMSNormNeurons, SoftmaxNeurons, ProductNeurons, KvRelay, LinearNeurons)
    m = load_model(path)
    QdqToEmit(None).run(m)
    DecodeMatMulToReceivePass().run(m)
    t0 = time.perf_counter()
    g = GraphIndex(m)
    dep = spike_dependent(g)
    groups = [grp for e in g.nodes if e.domain == DOMAIN and e.op_type == "TTFSEmit"
              for grp in [extract_group(g, e, dep)] if grp is not None]
    walk_s = time.perf_counter() - t0

    def structure(grp) -> str:
        role = {d: f"s{k}" for k, (d, _, _) in enumerate(grp.spikes)}
        role.update({x: "side" for x in grp.sides})
        role.update({x: "c" for x in grp.consts})
        out = []
        for i, n in enumerate(grp.nodes):
            out.append(f"{n.op_type}({','.join(role.get(x, '?') for x in n.input)})")
            role.update({o: f"n{i}" for o in n.output})
        return ";".join(out)

    rules = [r for p in neuron_passes for r in p().rules if hasattr(r, "accepts")]  # the pipeline's order
    by_rule: dict[str, dict] = {}
    for grp in groups:
        name = next((type(r).__name__ for r in rules if r.accepts(grp)), "(no rule)")
        d = by_rule.setdefault(name, {"groups": 0, "structures": set(), "nodes": [], "spikes": set(), "sides": set()})
        d["groups"] += 1
        d["structures"].add(structure(grp))
        d["nodes"].append(len(grp.nodes))
        d["spikes"].add(len(grp.spikes))
        d["sides"].add(len(grp.sides))
    sizes = [len(grp.nodes) for grp in groups]
    return {"model": path, "groups": len(groups), "extract_seconds": round(walk_s, 3),
            "nodes_per_group": [min(sizes), max(sizes)] if sizes else [],
            "distinct_structures": len({structure(grp) for grp in groups}),
            "by_rule": {k: {"groups": v["groups"], "structures": len(v["structures"]),
                            "nodes": [min(v["nodes"]), max(v["nodes"])], "spike_inputs": sorted(v["spikes"]),
                            "side_inputs": sorted(v["sides"])} for k, v in by_rule.items()}}


# ====================================================================== driver

def run_child(variant: str, qdq: str, T: int, out: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", variant, "--qdq", qdq, "-T", str(T), "--out", out],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{variant} child failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(res: dict[str, list[dict]]) -> str:
    def vals(variant, kind, step):
        return [r[kind][step] for r in res[variant] if step in r[kind]]

    def med(variant, kind, step):
        v = vals(variant, kind, step)
        return statistics.median(v) if v else None

    def ms(variant, step):
        v = vals(variant, "times", step)
        if not v:
            return "–"
        return f"{statistics.median(v) * 1e3:.0f} ({min(v) * 1e3:.0f}–{max(v) * 1e3:.0f})"

    rows = ["| step | ttfsc ms (min–max) | onnxscript ms (min–max) | onnxscript / ttfsc | peak RSS ttfsc MB "
            "| peak RSS onnxscript MB |", "|---|---:|---:|---:|---:|---:|"]
    names = {"import": "import (modules)", "load": "load", "compile": "compile core (3 passes)", "save": "save",
             "to_proto": "IR -> ModelProto (ir.serde)", "from_proto": "ModelProto -> IR (ir.serde)"}
    for step in STEPS:
        a, b = med("ttfsc", "times", step), med("onnxscript", "times", step)
        ra, rb = med("ttfsc", "rss", step), med("onnxscript", "rss", step)
        ratio = f"{b / a:.2f}" if a and b else "–"
        rows.append(f"| {names[step]} | {ms('ttfsc', step)} | {ms('onnxscript', step)} | {ratio} | "
                    f"{f'{ra:.0f}' if ra else '–'} | {f'{rb:.0f}' if rb else '–'} |")
    tot = {v: [sum(r["times"][s] for s in ("load", "compile", "save")) for r in res[v]] for v in res}
    ta, tb = statistics.median(tot["ttfsc"]), statistics.median(tot["onnxscript"])
    rows.append(f"| **load + compile + save** | **{ta * 1e3:.0f}** ({min(tot['ttfsc']) * 1e3:.0f}–"
                f"{max(tot['ttfsc']) * 1e3:.0f}) | **{tb * 1e3:.0f}** ({min(tot['onnxscript']) * 1e3:.0f}–"
                f"{max(tot['onnxscript']) * 1e3:.0f}) | **{tb / ta:.2f}** | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selftest", action="store_true", help="only the several-consumer graph; no --qdq needed")
    ap.add_argument("--groups", metavar="FULL_QDQ", help="only the stage-group census of a `quantize --full` twin")
    ap.add_argument("--qdq", help="QDQ model (.onnx, external data beside it)")
    ap.add_argument("-T", type=int, default=64, help="TTFS window (default 64)")
    ap.add_argument("--reps", type=int, default=5, help="child processes per variant; the median is reported")
    ap.add_argument("--keep", help="folder to keep the two compiled models in (default: a temporary one)")
    ap.add_argument("--child", choices=("ttfsc", "onnxscript"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.selftest:
        print(json.dumps(selftest(), indent=1))
        return 0
    if args.groups:
        print(json.dumps(group_shapes(args.groups), indent=1))
        return 0
    if not args.qdq:
        ap.error("--qdq is required")
    if args.child:
        fn = child_ttfsc if args.child == "ttfsc" else child_onnxscript
        print(json.dumps(fn(args.qdq, args.T, args.out)))
        return 0

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="graph_toolkit."))
    outs = {}
    for v in ("ttfsc", "onnxscript"):
        (work / v).mkdir(parents=True, exist_ok=True)
        outs[v] = str(work / v / "model.snn.onnx")
        for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.bin",
                     "tokenizer_config.json"):
            src = Path(args.qdq).parent / side
            if src.is_file():
                shutil.copy2(src, work / v / side)
    res: dict[str, list[dict]] = {"ttfsc": [], "onnxscript": []}
    for rep in range(args.reps):
        order = ("ttfsc", "onnxscript") if rep % 2 == 0 else ("onnxscript", "ttfsc")
        for v in order:
            res[v].append(run_child(v, args.qdq, args.T, outs[v]))
    g = compare_graphs(outs["ttfsc"], outs["onnxscript"])
    lg = compare_logits(outs["ttfsc"], outs["onnxscript"])
    r0a, r0b = res["ttfsc"][0], res["onnxscript"][0]
    import onnx_ir
    import onnxscript

    import ttfsc
    print(f"### {args.qdq} (-T {args.T}, {args.reps} reps, median)\n")
    print(f"ttfsc from {Path(ttfsc.__file__).parent}; onnxscript {onnxscript.__version__}, "
          f"onnx_ir {onnx_ir.__version__}\n")
    print(f"nodes after compile: ttfsc {r0a['nodes']}, onnxscript {r0b['nodes']}; "
          f"rewrites ttfsc {json.dumps(r0a['rewritten'])}; onnxscript {json.dumps(r0b['rewritten'])} "
          f"(skipped {r0b['skipped']})\n")
    print(table(res))
    print(f"\ncorrectness: {json.dumps(g)}")
    print(f"runtime: {json.dumps(lg)}")
    sizes = {v: sum(os.path.getsize(p) for p in (outs[v], outs[v] + ".data") if os.path.exists(p)) for v in outs}
    print(f"output bytes (.onnx + .data): {json.dumps(sizes)}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
