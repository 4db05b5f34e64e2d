"""``ttfsc quantize --full``: the fully quantized twin (QANN) that a fully spiking graph must equal.

The hybrid QANN (quantizer/qdq.py) quantizes only what linear layers read. A fully spiking
network also has to carry every other activation as spike times, so its exact twin must quantize
every tensor that crosses a stage boundary. This module rewrites the (rotated, smoothed) float
decoder into a standard QDQ model in which each decoder compute op sits in a *stage group*:

    DQ(a) [, DQ(b)] --float ops of the group--> result --Clip--> Q --> DQ --> next groups

Every activation input of a group comes from a per-tensor DequantizeLinear (scalar scale and zero
point, uint8 codes, or uint16 through the com.microsoft contrib ops above 8 bits), and its single
result goes into exactly one per-tensor Clip -> QuantizeLinear. Shape plumbing (Reshape,
Transpose, Unsqueeze, Expand, Slice, Concat, Cast, ...) may sit between a DQ and its group. The
groups and the *kind* of each quantizer (metadata ``ttfsc.full.groups``: Q node name -> kind;
the kind is also the Q node's name suffix ``[kind]``):

* ``residual``   embedding output and each residual Add: DQ(h) + DQ(linear out).
* ``rmsnorm_ms`` DQ(x) -> Pow 2 -> ReduceMean (mean square).
* ``rsqrt``      DQ(ms) -> Add eps -> Sqrt -> Div(1, .) (unary).
* ``product``    DQ(x) * DQ(r) -> Cast -> Mul gamma (a per-channel constant; ones after rotation);
                 QK^T (DQ(q_rot) * c, DQ(k) * c -> MatMul, c = 1/d^(1/4) constants);
                 PV (DQ(p) @ DQ(v)); gate (.) up (DQ(silu) * DQ(up)).
* ``linear_out`` DQ(x) @ DQ(int8 W) (every linear but lm_head: the logits stay float).
* ``rotary``     DQ(q or k) -> Mul cos, rotate_half (Slice, Neg, Concat), Mul sin, Add (linear with
                 per-position constant weights).
* ``silu``       DQ(g) -> Sigmoid, Mul(g, .) (one unary group: nothing quantized in between).
* ``lse``, ``sub``, ``exp``: softmax is decomposed (below).
* ``kv``         Concat(past, DQ(k or v)) -> Q with *the same* scale and zero point as the k/v
                 quantizer it concatenates (metadata ``ttfsc.full.kv``: kv Q -> source Q). The
                 ``present.*`` outputs are that DQ, so a fed-back past holds values of this very
                 grid and Q(past) is exact: the past enters as codes of the k/v quantizer, never
                 with a range of its own. Its range covers both new k/v and the past
                 (a PrefixQuant prefix cache included).

Softmax. ``Softmax(s + mask)`` becomes::

    lse = ReduceLogSumExp(DQ(s) + mask, axis -1)       group lse
    d   = DQ(s) - DQ(lse)                              group sub
    p   = Exp(DQ(d) + mask)                            group exp, p's zero point is 0

where ``mask`` is the export's additive attention mask (0 or -inf, a per-position constant like
rotary's cos/sin, never quantized). Masked positions are therefore left out of the log-sum-exp
exactly and get ``exp(-inf) = 0`` -> p code 0 exactly, whatever the score grid; the score
quantizer sees raw scores (no -inf) and every softmax range is calibrated on unmasked positions
only. The export's IsNaN/Where guard after Softmax (all-masked rows) is dropped: causal rows
always keep their own position. ``p`` is quantized with its zero point at 0 (range [0, max p]).

Widths. Each quantizer's width is, first match wins: ``--abits-for PATTERN=BITS`` on its tensor
name, ``--window CLASS=LEVELS``, the measured default ``abits + DEFAULT_EXTRA_BITS[CLASS]``
(benchmarks/full_twin.md). A width CLASS is the kind, except that the QK^T scores (kind
``product``) are class ``scores``; aliases ``softmax`` = scores+lse+sub+exp and ``rmsnorm`` =
rmsnorm_ms+rsqrt. ``kv`` always follows its source. Above 8 bits codes are uint16 (contrib Q/DQ).

Ranges: calibrated per tensor on the float model (with the same decomposed softmax) after the
prefix. Tensors a linear reads use ``--method`` (search: clipping of least layer-output MSE, as in
the hybrid QANN); the PV product's range is observed on the o_proj input (same values, permuted).
Everything else uses min/max (FULL_METHOD; "mse" is the measured alternative). Then the lower ends
of scores and differences are raised to where exp stops producing a nonzero p code
(``clip_softmax_tails``): min/max would spend most of their codes on values that end up as p = 0.

Widths and ranges are plain QDQ data: the twin is an ordinary onnxruntime model. Run it with
``session.disable_quant_qdq = 1`` for exact QDQ numerics when any linear input has 8 bits.
"""
from __future__ import annotations

