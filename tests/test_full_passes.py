"""Neuron passes on tiny hand-built fully quantized (QDQ) stage groups, checked against onnxruntime.

Each graph follows quantize --full's contract: per-tensor uint8 DequantizeLinear inputs (n-bit
codes under a Clip), a group of float ops, one QuantizeLinear. The compiled model must equal the
QANN bit for bit (every code), the group must become one TTFSNeuron of the right kind, and its
kernels must realise (Theorem 1) the function the QANN computes.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP, helper as h, numpy_helper as nh

from graphs import onnx_model, quantized_linear_model
from ttfsc.compiler.pipeline import latency_per_token, run_passes, stages
from ttfsc.neuron import NeuronSpec, is_neuron
from ttfsc.dialect import DECODE, EMIT
from ttfsc.runtime.session import open_session
from ttfsc.ttfs import clip_bounds

B, S, D = 2, 5, 16


class Builder:
    """Collects nodes/initializers of a QDQ graph with n-bit per-tensor activation stages."""

    def __init__(self, bits: int = 6, seed: int = 0, prefix: str = ""):
        self.N = (1 << bits) - 1
        self.prefix = prefix  # e.g. "/model/layers.0/": puts the nodes in a decoder block
        self.nodes, self.inits, self.inputs, self.feeds = [], [], [], {}
        self.rng = np.random.default_rng(seed)

    def const(self, name: str, value) -> str:
        self.inits.append(nh.from_array(np.asarray(value), name))
        return name

    def input(self, name: str, value: np.ndarray) -> str:
        elem = TP.FLOAT if value.dtype == np.float32 else TP.INT64
        self.inputs.append(h.make_tensor_value_info(name, elem, list(value.shape)))
        self.feeds[name] = value
        return name

    def op(self, op_type: str, inputs: list[str], out: str, **kw) -> str:
        self.nodes.append(h.make_node(op_type, inputs, [out], name=self.prefix + out, **kw))
        return out

    def qdq(self, x: str, name: str, lo: float, hi: float) -> str:
        """A stage covering [lo, hi]: Clip -> QuantizeLinear -> DequantizeLinear (uint8 carrying n bits)."""
        scale = np.float32((hi - lo) / self.N)
        z = int(np.clip(np.round(-lo / scale), 0, self.N))
        a, b = clip_bounds(scale, z, self.N)
        wide = self.N > 255  # more than 8 bits: uint16 codes through the com.microsoft Q/DQ
        s = self.const(f"{name}_s", np.array(scale, np.float32))
        zp = self.const(f"{name}_z", np.array(z, np.uint16 if wide else np.uint8))
        kw = {"domain": "com.microsoft"} if wide else {}
        c = self.op("Clip", [x, self.const(f"{name}_lo", a), self.const(f"{name}_hi", b)], f"{name}_clip")
        q = self.op("QuantizeLinear", [c, s, zp], f"{name}_q", **kw)
        return self.op("DequantizeLinear", [q, s, zp], f"{name}_dq", **kw)

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        return onnx_model(self.nodes, self.inputs, [h.make_empty_tensor_value_info(o) for o in outputs], self.inits,
                          "full", (("", 18), ("com.microsoft", 1)))


def _run(model: onnx.ModelProto, feeds: dict, outputs: list[str]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(outputs, feeds)


def _out_stage(b: Builder, v: str, name: str = "out") -> str:
    """Quantize the group's result on a grid calibrated to its float range on the test inputs."""
    probe = b.model([v])
    val = _run(probe, b.feeds, [v])[0]
    fin = val[np.isfinite(val)]
    lo, hi = float(min(fin.min(), 0.0)), float(max(fin.max(), 0.0))
    return b.qdq(v, name, lo, hi + 1e-6)


def _act(b: Builder, name: str, shape, lo: float, hi: float) -> str:
    """An input activation stage fed by a graph input covering a bit more than [lo, hi] (clipping too)."""
    x = b.input(name, (b.rng.uniform(lo * 1.2, hi * 1.2, shape)).astype(np.float32))
    return b.qdq(x, f"{name}_in", lo, hi)


