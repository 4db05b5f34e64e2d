"""Shared machinery of the neuron passes: find a stage group, describe it, build its TTFSNeuron.

Not a pass itself. After ``qdq_to_emit`` a fully quantized twin's stage group reads

    TTFSEmit(prev) -> TTFSDecode -> [shape plumbing] -> float ops -> TTFSEmit(this)

(the QANN's DequantizeLinear -> ops -> QuantizeLinear). ``extract_group`` walks back from one
emission's potential to the decodes (spike inputs), constants and *side inputs* (tensors that
depend on no spike at all: rotary cos/sin gathered by position, the attention mask, the past
KV cache of a non-spiking prefix). A walk that meets any other TTFS output (a reception's
potential, i.e. a hybrid graph) gives no group, so hybrid compiles are untouched.

Each neuron pass (one per file) classifies groups with its own ``accepts`` and supplies the
Theorem-2 kernels; ``NeuronRule`` does the rest: the body graph (the QANN's own float ops, so the
lowering is bit-exact), the realised table of one-input elementwise neurons (the body run in
onnxruntime on every input time), and the node replacing the emission.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ttfsc.dialect import DECODE, EMIT, EmitSpec, decode_spec, time_elem_type
from ttfsc.graph import DATA_MOVEMENT, GraphIndex, copy_node
from ttfsc.modelio import tensor_value
from ttfsc.neuron import NeuronSpec, is_neuron
from ttfsc.passes.base import Match, Rule
from ttfsc.runtime.session import exact_options, lower_model, open_session
from ttfsc.ttfs import DOMAIN, UniformStage, decode_times, theorem2_eta, time_dtype

#: elementwise arithmetic a one-input table neuron may contain
ELEMENTWISE = {"Sigmoid", "Mul", "Add", "Sub", "Div", "Sqrt", "Exp", "Log", "Pow", "Erf", "Tanh", "Neg",
               "Reciprocal", "Relu", "Identity", "Cast", "Max", "Min", "Clip", "Softplus", "Abs", "Constant"}
MAX_GROUP_NODES = 64


@dataclass
class Group:
    """One stage group: the float ops between spike inputs and one emission."""

    emit: onnx.NodeProto
    root: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    spikes: list[tuple[str, str, onnx.NodeProto]] = field(default_factory=list)  # (decoded, times, decode)
    sides: list[str] = field(default_factory=list)
    consts: list[str] = field(default_factory=list)
    const_values: dict = field(default_factory=dict)

    @property
    def op_types(self) -> list[str]:
        return [n.op_type for n in self.nodes]

    @property
    def compute_ops(self) -> list[str]:
        return [n.op_type for n in self.nodes if n.op_type not in DATA_MOVEMENT]

    def spike_derived(self) -> set[str]:
        """Tensors of the body that depend on a spike input."""
        live = {d for d, _, _ in self.spikes}
        for n in self.nodes:
            if any(i in live for i in n.input):
                live.update(o for o in n.output if o)
        return live

    def activation_products(self) -> list[onnx.NodeProto]:
        """Mul/MatMul/Div nodes whose two operands both depend on spikes: products of activations."""
        live = self.spike_derived()
        return [n for n in self.nodes if n.op_type in ("Mul", "MatMul", "Div", "Gemm")
                and len(n.input) >= 2 and n.input[0] in live and n.input[1] in live]


#: ops whose output depends on a tensor's shape only, never on its values
SHAPE_ONLY = {"Shape", "Size"}


def spike_dependent(g: GraphIndex) -> set[str]:
    """Every tensor whose *values* depend on a TTFS node (spike times, decodes, potentials).

    Shapes do not: a Shape of a decoded tensor (the export's reshape arithmetic) is a side input.
    """
    live: set[str] = set()
    for n in g.nodes:
        if n.op_type in SHAPE_ONLY:
            continue
        if n.domain == DOMAIN or any(i in live for i in n.input):
            live.update(o for o in n.output if o)
    return live


def extract_group(g: GraphIndex, emit: onnx.NodeProto, dep: set[str]) -> Group | None:
    """The group feeding ``emit``, or None when it is not one (hybrid graph, linear stage, input)."""
    root = emit.input[0]
    p = g.producer.get(root)
    if p is None or p.domain == DOMAIN:
        return None
    grp, seen, stack = Group(emit, root), set(), [root]
    while stack:
        x = stack.pop()
        if x in seen or not x:
            continue
        seen.add(x)
        p = g.producer.get(x)
        if g.is_const(x):
            grp.consts.append(x)
            grp.const_values[x] = g.const(x)
        elif p is not None and p.domain == DOMAIN and p.op_type == DECODE:
            grp.spikes.append((x, p.input[0], p))
        elif x not in dep and (p is None or p.op_type != "Constant"):
            grp.sides.append(x)
        elif p is None or p.domain == DOMAIN or len(grp.nodes) >= MAX_GROUP_NODES:
            return None
        else:
            grp.nodes.append(p)
            stack.extend(p.input)
    if not grp.spikes:
        return None
    order = {id(n): i for i, n in enumerate(g.nodes)}
    grp.nodes.sort(key=lambda n: order[id(n)])
    grp.spikes.sort(key=lambda s: _first_use(grp, s[0]))
    return grp


def _first_use(grp: Group, name: str) -> tuple[int, int]:
    for i, n in enumerate(grp.nodes):
        if name in n.input:
            return i, list(n.input).index(name)
    return len(grp.nodes), 0


# ------------------------------------------------------------------ types and shapes

def tensor_info(model: onnx.ModelProto) -> dict[str, tuple[int, list]]:
    """Element type and shape of every tensor, inferred on the lowered graph (TTFS ops are opaque)."""
    low = lower_model(model)
    try:
        low = onnx.shape_inference.infer_shapes(low, strict_mode=False)
    except Exception:  # noqa: BLE001 - shapes only refine op counts; types fall back to float
        pass
    out = {}
    for vi in list(low.graph.value_info) + list(low.graph.input) + list(low.graph.output):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out[vi.name] = (tt.elem_type or TensorProto.FLOAT, dims if tt.HasField("shape") else None)
    for t in low.graph.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    return out


def build_body(g: GraphIndex, grp: Group, info: dict) -> tuple[onnx.GraphProto, list[str]]:
    """The group as a standalone graph, and the node inputs that feed its graph inputs in order."""
    names = [d for d, _, _ in grp.spikes] + grp.sides + grp.consts
    scope = f"{grp.emit.name or grp.emit.output[0]}|"  # body names must not repeat outer ones (SSA)
    inputs = []
    for k, name in enumerate(names):
        if k < len(grp.spikes):
            elem = TensorProto.FLOAT
        elif name in g.inits.by_name:
            elem = g.inits.by_name[name].data_type
        else:
            elem = info.get(name, (TensorProto.FLOAT, None))[0]
        inputs.append(helper.make_tensor_value_info(scope + name, elem, None))
    nodes = []
    for n in grp.nodes:
        c = copy_node(n)
        c.input[:] = [scope + x if x else x for x in c.input]
        c.output[:] = [scope + x if x else x for x in c.output]
        nodes.append(c)
    body = helper.make_graph(nodes, f"{grp.emit.name}/body", inputs,
                             [helper.make_tensor_value_info(scope + grp.root, TensorProto.FLOAT, None)])
    feeds = [t for _, t, _ in grp.spikes] + grp.sides + grp.consts
    return body, feeds


def static_dim(info: dict, name: str, axis: int = -1) -> int:
    """A static dimension of a tensor, or -1 when unknown / symbolic (e.g. the context length)."""
    shape = info.get(name, (None, None))[1]
    if not shape:
        return -1
    try:
        d = shape[axis]
    except IndexError:
        return -1
    return d if isinstance(d, int) and d > 0 else -1


# ------------------------------------------------------------------ float64 target of an elementwise body

def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


_UNARY = {"Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "Sqrt": np.sqrt, "Exp": np.exp, "Log": np.log,
          "Erf": _erf, "Tanh": np.tanh, "Neg": np.negative, "Reciprocal": lambda x: 1.0 / x,
          "Relu": lambda x: np.maximum(x, 0.0), "Identity": lambda x: x, "Cast": lambda x: x,
          "Softplus": lambda x: np.logaddexp(0.0, x), "Abs": np.abs}
_BINARY = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide, "Pow": np.power,
           "Max": np.maximum, "Min": np.minimum}


def eval_body_f64(body: onnx.GraphProto, feeds: dict[str, np.ndarray], base_dir: str | None = None) -> np.ndarray:
    """Evaluate an elementwise body in float64 numpy: the target f, free of float32 rounding.

    ``base_dir``: the model's folder, where a Constant's external value may be read (checked).
    """
    env = {k: np.asarray(v, dtype=np.float64) for k, v in feeds.items()}
    with np.errstate(all="ignore"):
        for n in body.node:
            if n.op_type == "Constant":
                env[n.output[0]] = np.asarray(tensor_value(n.attribute[0].t, base_dir), dtype=np.float64)
            elif n.op_type in _UNARY:
                env[n.output[0]] = _UNARY[n.op_type](env[n.input[0]])
            elif n.op_type in _BINARY:
                env[n.output[0]] = _BINARY[n.op_type](env[n.input[0]], env[n.input[1]])
            elif n.op_type == "Clip":
                lo = env[n.input[1]] if len(n.input) > 1 and n.input[1] else -np.inf
                hi = env[n.input[2]] if len(n.input) > 2 and n.input[2] else np.inf
                env[n.output[0]] = np.clip(env[n.input[0]], lo, hi)
            else:
                raise ValueError(f"no float64 evaluation for {n.op_type}")
    return env[body.output[0].name]


# ------------------------------------------------------------------ the rule

def input_grid(times: int, t_ref: int, step: float) -> np.ndarray:
    """Decoded value of every spike time 0..T-1, as onnxruntime's DequantizeLinear gives it."""
    return decode_times(np.arange(times), step, t_ref)


def input_stage(kw: dict, j: int = 0) -> UniformStage:
    """The uniform stage that spike input ``j`` of a neuron under construction comes from."""
    return UniformStage.from_timing(kw["steps_in"][j], kw["t_refs_in"][j], kw["windows_in"][j])


def target_kernel(f: Callable[[np.ndarray], np.ndarray], kw: dict) -> tuple[tuple[float, ...], float]:
    """eta and c_offset of a synapse integrating ``f`` of spike input 0 (Theorem 2 on its grid).

    The table, mean-square and log-sum-exp neurons all receive f(x) of one input: eta from f's
    steps on that input's grid, ``c_offset = f(a_in)`` (f at the silent time), in float64.
    """
    inp = input_stage(kw)
    a_in = float(inp.a)
    return tuple(theorem2_eta(f, a_in, kw["steps_in"][0], inp.N)), float(f(np.float64(a_in)))


def step_kernel(T: int, t_ref: int, step: float) -> tuple[np.ndarray, float]:
    """eta and c_offset of an identity synapse on a uniform input stage (Theorem 2, f = identity)."""
    st = UniformStage.from_timing(step, t_ref, T)
    return st.eta().astype(np.float64), float(st.a)


class NeuronRule(Rule):
    """Match emissions fed by a group of this rule's kind; replace each by a TTFSNeuron."""

    name = "NeuronRule"
    kind = "generic"

    def __init__(self):
        self._info: dict | None = None

    def accepts(self, grp: Group) -> bool:
        raise NotImplementedError

    def kernels(self, g: GraphIndex, m: Match, spec_kw: dict) -> None:
        """Fill the Theorem-2 fields of ``spec_kw`` (eta, c_offset, weights, synapse, target, ...)."""
        raise NotImplementedError

    def pattern(self, g: GraphIndex) -> list[Match]:
        dep = spike_dependent(g)
        out = []
        for e in list(g.nodes):
            if e.domain != DOMAIN or e.op_type != EMIT:
                continue
            grp = extract_group(g, e, dep)
            if grp is not None and self.accepts(grp):
                out.append(Match(e, {"group": grp}))
        return out

    def info(self, g: GraphIndex) -> dict:
        if self._info is None:
            g.commit()
            self._info = tensor_info(g.model)
        return self._info

    def check(self, g: GraphIndex, m: Match) -> str | None:
        grp: Group = m.nodes["group"]
        for d, t, dec in grp.spikes:
            src = g.producer.get(t)
            if src is None or src.domain != DOMAIN or not (src.op_type == EMIT or is_neuron(src)):
                return f"spike input {t} does not come from a TTFS emission"
        return None

    def rewrite(self, g: GraphIndex, m: Match) -> None:
        grp: Group = m.nodes["group"]
        info = self.info(g)
        body, feeds = build_body(g, grp, info)
        wins, refs, steps = zip(*(decode_spec(dec) for _, _, dec in grp.spikes))
        kw = dict(emit=EmitSpec.from_node(grp.emit), kind=self.kind, windows_in=tuple(wins),
                  t_refs_in=tuple(refs), steps_in=tuple(steps), body=body)
        m.nodes.update(info=info, body=body)
        self.kernels(g, m, kw)
        spec = NeuronSpec(**kw)
        self.realise(g, m, spec, feeds)
        name = (grp.emit.name or grp.emit.output[0]).removesuffix("/emit") + f"/{self.kind}_neuron"
        g.replace_node(grp.emit, [spec.make_node(feeds, grp.emit.output[0], name)])

    def realise(self, g: GraphIndex, m: Match, spec: NeuronSpec, feeds: list[str]) -> None:
        """Give ``spec`` a realised table where its output depends on its input time alone.

        By default a neuron keeps its body (multi-input neurons: the table would be a product of
        windows); one-input neurons override this.
        """


def constant_value(g: GraphIndex, name: str) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, else None."""
    if g.is_const(name):
        return np.asarray(g.const(name))
    node = g.producer.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return tensor_value(node.attribute[0].t, g.inits.base_dir)
    return None


#: ops that only move, copy or select elements: a tensor they produce holds no value their data input lacks
VALUE_PRESERVING = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Expand", "Identity", "Slice", "Flatten",
                    "Tile", "Gather"}


def two_values(g: GraphIndex, name: str, depth: int = 16) -> tuple[float, float] | None:
    """The two values a tensor can take, when the graph proves it holds nothing else.

    Follows the data input of value-preserving ops back to a ``Where(cond, a, b)`` with one
    constant value in each branch (how exports build an additive attention mask: 0 or -inf /
    the float minimum). Anything else, e.g. a mask fed as a graph input, gives None.
    """
    for _ in range(depth):
        node = g.producer.get(name)
        if node is None:
            return None
        if node.op_type in VALUE_PRESERVING:
            name = node.input[0]
            continue
        if node.op_type != "Where":
            return None
        vals = [constant_value(g, x) for x in node.input[1:]]
        if any(v is None or np.unique(v).size != 1 for v in vals):
            return None
        return float(np.unique(vals[0])[0]), float(np.unique(vals[1])[0])
    return None


def realise_table(spec: NeuronSpec, feeds: list[str], consts: dict[str, np.ndarray],
                  opsets: list | None = None) -> tuple[int, ...]:
    """Output spike time for every input spike time: the body run in onnxruntime on all of them.

    Exactly the computation the QANN does for these codes (decode, its own float ops, its
    quantizer), so a Gather on this table is the QANN bit for bit, at no float cost at run time.
    ``consts`` holds the values of the body's constant inputs (feeds[1:]). onnxruntime's QDQ
    fusions are off, as in verify's reference for fully spiking models (float on exact codes).
    """
    T_in = spec.windows_in[0]
    node = spec.make_node(feeds, "t_out", "neuron")
    graph = helper.make_graph(
        [node], "table", [helper.make_tensor_value_info(feeds[0], time_elem_type(T_in), [T_in])],
        [helper.make_tensor_value_info("t_out", time_elem_type(spec.emit.T), [T_in])],
        [onnx.numpy_helper.from_array(np.asarray(consts[n]), n) for n in feeds[1:]])
    ops = [o for o in (opsets or [helper.make_opsetid("", 18)]) if o.domain != DOMAIN]
    model = helper.make_model(graph, opset_imports=ops + [helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 9
    t = np.arange(T_in, dtype=time_dtype(T_in))
    so = exact_options(model)
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    return tuple(int(v) for v in open_session(model, so).run(None, {feeds[0]: t})[0])


def post_product_muls(grp: Group) -> float:
    """Multiplications per output neuron *after* the activation product (e.g. x*r then *gamma).

    Operation counting, for every neuron kind: one accumulation per synapse (the fan-in), one
    multiplication per synapse whose weight is a run-time activation (a product synapse), and
    each further Mul/Div applied to the run-time product. A constant multiplying an *input*
    before the product (QK^T's 1/d^(1/4)) scales a fixed step kernel and costs nothing; nonlinear
    functions cost nothing either: they are the shape of the eta / psi kernels, integrated over
    the window exactly like a step kernel. Fixed or per-position weights (residual +-1, 1/I,
    rotary cos/sin) are ordinary synaptic weights, not multiplies.
    """
    products = grp.activation_products()
    if not products:
        return 0.0
    after = {o for o in products[0].output}
    muls = 0.0
    for n in grp.nodes[grp.nodes.index(products[0]) + 1:]:
        if any(i in after for i in n.input):
            after.update(n.output)
            muls += n.op_type in ("Mul", "Div") and not _times_one(grp, n)
    return muls


def _times_one(grp: Group, n: onnx.NodeProto) -> bool:
    """A multiply by a constant that is all ones (gamma after a rotation folded it away): no op."""
    consts = [i for i in n.input if i in grp.consts]
    return n.op_type == "Mul" and len(consts) == 1 and bool(np.all(grp.const_values.get(consts[0], 0) == 1))