import heapq
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ttfsc import modelio
from ttfsc.errors import TtfscError
from ttfsc.graph import GraphIndex, extra_outputs
from ttfsc.quantizer.calibration import Log, make_observer, session
from ttfsc.quantizer.config import FULL_KINDS as KINDS, WIDTHS, QuantConfig
from ttfsc.quantizer.prefix import calibration_feeds, save_prefix
from ttfsc.quantizer.qdq import (Names, activation_chain, activation_names, drop_unused_initializers, float_linears,
                                 quantize_weights, save_qann, use_contrib_domain)
from ttfsc.quantizer.ranges import SEARCH_RATIOS, ActParams, activation_params, fake_quant, searched_ranges
from ttfsc.runtime.generate import PREFIX_FILE, PREFIX_META, format_ids
from ttfsc.ttfs import MAX_BITS, window_for_bits

# extra bits over --abits per width class (benchmarks/full_twin.md). stories260K W8A6 leave-one-out
# from all-256: linear_out +0.72 PPL at 64 levels, rotary +0.55, residual +0.08, softmax +0.04,
# silu +0.04. SmolLM2 (1 window): RMSNorm at 4096 instead of 64 levels 54.8 -> 36.9 PPL (mean
# squares span 0..1150), residual at 256 -> 1024 levels 37 -> 30; scores at 256 do not help (30.4 -> 30.8).
DEFAULT_EXTRA_BITS: dict[str, int] = {"residual": 4, "rmsnorm_ms": 4, "rsqrt": 4, "linear_out": 2, "rotary": 2,
                                      "silu": 2, "lse": 2, "sub": 2, "exp": 2}
FULL_METHODS = ("minmax", "mse")
FULL_METHOD = "minmax"  # ranges of stage results no linear reads (benchmarks/full_twin.md)
MSE_VALUES = 1 << 15  # values per tensor kept (over all calibration sequences) for the "mse" search
SOFTMAX_TAILS = True  # clip score / difference ranges below what survives exp (clip_softmax_tails)
TAIL_POSITIONS = 8192  # longest row the score clipping is sized for (SmolLM2's context)
GROUPS_META, KV_META, WINDOWS_META = "ttfsc.full.groups", "ttfsc.full.kv", "ttfsc.full.windows"
FULL_META = "ttfsc.full"


def kind_bits(kind: str, abits: int, windows: dict[str, int]) -> int:
    """Width of a ``kind`` quantizer when no --abits-for pattern names its tensor."""
    if kind in windows:
        return windows[kind]
    return min(MAX_BITS, abits + DEFAULT_EXTRA_BITS.get(kind, 0))


# ---------------------------------------------------------------- the activation set

def activations(g: GraphIndex) -> set[str]:
    """Tensors computed from token embeddings or the past KV (Shape outputs are integers, not activations).

    The embedding is a table Gather by input_ids; a table Gather by position ids is a constant.
    """
    seeds = {i.name for i in g.graph.input if i.name.startswith("past_key_values.")}
    seeds.update(n.output[0] for n in g.nodes
                 if n.op_type == "Gather" and n.input[0] in g.inits and n.input[1:] == ["input_ids"])
    return g.reachable(seeds)