# ------------------------------------------------------------------ graph builders per group kind

def silu(b: Builder) -> str:
    x = _act(b, "x", (B, S, D), -6, 4)
    return b.op("Mul", [x, b.op("Sigmoid", [x], "sig")], "silu")


def exp(b: Builder) -> str:
    return b.op("Exp", [_act(b, "x", (B, S, D), -8, 0)], "exp")


def rsqrt(b: Builder) -> str:
    x = _act(b, "x", (B, S, 1), 0, 3)
    s = b.op("Sqrt", [b.op("Add", [x, b.const("eps", np.array(1e-5, np.float32))], "add_eps")], "sqrt")
    return b.op("Div", [b.const("one", np.array(1.0, np.float32)), s], "rsqrt")


def gelu(b: Builder) -> str:
    x = _act(b, "x", (B, S, D), -4, 4)
    e = b.op("Erf", [b.op("Div", [x, b.const("sqrt2", np.array(np.sqrt(2), np.float32))], "xs")], "erf")
    one_p = b.op("Add", [e, b.const("one", np.array(1.0, np.float32))], "onep")
    return b.op("Mul", [b.op("Mul", [x, one_p], "xm"), b.const("half", np.array(0.5, np.float32))], "gelu")


def mean_square(b: Builder) -> str:
    x = _act(b, "x", (B, S, D), -3, 3)
    sq = b.op("Pow", [x, b.const("two", np.array(2.0, np.float32))], "sq")
    return b.op("ReduceMean", [sq, b.const("axes", np.array([-1], np.int64))], "ms", keepdims=1)


H, K = 2, 6  # heads, keys


def _mask(b: Builder) -> str:
    """Causal additive mask [1, 1, S, K] (0 or -inf): a side input, no spikes."""
    m = np.where(np.arange(K)[None, :] <= np.arange(S)[:, None] + 1, 0.0, -np.inf).astype(np.float32)
    return b.input("mask", m[None, None])


def lse(b: Builder) -> str:
    s = _act(b, "s", (B, H, S, K), -6, 6)
    sm = b.op("Add", [s, _mask(b)], "masked")
    return b.op("ReduceLogSumExp", [sm, b.const("axes", np.array([-1], np.int64))], "lse", keepdims=1)


def lse_decomposed(b: Builder) -> str:
    s = _act(b, "s", (B, H, S, K), -6, 6)
    e = b.op("Exp", [b.op("Add", [s, _mask(b)], "masked")], "e")
    r = b.op("ReduceSum", [e, b.const("axes", np.array([-1], np.int64))], "sum", keepdims=1)
    return b.op("Log", [r], "lse")


def diff(b: Builder) -> str:
    s = _act(b, "s", (B, H, S, K), -6, 6)
    l_ = _act(b, "l", (B, H, S, 1), 0, 8)
    return b.op("Add", [b.op("Sub", [s, l_], "d"), _mask(b)], "dm")


def exp_masked(b: Builder) -> str:
    """softmax's exp group as quantize --full writes it: Exp(DQ(d) + mask)."""
    return b.op("Exp", [b.op("Add", [_act(b, "d", (B, H, S, K), -8, 0), _mask(b)], "dm")], "p")


