"""Spiking coverage of a compiled model: which decoder-block ops are TTFS neurons, which are not.

Reported by ``ttfsc compile --json`` (``coverage``). Nodes of the decoder blocks (names with
``layers.<i>``) fall in three classes:

* ``ttfs``: TTFS stages (TTFSNeuron, TTFSReceive, TTFSEmit) and decodes;
* ``standard_on_activations``: standard ops whose *values* depend on spikes (a float RMSNorm,
  softmax or SiLU of a hybrid compile, or anything a neuron pass could not take);
* ``wiring``: data movement (Reshape, Transpose, Concat, ...) of spike times or values: no
  arithmetic, 0 operations;
* ``standard_control``: standard ops on shapes, positions and the mask only (no activation
  value passes through them: reshape arithmetic, the causal mask, rotary's cos/sin).

Operations are counted per token over a probe forward of ``context`` tokens (shapes are only
known at run time for a KV-cached export): a reception costs I accumulations per output
neuron (fixed int8 weights), a TTFSNeuron what NeuronSpec.ops says (fan-in accumulations,
multiplications for product synapses), a standard MatMul K multiply-accumulates per output, a
standard elementwise op one operation per output element, a reduction one per input element.
Emissions cost spikes, not arithmetic, and are counted as 0 operations here.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from ttfsc.dialect import stage_steps
from ttfsc.graph import DATA_MOVEMENT, GraphIndex
from ttfsc.neuron import NeuronSpec, is_neuron
from ttfsc.passes.neuron_groups import spike_dependent
from ttfsc.runtime.generate import Generator
from ttfsc.runtime.session import open_session
from ttfsc.ttfs import DOMAIN

BLOCK = re.compile(r"layers\.(\d+)")
MULS = {"Mul", "Div", "MatMul", "Gemm", "Pow"}
ADDS = {"Add", "Sub", "Sum"}
_NP = {TensorProto.INT64: np.int64, TensorProto.INT32: np.int32, TensorProto.FLOAT: np.float32,
       TensorProto.BOOL: np.bool_}


def block_of(node: onnx.NodeProto) -> int | None:
    m = BLOCK.search(node.name) or next((BLOCK.search(o) for o in node.output if BLOCK.search(o)), None)
    return int(m.group(1)) if m else None


def coverage(model: onnx.ModelProto, model_dir: str | None = None, context: int = 16) -> dict:
    """Counts by class and operations per token by class, over the decoder blocks."""
    dep = spike_dependent(GraphIndex(model))
    blocks = [n for n in model.graph.node if block_of(n) is not None]
    classes = {id(n): _class(n, dep) for n in blocks}
    shapes, keys, tokens = _probe_shapes(model, blocks, model_dir, context)
    ops = {c: Counter() for c in ("ttfs", "standard_on_activations")}
    for n in blocks:
        c = classes[id(n)]
        if c in ops:
            ops[c].update(_ops(n, shapes, keys, model))
    per_tok = {c: {k: v / tokens for k, v in o.items()} for c, o in ops.items()}
    total = {c: sum(o.values()) for c, o in per_tok.items()}
    muls = {c: o.get("muls", 0.0) for c, o in per_tok.items()}
    return {
        "decoder_blocks": len({block_of(n) for n in blocks}),
        "nodes": dict(Counter(classes.values())),
        "ttfs_ops": dict(Counter(n.op_type for n in blocks if classes[id(n)] == "ttfs")),
        "standard_ops_on_activations": dict(Counter(n.op_type for n in blocks
                                                    if classes[id(n)] == "standard_on_activations")),
        "probe_tokens": tokens,
        "ops_per_token": per_tok,
        "ttfs_share_of_ops": total["ttfs"] / max(sum(total.values()), 1e-30),
        "ttfs_share_of_multiplies": muls["ttfs"] / max(sum(muls.values()), 1e-30),
    }


def stages_per_block(model: onnx.ModelProto) -> dict:
    """Emissions (stages) and their time steps in each decoder block."""
    out: dict = {}
    for n in model.graph.node:
        steps, b = stage_steps(n), block_of(n)
        if steps and b is not None:
            e = out.setdefault(str(b), {"stages": 0, "steps": 0})
            e["stages"] += 1
            e["steps"] += steps
    return out


def neuron_fan_in(spec: NeuronSpec, in_shapes: Sequence[tuple[int, ...] | None], keys: int) -> int:
    """Synapses per output neuron of a TTFSNeuron, with a fan-in left open at compile time resolved.

    Here, below the analysis tools, because both this coverage and the energy report
    (analysis/energy.py) count a neuron's synapses by this one rule.

    ``in_shapes``: the run's shapes of the node's inputs (spike inputs first, then side inputs
    and constants); ``keys``: the attention's key count on that run. Passes write -1 when the
    summed axis is dynamic in the export: a wired linear (o_proj) sums over its weight's rows,
    a product (P.V) over the keys, the others (mean square, log-sum-exp) over their input's
    last axis.
    """
    if spec.fan_in > 0:
        return int(spec.fan_in)
    if spec.target == "matmul_weights":
        w = next((s for s in in_shapes[spec.n_spike:] if s is not None and len(s) == 2), None)
        if w is not None:
            return int(w[0])
    first = in_shapes[0] if in_shapes else None
    if spec.kind == "product" or not first:
        return int(keys)
    return int(first[-1])


def neuron_ops(spec: NeuronSpec, out_size: int, fan_in: int) -> tuple[float, float]:
    """(accumulations, multiplications) of all ``out_size`` neurons of a TTFSNeuron, every synapse counted."""
    adds, muls = spec.ops(fan_in)
    return float(out_size) * adds, float(out_size) * muls


def _class(n: onnx.NodeProto, dep: set[str]) -> str:
    if n.domain == DOMAIN:
        return "ttfs"
    if n.op_type not in ("Shape", "Size") and any(i in dep for i in n.input):
        return "wiring" if n.op_type in DATA_MOVEMENT else "standard_on_activations"
    return "standard_control"


def _ops(n: onnx.NodeProto, shapes: dict, keys: int, model: onnx.ModelProto) -> Counter:
    """Operations of one node over the probe (adds / muls / other)."""
    out = shapes.get(n.output[0])
    if out is None:
        return Counter()
    size = float(np.prod(out)) if len(out) else 1.0
    if is_neuron(n):
        spec = NeuronSpec.from_node(n)
        adds, muls = neuron_ops(spec, size, neuron_fan_in(spec, [shapes.get(i) for i in n.input], keys))
        return Counter(adds=adds, muls=muls)
    if n.domain == DOMAIN and n.op_type == "TTFSReceive":
        w = next((t for t in model.graph.initializer if t.name == n.input[1]), None)
        k = w.dims[0] if w is not None else 1
        return Counter(adds=size * k)
    if n.domain == DOMAIN:
        return Counter()
    if n.op_type in ("MatMul", "Gemm"):
        a = shapes.get(n.input[0])
        k = a[-1] if a else 1
        return Counter(adds=size * k, muls=size * k)
    if n.op_type.startswith("Reduce"):
        a = shapes.get(n.input[0])
        return Counter(adds=float(np.prod(a)) if a else size)
    kind = "muls" if n.op_type in MULS else "adds" if n.op_type in ADDS else "other"
    return Counter({kind: size})


def _probe_shapes(model: onnx.ModelProto, nodes: list, model_dir: str | None, context: int):
    """Run the lowered model once; return tensor shapes, key count and token count of the probe."""
    names = {x for n in nodes for x in list(n.output) + list(n.input) if x}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input} | \
        {t.name for t in probe.graph.initializer}
    fetch = sorted(names - {t.name for t in probe.graph.initializer})
    for name in sorted(names - have):
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    sess = open_session(probe)
    feeds, tokens, keys = _feeds(sess, model_dir, context)
    avail = {o.name for o in sess.get_outputs()}
    fetch = [f for f in fetch if f in avail]
    shapes = {name: tuple(v.shape) for name, v in zip(fetch, sess.run(fetch, feeds))}
    shapes.update({k: tuple(v.shape) for k, v in feeds.items()})
    return shapes, keys, tokens


def _feeds(sess, model_dir: str | None, context: int) -> tuple[dict, int, int]:
    """An LLM's feeds for ``context`` tokens (after its prefix), or ones for a static-shape graph."""
    if "input_ids" in {i.name for i in sess.get_inputs()}:
        gen = Generator(sess, model_dir)
        ids = np.arange(context, dtype=np.int64)[None, :] % 3 + 3
        feeds = gen.feeds(ids, None)
        keys = feeds["attention_mask"].shape[1] if "attention_mask" in feeds else context
        return feeds, context, keys
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}.get(i.type, np.float32)
        feeds[i.name] = np.ones(shape, dtype=dtype)
    return feeds, 1, context