def _act_inputs(node: onnx.NodeProto, active: set[str]) -> list[str]:
    return [i for i in node.input if i in active]


# ---------------------------------------------------------------- softmax decomposition

def _const(model: onnx.ModelProto, names: Callable[[str], str], base: str, value: np.ndarray) -> str:
    name = names(base)
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def decompose_softmax(model: onnx.ModelProto, names: Callable[[str], str]) -> list[dict[str, str]]:
    """Rewrite every last-axis ``Softmax(s [+ mask])`` of an activation into lse / sub / exp (in place).

    Returns, per softmax, the tensors {"s", "lse", "d", "p", "mask"} (mask "" when there is none).
    """
    g = GraphIndex.live(model)
    active = activations(g)
    found = []
    new_nodes: dict[int, list[onnx.NodeProto]] = {}
    drop: set[int] = set()
    index = {id(n): i for i, n in enumerate(model.graph.node)}
    for node in list(model.graph.node):
        if node.op_type != "Softmax" or node.input[0] not in active:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if axis != -1:
            raise TtfscError(f"{node.name}: Softmax over axis {axis}; --full decomposes last-axis softmax only.")
        s, mask, add = node.input[0], "", g.producer.get(node.input[0])
        if add is not None and add.op_type == "Add" and len(_act_inputs(add, active)) == 1 and len(g.readers(s)) == 1:
            s = _act_inputs(add, active)[0]
            mask = next(i for i in add.input if i != s)
            drop.add(index[id(add)])
        base = node.name or s
        axes = _const(model, names, f"{base}_lse_axes", np.array([-1], np.int64))
        t = {k: names(f"{base}_{k}") for k in ("masked", "lse", "d", "dm", "p")}
        seq = []
        if mask:
            seq.append(helper.make_node("Add", [s, mask], [t["masked"]], name=names(f"{base}_lse/Add_mask")))
        seq.append(helper.make_node("ReduceLogSumExp", [t["masked"] if mask else s, axes], [t["lse"]], keepdims=1,
                                    name=names(f"{base}_lse/ReduceLogSumExp")))
        seq.append(helper.make_node("Sub", [s, t["lse"]], [t["d"]], name=names(f"{base}_sub/Sub")))
        if mask:
            seq.append(helper.make_node("Add", [t["d"], mask], [t["dm"]], name=names(f"{base}_exp/Add_mask")))
        seq.append(helper.make_node("Exp", [t["dm"] if mask else t["d"]], [t["p"]], name=names(f"{base}_exp/Exp")))
        new_nodes[index[id(node)]] = seq
        drop.add(index[id(node)])
        out = _drop_nan_guard(g, node.output[0], index, drop)
        _rename_uses(model, out, t["p"])
        found.append({"s": s, "lse": t["lse"], "d": t["d"], "p": t["p"], "mask": mask, "node": base})
    nodes, orphans = [], set()
    for i, node in enumerate(model.graph.node):
        nodes.extend(new_nodes.get(i, []))
        if i in drop:
            orphans.update(node.input)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_unused_initializers(model, orphans)  # the dropped guard's constants
    return found


def _drop_nan_guard(g: GraphIndex, p: str, index: dict[int, int], drop: set[int]) -> str:
    """``Where(IsNaN(p), 0, p)`` after the softmax (Optimum's all-masked-row guard): drop it, return its output."""
    users = g.consumers.get(p, [])
    isnan = [u for u in users if u.op_type == "IsNaN"]
    where = [u for u in users if u.op_type == "Where" and isnan and u.input[0] == isnan[0].output[0]]
    if len(users) == 2 and len(isnan) == 1 and len(where) == 1 and where[0].input[2] == p:
        drop.update({index[id(isnan[0])], index[id(where[0])]})
        return where[0].output[0]
    return p