def kv_concat(b: Builder) -> str:
    """Concat(past, DQ(k)) on k's own grid (the past is a float graph input holding grid values)."""
    k = _act(b, "k", (B, H, S, D // H), -3, 3)
    scale, z = np.float32(6 / b.N), int(np.round(3 / (6 / b.N)))
    past = ((b.rng.integers(0, b.N + 1, (B, H, 3, D // H)) - z) * scale).astype(np.float32)
    return b.op("Concat", [b.input("past", past), k], "kv", axis=2)


def mul(b: Builder) -> str:
    return b.op("Mul", [_act(b, "g", (B, S, D), -2, 3), _act(b, "u", (B, S, D), -3, 3)], "gu")


def rms_product(b: Builder) -> str:
    x, r = _act(b, "x", (B, S, D), -3, 3), _act(b, "r", (B, S, 1), 0.2, 2)
    gamma = b.const("gamma", b.rng.uniform(0.5, 1.5, D).astype(np.float32))
    return b.op("Mul", [b.op("Mul", [x, r], "xr"), gamma], "xrg")


def rms_product_unit(b: Builder) -> str:
    """x*r*gamma with gamma = ones (what a rotation leaves): the gamma multiply is no operation."""
    x, r = _act(b, "x", (B, S, D), -3, 3), _act(b, "r", (B, S, 1), 0.2, 2)
    return b.op("Mul", [b.op("Mul", [x, r], "xr"), b.const("gamma", np.ones(D, np.float32))], "xrg")


def qk(b: Builder) -> str:
    """Q.K^T / sqrt(d) with head reshapes and a transpose between the DQs and the MatMul."""
    q, k = _act(b, "q", (B, S, D), -3, 3), _act(b, "k", (B, K, D), -3, 3)
    shape = b.const("heads", np.array([B, -1, H, D // H], np.int64))
    qh = b.op("Transpose", [b.op("Reshape", [q, shape], "qr")], "qh", perm=[0, 2, 1, 3])
    kh = b.op("Transpose", [b.op("Reshape", [k, shape], "kr")], "kh", perm=[0, 2, 3, 1])
    s = b.op("MatMul", [qh, kh], "qk")
    return b.op("Mul", [s, b.const("inv_sqrt_d", np.array(1 / np.sqrt(D // H), np.float32))], "scores")


def pv(b: Builder) -> str:
    p, v = _act(b, "p", (B, H, S, K), 0, 1), _act(b, "v", (B, H, K, D // H), -3, 3)
    return b.op("MatMul", [p, v], "pv")


def residual(b: Builder) -> str:
    return b.op("Add", [_act(b, "h", (B, S, D), -4, 4), _act(b, "o", (B, S, D), -2, 2)], "res")


def rotary(b: Builder) -> str:
    """x*cos + rotate_half(x)*sin with cos/sin gathered by position ids (side inputs)."""
    x = _act(b, "x", (B, S, D), -3, 3)
    pos = b.input("pos", np.tile(np.arange(S, dtype=np.int64), (B, 1)))
    ang = np.arange(16)[:, None] * (1.0 / 10000 ** (np.arange(0, D, 2) / D))[None, :]
    ang = np.concatenate([ang, ang], axis=-1).astype(np.float32)
    cos = b.op("Gather", [b.const("cos_cache", np.cos(ang)), pos], "cos", axis=0)
    sin = b.op("Gather", [b.const("sin_cache", np.sin(ang)), pos], "sin", axis=0)
    x1 = b.op("Slice", [x, b.const("s0", np.array([0], np.int64)), b.const("s1", np.array([D // 2], np.int64)),
                        b.const("ax", np.array([-1], np.int64))], "x1")
    x2 = b.op("Slice", [x, b.const("s2", np.array([D // 2], np.int64)), b.const("s3", np.array([D], np.int64)),
                        b.const("ax2", np.array([-1], np.int64))], "x2")
    rot = b.op("Concat", [b.op("Neg", [x2], "nx2"), x1], "rot", axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos], "xc"), b.op("Mul", [rot, sin], "rs")], "rope")


GROUPS = {"silu": silu, "exp": exp, "rsqrt": rsqrt, "gelu": gelu, "mean_square": mean_square, "lse": lse,
          "lse_decomposed": lse_decomposed, "diff": diff, "mul": mul, "rms_product": rms_product, "qk": qk,
          "pv": pv, "rms_product_unit": rms_product_unit, "residual": residual, "rotary": rotary, "exp_masked": exp_masked, "kv_concat": kv_concat}
#: kind and target each builder's group must compile to
EXPECTED = {"mean_square": ("mean_square", "mean_square"), "lse": ("lse", "log_sum_exp"),
            "lse_decomposed": ("lse", "log_sum_exp"), "diff": ("linear", "sub"), "mul": ("product", "mul"),
            "rms_product": ("product", "mul"), "rms_product_unit": ("product", "mul"), "qk": ("product", "matmul"), "pv": ("product", "matmul"),
            "residual": ("linear", "add"), "rotary": ("linear", "rotary"),
            "exp_masked": ("elementwise", "exp"), "kv_concat": ("linear", "concat")}


def build(kind: str, bits: int = 6, seed: int = 0) -> tuple[onnx.ModelProto, dict, str]:
    b = Builder(bits, seed)
    out = _out_stage(b, GROUPS[kind](b))
    return b.model([out]), b.feeds, out


def compile_full(model: onnx.ModelProto, T: int) -> tuple[onnx.ModelProto, list[dict]]:
    snn = copy.deepcopy(model)
    reports = run_passes(snn, T)
    return snn, reports


def neurons(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if is_neuron(n)]


def one_neuron(qann: onnx.ModelProto, T: int) -> tuple[onnx.ModelProto, onnx.NodeProto, NeuronSpec]:
    """``qann`` compiled at T: the model, its one TTFSNeuron (there must be exactly one), that neuron's spec."""
    snn, _ = compile_full(qann, T)
    ns = neurons(snn)
    assert len(ns) == 1, [n.op_type for n in snn.graph.node]
    return snn, ns[0], NeuronSpec.from_node(ns[0])


def assert_bit_exact(qann: onnx.ModelProto, snn: onnx.ModelProto, feeds: dict, out: str) -> None:
    ref = _run(qann, feeds, [out])[0]
    got = open_session(snn).run([out], feeds)[0]
    assert ref.shape == got.shape
    np.testing.assert_array_equal(got, ref)


# ------------------------------------------------------------------ elementwise neurons

@pytest.mark.parametrize("kind", ["silu", "exp", "rsqrt", "gelu"])
@pytest.mark.parametrize("bits", [4, 6])
def test_elementwise_neuron_bit_exact(kind, bits):
    qann, feeds, out = build(kind, bits)
    snn, _, spec = one_neuron(qann, 1 << bits)
    assert spec.kind == "elementwise" and spec.target == kind and len(spec.table) == 1 << bits
    # the group's float ops are gone: only the neuron (a Gather at run time), emissions and decodes
    assert {n.op_type for n in snn.graph.node} <= {EMIT, DECODE, "TTFSNeuron"}
    assert_bit_exact(qann, snn, feeds, out)
    # the neuron is a stage like any emission (verify probes it; latency counts its window)
    assert [s["qann_tensor"] for s in stages(snn)] == ["x_in_q", "out_q"]


# ------------------------------------------------------------------ multi-input neurons

@pytest.mark.parametrize("group", sorted(EXPECTED))
@pytest.mark.parametrize("bits", [4, 6])
def test_group_neuron_bit_exact(group, bits):
    qann, feeds, out = build(group, bits, seed=bits)
    snn, _, spec = one_neuron(qann, 1 << bits)
    assert (spec.kind, spec.target) == EXPECTED[group]
    assert not spec.table  # multi-input (or masked) neurons run their QANN body
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in snn.graph.node)
    assert_bit_exact(qann, snn, feeds, out)


# ------------------------------------------------------------------ softmax exp with a proven two-valued mask

def _where_mask(b: Builder, lo: str | float = -np.inf) -> str:
    """The export's additive mask: Where(keep, 0, lo) on a bool graph input, then moved by Expand."""
    keep = (np.arange(K)[None, :] <= np.arange(S)[:, None] + 1)[None, None]
    b.inputs.append(h.make_tensor_value_info("keep", TP.BOOL, list(keep.shape)))
    b.feeds["keep"] = keep
    other = lo if isinstance(lo, str) else b.const("mask_lo", np.array(lo, np.float32))
    m = b.op("Where", ["keep", b.const("mask_zero", np.array(0.0, np.float32)), other], "mask4")
    return b.op("Expand", [m, b.const("mask_shape", np.array([B, 1, S, K], np.int64))], "mask")


def _exp_gated(b: Builder, lo: str | float = -np.inf) -> str:
    return b.op("Exp", [b.op("Add", [_act(b, "d", (B, H, S, K), -8, 0), _where_mask(b, lo)], "dm")], "p")


def assert_gated_exp(bits: int, lo: float = -np.inf) -> np.ndarray:
    """exp(d + mask), mask in {0, lo}, compiled at 2^bits slots: one exp table neuron with an
    inhibitory gate, bit-exact, whose masked positions fire at the gate's time. Returns its spike times."""
    b = Builder(bits, seed=bits)
    out = _out_stage(b, _exp_gated(b, lo))
    qann = b.model([out])
    snn, node, spec = one_neuron(qann, 1 << bits)
    assert spec.target == "exp" and len(spec.table) == 1 << bits and spec.gate_time >= 0
    assert not any(n.op_type in ("Exp", "QuantizeLinear", "DequantizeLinear") for n in snn.graph.node)
    assert_bit_exact(qann, snn, b.feeds, out)
    # masked positions fire at the gate's time, which decodes to p = 0 (code 0 of the zero-point-0 grid)
    snn.graph.output.append(h.make_empty_tensor_value_info(node.output[0]))
    t = open_session(snn).run([node.output[0]], b.feeds)[0]
    keep = np.broadcast_to(b.feeds["keep"], t.shape)
    assert (t[~keep] == spec.gate_time).all() and (~keep).any()
    return t


@pytest.mark.parametrize("lo", [-np.inf, float(np.finfo(np.float32).min)])
@pytest.mark.parametrize("bits", [4, 6])
def test_masked_exp_becomes_gated_table(lo, bits):
    """exp(d + mask) with mask in {0, lo} (proved from the graph): a table plus an inhibitory gate."""
    assert_gated_exp(bits, lo)


def test_mask_from_a_runtime_value_keeps_the_body():
    """Where(keep, 0, x) with x a graph input is not provably two-valued: the neuron keeps its body."""
    b = Builder(6, seed=2)
    lo = b.input("lo", np.full((1,), -1e4, np.float32))
    out = _out_stage(b, _exp_gated(b, lo))
    qann = b.model([out])
    snn, _, spec = one_neuron(qann, 64)
    assert not spec.table and spec.gate_time == -1
    assert_bit_exact(qann, snn, b.feeds, out)


# ------------------------------------------------------------------ negative cases

def test_hybrid_graph_gets_no_neurons():
    """A hybrid QDQ graph (only linear inputs quantized): the neuron passes change nothing."""
    m, info = quantized_linear_model(extra_consumer=True)
    snn, reports = compile_full(m, 64)
    assert not neurons(snn)
    for r in reports:
        if r["pass"].endswith("_neurons"):
            assert r["rewritten"] == {} and r["skipped"] == []


def test_per_channel_elementwise_is_left_with_reason():
    """x*sigmoid(x)*gamma[D] is not one function of the code: skipped, reported, still bit-exact."""
    b = Builder(6)
    x = _act(b, "x", (B, S, D), -6, 4)
    v = b.op("Mul", [b.op("Mul", [x, b.op("Sigmoid", [x], "sig")], "silu"),
                     b.const("gamma", b.rng.uniform(0.5, 1.5, D).astype(np.float32))], "silu_g")
    out = _out_stage(b, v)
    qann = b.model([out])
    snn, reports = compile_full(qann, 64)
    assert not neurons(snn)
    skipped = [s for r in reports for s in r["skipped"] if s["rule"] == "ElementwiseToNeuron"]
    assert len(skipped) == 1 and "per-channel" in skipped[0]["reason"]
    assert_bit_exact(qann, snn, b.feeds, out)


def test_group_fed_by_a_reception_is_not_a_neuron():
    """Linear -> bias Add -> Q: the group's input is a potential, not spikes, so it stays a reception."""
    b = Builder(6)
    x = _act(b, "x", (B, S, D), -3, 3)
    w = b.const("W", b.rng.integers(-127, 128, (D, D)).astype(np.int8))
    wd = b.op("DequantizeLinear", [w, b.const("ws", np.full(D, 0.01, np.float32)),
                                   b.const("wz", np.zeros(D, np.int8))], "Wd", axis=1)
    y = b.op("Add", [b.op("MatMul", [x, wd], "mm"), b.const("bias", np.ones(D, np.float32))], "yb")
    out = _out_stage(b, y)
    qann = b.model([out])
    snn, _ = compile_full(qann, 64)
    assert not neurons(snn) and any(n.op_type == "TTFSReceive" for n in snn.graph.node)
    assert_bit_exact(qann, snn, b.feeds, out)


# ------------------------------------------------------------------ coverage and operation counts

def _silu_block(per_channel: bool) -> tuple[onnx.ModelProto, dict, str]:
    b = Builder(6, prefix="/model/layers.0/")
    x = _act(b, "x", (B, S, D), -6, 4)
    v = b.op("Mul", [x, b.op("Sigmoid", [x], "sig")], "silu")
    if per_channel:
        v = b.op("Mul", [v, b.const("gamma", b.rng.uniform(0.5, 1.5, D).astype(np.float32))], "silu_g")
    out = _out_stage(b, v)
    return b.model([out]), b.feeds, out


def test_coverage_full_block_is_all_ttfs():
    from ttfsc.compiler.coverage import coverage, stages_per_block
    snn, _ = compile_full(_silu_block(False)[0], 64)
    cov = coverage(snn)
    assert cov["decoder_blocks"] == 1 and cov["standard_ops_on_activations"] == {}
    assert cov["ttfs_share_of_ops"] == 1.0 and cov["ttfs_ops"]["TTFSNeuron"] == 1
    # one synapse per SiLU neuron: B*S*D accumulations over the probe's one "token"
    assert cov["ops_per_token"]["ttfs"]["adds"] == B * S * D
    assert stages_per_block(snn) == {"0": {"stages": 2, "steps": 128}}


def test_coverage_reports_standard_ops_left():
    from ttfsc.compiler.coverage import coverage
    snn, _ = compile_full(_silu_block(True)[0], 64)
    cov = coverage(snn)
    assert set(cov["standard_ops_on_activations"]) == {"Sigmoid", "Mul"}
    assert 0.0 <= cov["ttfs_share_of_ops"] < 1.0


@pytest.mark.parametrize("group,fan_in,synapse_muls,muls", [
    ("silu", 1, 0, 0), ("mean_square", D, 0, 0), ("residual", 2, 0, 0), ("rotary", 2, 0, 0),
    ("mul", 1, 1, 0), ("rms_product", 1, 1, 1), ("rms_product_unit", 1, 1, 0), ("qk", D // H, 1, 1), ("pv", K, 1, 0), ("lse", K, 0, 0)])
def test_operation_counts(group, fan_in, synapse_muls, muls):
    """Products cost a multiply per synapse (never hidden); nonlinear kernels and fixed weights do not."""
    _, _, spec = one_neuron(build(group, 6)[0], 64)
    assert (spec.fan_in, spec.synapse_muls, spec.muls) == (fan_in, synapse_muls, muls)
    assert spec.ops(context=99) == (fan_in, fan_in * synapse_muls + muls)


# ------------------------------------------------------------------ KV-cache relay (fewer stages)

def _kv(same_grid: bool) -> tuple[onnx.ModelProto, onnx.ModelProto, dict, str, dict]:
    """A KV-cache concat whose output is quantized on its input's grid or on another, compiled at T = 64.

    Returns (qann, snn, feeds, output name, the kv_relay pass's report)."""
    b = Builder(6)
    v = kv_concat(b)
    out = b.qdq(v, "out", -3, 3) if same_grid else _out_stage(b, v)
    qann = b.model([out])
    snn, reports = compile_full(qann, 64)
    return qann, snn, b.feeds, out, next(r for r in reports if r["pass"] == "kv_relay")


def test_kv_cache_on_the_same_grid_is_a_relay():
    qann, snn, feeds, out, rep = _kv(True)
    assert rep["rewritten"] == {"KvCacheRelay": 1} and not neurons(snn)
    roles = [a.s for n in snn.graph.node for a in n.attribute if a.name == "role"]
    assert roles == [b"kv_past"]
    assert {n.op_type for n in snn.graph.node} <= {EMIT, DECODE, "Concat"}
    assert_bit_exact(qann, snn, feeds, out)
    assert latency_per_token(snn) == 64  # k's stage with the past encoder beside it: no cache stage


def test_kv_cache_on_another_grid_stays_a_neuron():
    qann, snn, feeds, out, rep = _kv(False)
    assert rep["rewritten"] == {} and "another grid" in rep["skipped"][0]["reason"]
    assert [NeuronSpec.from_node(n).target for n in neurons(snn)] == ["concat"]
    assert_bit_exact(qann, snn, feeds, out)
    assert latency_per_token(snn) == 128  # k's stage, then the cache's


# ------------------------------------------------------------------ end to end on the tiny LLaMA

def test_tiny_llama_full_twin_end_to_end(tiny_llama_onnx, tmp_path):
    """quantize --full -> compile: every decoder group is a neuron, verify 0 mismatches, Theorem 1 OK."""
    from ttfsc.compiler.inspect import inspect_neurons
    from ttfsc.modelio import load_model
    from ttfsc.compiler.pipeline import compile_model
    from ttfsc.quantizer.config import QuantConfig
    from ttfsc.quantizer.quantize import quantize_model
    from ttfsc.compiler.verify import verify
    qdq, snn = tmp_path / "full.qdq.onnx", tmp_path / "full.snn.onnx"
    config = QuantConfig(abits=6, full=True, calib_samples=1, calib_seqlen=16, prefix="none")
    quantize_model(tiny_llama_onnx, qdq, config, log=lambda *a: None)
    rep = compile_model(str(qdq), str(snn), "auto", log=lambda *a: None)  # kinds may have their own widths
    specs = [NeuronSpec.from_node(n) for n in load_model(snn).graph.node if is_neuron(n)]
    exps = [s for s in specs if s.target == "exp"]  # Optimum's mask is a Where of constants: gated tables
    assert exps and all(s.table and s.gate_time >= 0 for s in exps)
    cov = rep["coverage"]
    assert cov["standard_ops_on_activations"] == {} and cov["ttfs_share_of_ops"] == 1.0
    assert rep["stages_per_block"]["0"]["stages"] > 10
    r = verify(str(qdq), str(snn), tokens=8)
    assert r["total"]["mismatch"] == 0 and r["greedy"]["identical"]
    ins = inspect_neurons(load_model(snn), samples=64)
    assert ins["ok"] and {n["kind"] for n in ins["neurons"]} == {"elementwise", "mean_square", "lse", "product",
                                                                  "linear"}


@pytest.mark.parametrize("group", ["silu", "mean_square", "mul", "residual"])
def test_ten_bit_stages(group):
    """1024-slot windows: uint16 spike times, a 1024-entry table, decodes through com.microsoft DQ."""
    qann, feeds, out = build(group, bits=10, seed=1)
    snn, _, spec = one_neuron(qann, 1024)
    assert spec.emit.T == 1024
    if group == "silu":
        assert len(spec.table) == 1024
    assert_bit_exact(qann, snn, feeds, out)