def _rename_uses(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        for k, x in enumerate(node.input):
            if x == old:
                node.input[k] = new
    for o in model.graph.output:
        if o.name == old:
            raise TtfscError(f"softmax output {old} is a graph output; --full cannot decompose it.")


# ---------------------------------------------------------------- quantization points

@dataclass
class QPoint:
    """One stage-group result to quantize: where the Q goes and how its range is calibrated."""

    tensor: str                 # the group's result: Clip -> Q -> DQ is inserted after it
    kind: str
    calib: str = ""             # tensor observed for the range (same values, maybe permuted); default tensor
    linear_input: bool = False  # ``calib`` is read by linear layers: --method (search) applies
    mask: str = ""              # additive mask: only positions where it is 0 are calibrated
    shares: str = ""            # kv: the tensor of the quantizer whose parameters it reuses
    lo_zero: bool = False       # range starts at exactly 0 (softmax probabilities)
    width: str = ""             # width class (WIDTHS); default the kind

    def __post_init__(self) -> None:
        self.calib = self.calib or self.tensor
        self.width = self.width or self.kind


def plan(model: onnx.ModelProto, softmaxes: Sequence[dict[str, str]], linears: Sequence[onnx.NodeProto]) -> list[QPoint]:
    """Every quantization point of the decomposed float model, in graph order, each with its kind."""
    g = GraphIndex.live(model)
    active = activations(g)
    lin_ids = {id(n) for n in linears}
    lin_out = {n.output[0] for n in linears}
    lin_in = {n.input[0] for n in linears}
    points: dict[str, QPoint] = {}

    def add(p: QPoint) -> None:
        if p.tensor not in points:
            points[p.tensor] = p

    sm_nodes = {}
    for sm in softmaxes:
        sm_nodes[sm["s"]] = sm
    for node in model.graph.node:
        op, ins = node.op_type, _act_inputs(node, active)
        out = node.output[0] if node.output else ""
        if op == "Gather" and node.input[1:] == ["input_ids"] and out in active:
            add(QPoint(out, "residual"))  # the embedding starts the residual stream
        elif not ins or out not in active:
            continue
        elif id(node) in lin_ids:
            if out not in g.graph_outputs:
                add(QPoint(out, "linear_out"))
        elif op == "Add" and len(ins) == 2:
            kind = "residual" if any(g.carrier_source(i, active) in lin_out for i in ins) else "rotary"
            add(QPoint(out, kind))
        elif op == "ReduceMean":
            add(QPoint(out, "rmsnorm_ms"))
        elif op == "Div" and g.producer.get(ins[0]) is not None and g.producer[ins[0]].op_type == "Sqrt":
            add(QPoint(out, "rsqrt"))
        elif op == "Mul" and len(ins) == 2:
            add(_mul_point(g, active, node, lin_in))
        elif op == "MatMul" and len(ins) == 2:
            sm = sm_nodes.get(out)
            if sm is not None:
                add(QPoint(out, "product", mask=sm["mask"], width="scores"))
            else:
                sink = g.carrier_sink(out, lin_in)
                add(QPoint(out, "product", calib=sink, linear_input=sink in lin_in))
        elif op == "ReduceLogSumExp":
            add(QPoint(out, "lse"))
        elif op == "Sub":
            mask = next((s["mask"] for s in softmaxes if s["d"] == out), "")
            add(QPoint(out, "sub", mask=mask))
        elif op == "Exp":
            add(QPoint(out, "exp", lo_zero=True))
        elif op == "Concat" and any(i.startswith("past_key_values.") for i in ins):
            new = [i for i in ins if not i.startswith("past_key_values.")]
            add(QPoint(out, "kv", shares=g.carrier_source(new[0], active) if len(new) == 1 else ""))
    _finish(points, lin_in, g, active)
    return list(points.values())


def _mul_point(g: GraphIndex, active: set[str], node: onnx.NodeProto, lin_in: set[str]) -> QPoint:
    """A product of two activations: SiLU (x * Sigmoid(x)), RMSNorm apply (x * r, to the gain), or gate*up."""
    a, b = _act_inputs(node, active)
    prods = {g.producer[i].op_type if i in g.producer else "" for i in (a, b)}
    out = node.output[0]
    if "Sigmoid" in prods:
        return QPoint(out, "silu")
    end = out
    while True:  # RMSNorm: Mul(x, r) -> Cast -> Mul(gamma): quantize after the gain
        users = g.readers(end)
        if len(users) != 1 or end in lin_in:
            break
        u = users[0]
        if u.op_type == "Cast" or (u.op_type == "Mul" and len(_act_inputs(u, active)) == 1):
            end = u.output[0]
        else:
            break
    return QPoint(end, "product", linear_input=end in lin_in)


def _finish(points: dict[str, QPoint], lin_in: set[str], g: GraphIndex, active: set[str]) -> None:
    """Linear inputs get the linear-input calibration; a kv point's source must be a quantizer."""
    for p in points.values():
        if p.calib in lin_in:
            p.linear_input = True
        if p.kind == "kv" and p.shares not in points:
            raise TtfscError(f"{p.tensor}: the past is concatenated with {p.shares or 'several tensors'}, which is not "
                             "a quantized group result; --full expects Concat(past, k or v).")
    for x in lin_in:
        if g.carrier_source(x, active) not in points and x not in points:
            raise TtfscError(f"linear input {x} is not produced by a recognised stage group; --full supports "
                             "LLaMA decoders exported with `ttfsc export`.")


# ---------------------------------------------------------------- calibration

class MaskedMinMax:
    """Min/max over the positions an additive mask keeps (mask == 0); all positions without a mask.

    With ``keep`` > 0 it also keeps a seeded subsample of those values for the clipping search.
    """

    def __init__(self, keep: int = 0) -> None:
        self.lo, self.hi = np.inf, -np.inf
        self.keep, self.parts = keep, []
        self.rng = np.random.default_rng(0)

    def update(self, x: np.ndarray, mask: np.ndarray | None = None) -> None:
        if mask is not None:
            x = x[np.broadcast_to(mask == 0, x.shape)]
        if x.size:
            if not np.all(np.isfinite(x)):
                self.lo = self.hi = float("nan")
                return
            self.lo, self.hi = float(min(self.lo, x.min())), float(max(self.hi, x.max()))
            if self.keep:
                flat = np.asarray(x, np.float32).reshape(-1)
                self.parts.append(flat[self.rng.choice(flat.size, self.keep, replace=False)]
                                  if flat.size > self.keep else flat.copy())

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi

    def sample(self) -> np.ndarray:
        x = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        return x[self.rng.choice(x.size, self.keep, replace=False)] if x.size > self.keep else x


def mse_range(x: np.ndarray, lo: float, hi: float, bits: int, lo_zero: bool) -> tuple[float, float]:
    """The clipped range [r_lo*lo, r_hi*hi] of least squared quantization error of ``x`` itself.

    For stage results that feed a nonlinearity or a product rather than a linear layer, the
    error of the tensor is the proxy (minmax, ratio 1.0, is a candidate, so never worse on ``x``).
    """
    if not x.size:
        return lo, hi

    def score(r_lo: float, r_hi: float) -> float:
        return float(np.mean(np.square(fake_quant(x, activation_params(lo * r_lo, hi * r_hi, bits)) - x)))

    joint = not (lo_zero or lo >= 0)  # a range starting at 0 keeps its exact zero
    lo_ratios = SEARCH_RATIOS if joint else (1.0,)
    best = min((score(r if joint else 1.0, r), r if joint else 1.0, r) for r in SEARCH_RATIOS)
    best = min([best] + [(score(r, best[2]), r, best[2]) for r in lo_ratios])
    best = min([best] + [(score(best[1], r), best[1], r) for r in SEARCH_RATIOS])
    return lo * best[1], hi * best[2]


def calibrate_points(sess: Any, points: Sequence[QPoint], feeds: Sequence[dict[str, np.ndarray]],
                     search_observer: Callable[[], Any] | None) -> dict[str, Any]:
    """Observers per calibration tensor: ``search_observer`` (rows) for linear inputs, masked min/max otherwise."""
    obs: dict[str, Any] = {}
    keep = -(-MSE_VALUES // max(1, len(feeds))) if FULL_METHOD == "mse" else 0
    for p in points:
        if p.calib not in obs:
            obs[p.calib] = search_observer() if (p.linear_input and search_observer) else MaskedMinMax(keep)
    masks = sorted({p.mask for p in points if p.mask})
    fetch = list(obs) + [m for m in masks if m not in obs]
    for f in feeds:
        values = dict(zip(fetch, sess.run(fetch, f)))
        for p in points:
            ob = obs[p.calib]
            x = values[p.calib]
            if isinstance(ob, MaskedMinMax):
                ob.update(x, values[p.mask] if p.mask else None)
        for name, ob in obs.items():
            if not isinstance(ob, MaskedMinMax):
                ob.update(values[name])
    return obs


def point_ranges(points: Sequence[QPoint], observers: dict[str, Any],
                 searched: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """(lo, hi) per point tensor; probabilities start at 0; kv and its source share the union."""
    ranges = {}
    for p in points:
        lo, hi = searched.get(p.calib) or observers[p.calib].range()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise TtfscError(f"{p.tensor} ({p.kind}): calibrated range [{lo}, {hi}] is not finite; "
                             "--full needs every stage finite (check the calibration text and the mask).")
        ranges[p.tensor] = (0.0 if p.lo_zero else lo, hi)
    for p in points:
        if p.kind == "kv":
            lo = min(ranges[p.tensor][0], ranges[p.shares][0])
            hi = max(ranges[p.tensor][1], ranges[p.shares][1])
            ranges[p.tensor] = ranges[p.shares] = (lo, hi)
    return ranges


def clip_softmax_tails(ranges: dict[str, tuple[float, float]], softmaxes: Sequence[dict[str, str]],
                       width: dict[str, int]) -> None:
    """Raise the lower ends of scores and differences to where they stop mattering (in place).

    Min/max ranges of s and d reach far below anything that survives exp (SmolLM2/stories260K:
    d down to -110 while p's smallest nonzero code needs d > ln(scale_p / 2)), so most of their
    codes would be wasted. Any d below ``ln(scale_p / 4)`` gives p code 0, so clipping d there
    changes no p code (the factor 4 absorbs the rounding of the zero point). A score enters the
    log-sum-exp too, where a clipped tail adds at most ``exp(lo_s - lse)`` per position; with
    ``lo_s = min lse + ln(scale_p / 4) - ln(TAIL_POSITIONS)`` the tails of a whole row add less than
    a quarter of p's step, and a row with a larger lse is affected even less.
    """
    for sm in softmaxes:
        s, lse, d, p = sm["s"], sm["lse"], sm["d"], sm["p"]
        n_p = window_for_bits(width[p]) - 1
        floor_d = float(np.log(0.25 * ranges[p][1] / n_p))
        ranges[d] = (max(ranges[d][0], floor_d), ranges[d][1])
        floor_s = ranges[lse][0] + floor_d - float(np.log(TAIL_POSITIONS))
        ranges[s] = (max(ranges[s][0], floor_s), ranges[s][1])


# ---------------------------------------------------------------- graph rewriting

def insert_chains(model: onnx.ModelProto, points: Sequence[QPoint], params: dict[str, ActParams],
                  names: Names) -> tuple[dict[str, str], dict[str, str]]:
    """Clip -> Q -> DQ after every point; all readers read the DQ. Returns {Q node: kind}, {kv Q: source Q}."""
    g = GraphIndex.live(model)
    kinds, q_of, new_nodes = {}, {}, []
    for p in points:
        x = p.tensor
        if x in g.graph_outputs:  # present.*: the float tensor is renamed and the graph output becomes the DQ
            pre = names(f"{x}_prequant")
            producer = g.producer[x]
            producer.output[list(producer.output).index(x)] = pre
            nodes, inits, _ = activation_chain(pre, params[x], names)
            nodes[-1].output[0] = x
        else:
            nodes, inits, dq = activation_chain(x, params[x], names)
            for r in g.consumers.get(x, []):
                r.input[:] = [dq if i == x else i for i in r.input]
        for n in nodes:
            n.name = f"{n.name}[{p.kind}]"
        model.graph.initializer.extend(inits)
        new_nodes += nodes
        q = next(n for n in nodes if n.op_type == "QuantizeLinear")
        kinds[q.name] = p.kind
        q_of[x] = q.name
    model.graph.node.extend(new_nodes)
    toposort(model)
    kv = {q_of[p.tensor]: q_of[p.shares] for p in points if p.kind == "kv"}
    return kinds, kv


def toposort(model: onnx.ModelProto) -> None:
    """Order nodes so every input is produced before use, keeping the original order where it already is."""
    nodes = list(model.graph.node)
    produced = {o: i for i, n in enumerate(nodes) for o in n.output}
    deps = [[produced[x] for x in n.input if x in produced] for n in nodes]
    users: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise TtfscError("internal: the --full rewrite made a cycle in the graph")
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)


# ---------------------------------------------------------------- reading the groups back

@dataclass
class Group:
    """One stage group of a --full model: its kind, Q node, float member nodes and input DQ nodes."""

    kind: str
    q: onnx.NodeProto
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inputs: list[onnx.NodeProto] = field(default_factory=list)


def stage_groups(model: onnx.ModelProto) -> list[Group]:
    """The groups of a --full QDQ model, read from its metadata and walked back from each Q to its DQs."""
    meta = {p.key: p.value for p in model.metadata_props}
    if GROUPS_META not in meta:
        raise TtfscError(f"model has no {GROUPS_META} metadata; quantize it with `ttfsc quantize --full`.")
    kinds = json.loads(meta[GROUPS_META])
    g = GraphIndex.live(model)
    active = activations(g)
    by_name = {n.name: n for n in model.graph.node}
    out = []
    for qname, kind in kinds.items():
        q = by_name[qname]
        group = Group(kind, q)
        seen: set[int] = set()
        stack = [q.input[0]]
        while stack:
            t = stack.pop()
            node = g.producer.get(t)
            if node is None or t not in active or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "DequantizeLinear":
                group.inputs.append(node)
                continue
            if node.op_type != "Clip" or node is not g.producer.get(q.input[0]):
                group.nodes.append(node)
            stack.extend(node.input)
        out.append(group)
    return out


# ---------------------------------------------------------------- entry point

def quantize_float_full(tf: Any, original: str, out_path: str, config: QuantConfig, log: Log) -> dict:
    """The --full counterpart of quantize.quantize_float: calibrate every stage of the transformed float
    model ``tf.path`` (a transforms.Transform), write the twin and its prefix."""
    path, abits, wbits, method = tf.path, config.abits, config.wbits, config.method
    overrides, windows = config.overrides, config.kind_windows
    model = modelio.load_model(path)
    names = Names(model)
    softmaxes = decompose_softmax(model, names)
    linears = float_linears(model, original)
    points = plan(model, softmaxes, linears)
    width = {p.tensor: _point_bits(p, abits, windows, overrides) for p in points}
    width.update({p.tensor: width[p.shares] for p in points if p.kind == "kv"})
    t0 = time.perf_counter()
    ranges, prefix, desc = _calibrate(model, path, linears, points, width, config, tf.prefix_mode, log)
    if SOFTMAX_TAILS:
        clip_softmax_tails(ranges, softmaxes, width)
    params = {t: activation_params(lo, hi, width[t]) for t, (lo, hi) in ranges.items()}
    t_calib = time.perf_counter() - t0
    used = {k: window_for_bits(kind_bits(k, abits, windows)) for k in WIDTHS}
    meta = {"ttfsc.abits": str(abits), "ttfsc.wbits": str(wbits), "ttfsc.method": method,
            "ttfsc.abits_for": ",".join(f"{k}={v}" for k, v in overrides.items()),
            "ttfsc.calibration": desc, PREFIX_META: format_ids(prefix.ids) if prefix else "",
            WINDOWS_META: json.dumps(used), **tf.meta}
    n_weights = write_full(model, linears, points, params, wbits, meta, str(out_path))
    if prefix is not None:
        save_prefix(prefix, Path(out_path).resolve().parent / PREFIX_FILE)
    log(f"full twin: {n_weights} weights to int8, {len(points)} activation quantizers ({_count(points)}); "
        f"windows {used}; calibration {desc} ({t_calib:.1f}s)")
    log(f"wrote {out_path}")
    return {"model": original, "output": str(out_path), "full": True, "wbits": wbits, "abits": abits,
            "method": method, "weights": n_weights, "activations": len(points), "windows": used,
            "calibration": desc, "calibration_seconds": round(t_calib, 3), "rotation": tf.meta["ttfsc.rotation"],
            "smoothing": tf.meta["ttfsc.smoothing"],
            "prefix": {"tokens": list(prefix.ids), "kv_bytes": prefix.kv_bytes} if prefix else None,
            "ranges": {p.tensor: {"kind": p.kind, "width": p.width, "min": ranges[p.tensor][0], "max": ranges[p.tensor][1],
                                  "scale": float(params[p.tensor].scale), "zero_point": params[p.tensor].zero_point,
                                  "levels": params[p.tensor].N + 1} for p in points}}


def _calibrate(model: onnx.ModelProto, path: str, linears: list[onnx.NodeProto], points: list[QPoint],
               width: dict[str, int], config: QuantConfig, prefix_mode: Any,
               log: Log) -> tuple[dict[str, tuple[float, float]], Any, str]:
    """Ranges of every point on the decomposed float model, after the prefix (chosen as in the hybrid QANN)."""
    method = config.method
    acts = activation_names(model, linears)
    calib_names = sorted({p.calib for p in points} | {p.mask for p in points if p.mask} | set(acts))
    with extra_outputs(model, calib_names), session(model, path) as sess:
        feeds, prefix, desc = calibration_feeds(sess, path, acts, config.calib, prefix_mode, config.calib_samples,
                                                config.calib_seqlen, log)
        search = make_observer(method, config.percentile, len(feeds)) if method != "minmax" else None
        observers = calibrate_points(sess, points, feeds, search)
    lin_obs = {n: ob for n, ob in observers.items() if not isinstance(ob, MaskedMinMax)}
    searched: dict[str, tuple[float, float]] = {}
    if method == "search":
        bits_of = {p.calib: width[p.tensor] for p in points}
        searched, _ = searched_ranges(model, linears, lin_obs, lambda n: bits_of[n])
    elif method == "percentile":
        searched = {n: ob.range() for n, ob in lin_obs.items()}
    if FULL_METHOD == "mse":
        for p in points:
            ob = observers[p.calib]
            if isinstance(ob, MaskedMinMax) and p.calib not in searched and np.all(np.isfinite(ob.range())):
                searched[p.calib] = mse_range(ob.sample(), *ob.range(), width[p.tensor], p.lo_zero)
    return point_ranges(points, observers, searched), prefix, desc


def _point_bits(p: QPoint, abits: int, windows: dict[str, int], abits_for: dict[str, int] | None) -> int:
    """--abits-for on the tensor (or its calibration name), else the kind's window."""
    for pattern, bits in (abits_for or {}).items():
        if pattern in p.tensor or pattern in p.calib:
            return bits
    return kind_bits(p.width, abits, windows)


def _count(points: Iterable[QPoint]) -> str:
    c: dict[str, int] = defaultdict(int)
    for p in points:
        c[p.kind] += 1
    return ", ".join(f"{k} {c[k]}" for k in KINDS if c[k])


def write_full(model: onnx.ModelProto, linears: list[onnx.NodeProto], points: list[QPoint], params: dict[str, ActParams],
               wbits: int, meta: dict[str, str], out_path: str) -> int:
    """Weights to int8 + every point's Clip -> Q -> DQ; save atomically. Returns the number of weights."""
    with modelio.SpillFile.beside(out_path, "qweights") as spill:
        w_chains, replaced = quantize_weights(model, linears, wbits, spill)
        for nodes, _ in w_chains:
            model.graph.node.extend(nodes)
        kinds, kv = insert_chains(model, points, params, Names(model))
        use_contrib_domain(model, params.values())
        full_meta = {**meta, FULL_META: "1", GROUPS_META: json.dumps(kinds), KV_META: json.dumps(kv)}
        return save_qann(model, replaced, full_meta, out_path)
