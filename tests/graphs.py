"""What several test files share: tiny hand-built graphs, exact (dyadic) stage inputs, sessions.

Graphs: ``onnx_model`` / ``ttfs_model`` (opset 18, IR 9) and ``ttfs_nodes``;
``quantized_linear_model`` (a QDQ linear for the pass and runtime tests);
``per_channel_activation_model`` (a quantizer no coding may rewrite). Data: ``dyadic_stage`` and
``stage_inputs`` (a power-of-two step, every exact tie around the window). Running:
``ort_session`` (plain onnxruntime, optionally with intermediate outputs);
``assert_compiled_equals_qdq`` (a compiled model against its QDQ model).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP, helper as h, numpy_helper as nh

from ttfsc.graph import with_outputs
from ttfsc.runtime.session import default_options, exact_options, open_session
from ttfsc.ttfs import DOMAIN, DOMAIN_VERSION, UniformStage, clip_bounds


def onnx_model(nodes, inputs, outputs, inits=(), name: str = "g",
               opsets: Sequence[tuple[str, int]] = (("", 18),)) -> onnx.ModelProto:
    """One graph as a model of IR version 9, importing ``opsets`` (domain, version)."""
    g = h.make_graph(nodes, name, inputs, outputs, list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 9
    return m


def ttfs_model(nodes, inputs, outputs, inits=(), name: str = "ttfs") -> onnx.ModelProto:
    """A model of TTFS (or rate, continuous) nodes: opset 18 and ttfsc's domain."""
    return onnx_model(nodes, inputs, outputs, inits, name, (("", 18), (DOMAIN, DOMAIN_VERSION)))


def quantized_linear_model(seed: int = 0, bits: int = 6, I: int = 32, O: int = 24, M: int = 16,
                           clip: bool = True, shared: bool = True, extra_consumer: bool = False,
                           signed_act: bool = False, per_channel: bool = True) -> tuple[onnx.ModelProto, dict]:
    """x -> [Clip] -> Q -> DQ -> MatMul(DQ(W1)) [and MatMul(DQ(W2))] -> y1 [, y2].

    ``extra_consumer`` adds a Relu reading the dequantized activation (a standard op that the
    compiler must feed decoded values). ``signed_act`` uses an int8 activation (no Clip), the
    form onnxruntime's quantize_static produces with QInt8 activations.
    """
    rng = np.random.default_rng(seed)
    N = (1 << bits) - 1
    scale = np.float32(0.05 + 0.01 * rng.random())
    z = int(rng.integers(N // 4, 3 * N // 4))
    inits = [nh.from_array(np.array(scale, np.float32), "s")]
    if signed_act:
        inits.append(nh.from_array(np.array(z - 128, np.int8), "zp"))
    else:
        inits.append(nh.from_array(np.array(z, np.uint8), "zp"))
    nodes = []
    qin = "x"
    if clip:
        lo, hi = clip_bounds(scale, z, N)
        inits += [nh.from_array(np.array(lo, np.float32), "lo"), nh.from_array(np.array(hi, np.float32), "hi")]
        nodes.append(h.make_node("Clip", ["x", "lo", "hi"], ["xc"], name="clip"))
        qin = "xc"
    nodes += [h.make_node("QuantizeLinear", [qin, "s", "zp"], ["xq"], name="q"),
              h.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq")]
    outputs = []
    for k in range(2 if shared else 1):
        W = rng.integers(-127, 128, (I, O)).astype(np.int8)
        sw = (rng.random(O if per_channel else 1) * 0.01 + 0.001).astype(np.float32)
        if not per_channel:
            sw = sw.reshape(())
        inits += [nh.from_array(W, f"W{k}"), nh.from_array(sw, f"sw{k}"),
                  nh.from_array(np.zeros(sw.shape, np.int8), f"wz{k}")]
        nodes += [h.make_node("DequantizeLinear", [f"W{k}", f"sw{k}", f"wz{k}"], [f"Wd{k}"], name=f"wdq{k}", axis=1),
                  h.make_node("MatMul", ["xd", f"Wd{k}"], [f"y{k}"], name=f"mm{k}")]
        outputs.append(h.make_tensor_value_info(f"y{k}", TP.FLOAT, [M, O]))
    if extra_consumer:
        nodes.append(h.make_node("Relu", ["xd"], ["r"], name="relu"))
        outputs.append(h.make_tensor_value_info("r", TP.FLOAT, [M, I]))
    model = onnx_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [M, I])], outputs, inits, "qlin")
    x = (rng.standard_normal((M, I)) * N * scale / 3).astype(np.float32)
    x[0, :8] = (np.arange(8) - 4 + 0.5) * scale  # exact ties
    return model, {"x": x, "scale": scale, "zero_point": z, "N": N}


def per_channel_activation_model(I: int = 8) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear (one scale per channel, axis 1) -> Relu: no TTFS or rate stage."""
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q", axis=1),
             h.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq", axis=1),
             h.make_node("Relu", ["xd"], ["y"], name="relu")]
    inits = [nh.from_array(np.full(I, 0.1, np.float32), "s"), nh.from_array(np.full(I, 128, np.uint8), "zp")]
    return onnx_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [2, I])],
                      [h.make_tensor_value_info("y", TP.FLOAT, [2, I])], inits)


def qdq_fusions_disabled(so) -> bool:
    """Whether session options turn onnxruntime's Q/DQ fusions off (exact integer math above 128 levels)."""
    try:
        return so.get_session_config_entry("session.disable_quant_qdq") == "1"
    except RuntimeError:  # onnxruntime raises for an entry that was never set
        return False


def ttfs_nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    """The nodes of ttfsc's domain with this op type (TTFSEmit, RateReceive, ...)."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == op]


def dyadic_stage(rng: np.random.Generator, T: int, tie_rule: str, max_shift: int) -> UniformStage:
    """A random uniform stage of T slots: step 2^-k (0 <= k < max_shift), any zero point 0..T-1.

    With a power-of-two step, the inputs of ``stage_inputs`` divide exactly in float32 and float64.
    """
    scale = 2.0 ** -int(rng.integers(0, max_shift))
    return UniformStage(scale, int(rng.integers(0, T)), T, tie_rule)


def stage_inputs(rng: np.random.Generator, st: UniformStage, n: int, margin: int,
                 per_step: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(ties, random) inputs for a uniform stage's rounding, in units of its scale.

    ties: every exact tie (k + 1/2) * scale from ``margin`` codes below the window to ``margin``
    codes above it. random: ``n`` multiples of scale / per_step from ``margin + 1`` codes below to
    ``margin + 1`` above (so values clip on both sides).
    """
    z, N, scale = st.zero_point, st.N, st.scale
    ties = (np.arange(-z - margin, N - z + margin) + 0.5) * scale
    rnd = rng.integers((-z - margin - 1) * per_step, (N - z + margin + 1) * per_step, n) * (scale / per_step)
    return ties, rnd


def ort_session(model_or_path: onnx.ModelProto | str | Path, extra_outputs: Iterable[str] = (),
                optimize: bool = True, fuse_qdq: bool = True) -> ort.InferenceSession:
    """A plain onnxruntime CPU session (no TTFS kernels) on a model or a saved file.

    ``extra_outputs`` also exposes those intermediate tensors; ``optimize=False`` turns graph
    optimisation off; ``fuse_qdq=False`` keeps Q/DQ as written (no integer-kernel fusion: exact
    QDQ numerics).
    """
    model = model_or_path
    extra = list(extra_outputs)
    if extra:
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        model = with_outputs(model, extra)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if not fuse_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def assert_compiled_equals_qdq(qdq: onnx.ModelProto, compiled: onnx.ModelProto, inputs: Iterable[np.ndarray],
                               levels: Iterable[ort.GraphOptimizationLevel], exact_reference: bool = False,
                               tag=None) -> None:
    """Every output of ``compiled`` (in ``open_session``) equals the QDQ model's, dtype and bits.

    Checked for every input (fed as ``x``) at every onnxruntime optimisation level. The QDQ model
    runs in a plain session with ``default_options(level)``; ``exact_reference`` adds what
    ``exact_options`` sets for the compiled model (Q/DQ fusions off above 128 levels).
    """
    levels = list(levels)
    for x in inputs:
        for level in levels:
            so = default_options(level)
            if exact_reference:
                so = exact_options(compiled, so)
            ref = ort.InferenceSession(qdq.SerializeToString(), so,
                                       providers=["CPUExecutionProvider"]).run(None, {"x": x})
            out = open_session(compiled, default_options(level)).run(None, {"x": x})
            assert len(ref) == len(out)
            for a, b in zip(ref, out):
                assert a.dtype == b.dtype and np.array_equal(a, b), (tag, level)


# ------------------------------------------------------------------ random QDQ graphs (property tests)
#
# A plain-data description of a QDQ graph (tests/test_property_compile.py draws it with hypothesis;
# nothing here imports hypothesis), the builder that turns it into an ONNX model plus an input,
# and the comparison of a compiled model with its QDQ twin stage by stage.

from dataclasses import dataclass  # noqa: E402

from ttfsc.graph import MS_DOMAIN  # noqa: E402

#: float ops a random graph may put in front of a quantizer (they stay standard ops in a hybrid compile)
PRE_OPS = ("none", "add", "mul", "silu")
#: what a random graph does with one quantized activation A: one MatMul, two MatMuls added or
#: multiplied, MatMul + A (A's DequantizeLinear also read by an Add), or a second MatMul whose
#: output is an extra graph output
LINEAR_KINDS = ("single", "add", "mul", "residual", "fork")


@dataclass(frozen=True)
class ActSpec:
    """One activation quantizer ``[float op ->] [Clip ->] Q -> DQ`` with ``levels`` codes.

    Codes are carried in (u)int8, or (u)int16 with com.microsoft Q/DQ when ``wide`` (forced above
    256 levels); the codes used are ``qmin .. qmin + levels - 1`` with ``qmin`` the type's lowest
    code plus ``offset`` (clamped into the type), narrowed by a Clip whenever the type has more
    codes than ``levels`` (``clip`` adds one anyway). The Clip bounds sit ``lo_eighths/8`` and
    ``hi_eighths/8`` of a step off the code grid (0: exactly ``ttfs.clip_bounds``, the form ttfsc's
    quantizer writes). Zero point ``qmin + zero``. Scale ``2^(E + exp) * (1 + mant / 2^23)`` where
    2^E is the natural scale of the tensor quantized (``mant = 0``: a power of two, exact ties).
    """

    levels: int
    zero: int
    exp: int = 0
    mant: int = 0
    signed: bool = False
    wide: bool = False
    offset: int = 0
    clip: bool = True
    lo_eighths: int = 0
    hi_eighths: int = 0
    pre: str = "none"


@dataclass(frozen=True)
class LinearSpec:
    """What reads one quantized activation: ``kind`` (LINEAR_KINDS), ``out`` channels, per-channel
    int8 (``wbits`` 8: codes -127..127) or int4-in-int8 (``wbits`` 4: -7..7) weights, with
    power-of-two channel scales when ``dyadic`` (then later stages meet exact ties too)."""

    out: int
    wbits: int = 8
    wbits2: int = 8
    kind: str = "single"
    dyadic: bool = True


@dataclass(frozen=True)
class QdqGraphSpec:
    """A chain of (quantizer, linear) stages on an input ``x`` of shape ``rows + (channels,)``.

    ``scale_exp``: log2 of the first quantizer's natural scale; ``seed``: weights, constants, input.
    """

    rows: tuple[int, ...]
    channels: int
    stages: tuple[tuple[ActSpec, LinearSpec], ...]
    scale_exp: int = 0
    seed: int = 0

    def widths(self) -> set[int]:
        return {a.levels for a, _ in self.stages}


def _code_type(a: ActSpec) -> tuple[int, int, np.dtype, str]:
    """(lowest, highest) code, zero point dtype and Q/DQ domain of an activation quantizer."""
    wide = a.wide or a.levels > 256
    dt = {(False, False): np.uint8, (False, True): np.int8,
          (True, False): np.uint16, (True, True): np.int16}[(wide, a.signed)]
    info = np.iinfo(dt)
    return int(info.min), int(info.max), np.dtype(dt), MS_DOMAIN if wide else ""


def _f32_times(scale: np.float32, k: float) -> np.float32:
    return np.float32(np.float64(scale) * k)


class _QdqBuilder:
    """Builds the graph of a QdqGraphSpec, simulating it in numpy to place each stage's scale."""

    def __init__(self, spec: QdqGraphSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.outputs: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.values: list[str] = []     # float tensors a hybrid compile keeps (compared exactly)
        self.quantizers: list[str] = []  # QuantizeLinear node names, in graph order
        self.wide = False

    def const(self, name: str, value) -> str:
        self.inits.append(nh.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], out: str, domain: str = "", **kw) -> str:
        self.nodes.append(h.make_node(op, inputs, [out], name=f"{out}_{op}", domain=domain, **kw))
        return out

    def natural_exp(self, v: np.ndarray, levels: int) -> int:
        span = float(np.max(v) - np.min(v)) if v.size else 0.0
        if not np.isfinite(span) or span <= 0:
            return self.spec.scale_exp
        return int(np.floor(np.log2(span / (levels - 1))))

    def pre_op(self, k: int, name: str, v: np.ndarray, pre: str) -> tuple[str, np.ndarray]:
        C = v.shape[-1]
        mag = float(np.max(np.abs(v))) if v.size else 1.0
        mag = mag if np.isfinite(mag) and mag > 0 else 1.0
        if pre == "add":
            c = (self.rng.standard_normal(C) * mag / 2).astype(np.float32)
            return self.node("Add", [name, self.const(f"add{k}_c", c)], f"pre{k}"), (v + c).astype(np.float32)
        if pre == "mul":
            c = (self.rng.choice([-1.0, 1.0], C) * 2.0 ** self.rng.uniform(-1, 1, C)).astype(np.float32)
            return self.node("Mul", [name, self.const(f"mul{k}_c", c)], f"pre{k}"), (v * c).astype(np.float32)
        if pre == "silu":
            sg = self.node("Sigmoid", [name], f"sig{k}")
            out = (v / (1 + np.exp(np.clip(-v.astype(np.float64), -700, 700)))).astype(np.float32)
            return self.node("Mul", [sg, name], f"pre{k}"), out
        return name, v

    def quantizer(self, k: int, name: str, v: np.ndarray, a: ActSpec, base_exp: int | None) -> tuple[str, np.ndarray]:
        tmin, tmax, zdt, domain = _code_type(a)
        self.wide |= domain == MS_DOMAIN
        N = a.levels - 1
        qmin = tmin + min(a.offset, (tmax - tmin) - N)
        qmax, z = qmin + N, qmin + a.zero
        e = (self.natural_exp(v, a.levels) if base_exp is None else base_exp) + a.exp
        s = np.float32(2.0 ** e * (1 + a.mant / 2 ** 23))
        s_name, z_name = self.const(f"s{k}", s), self.const(f"zp{k}", np.array(z, zdt))
        if a.clip or N < tmax - tmin:
            lo, hi = _f32_times(s, qmin - z + a.lo_eighths / 8), _f32_times(s, qmax - z + a.hi_eighths / 8)
            name = self.node("Clip", [name, self.const(f"lo{k}", lo), self.const(f"hi{k}", hi)], f"clip{k}")
            v = np.clip(v, lo, hi)
        q = self.node("QuantizeLinear", [name, s_name, z_name], f"q{k}", domain)
        self.quantizers.append(self.nodes[-1].name)
        codes = np.clip(np.rint(v / s) + z, qmin, qmax)
        return self.node("DequantizeLinear", [q, s_name, z_name], f"a{k}", domain), ((codes - z) * s).astype(np.float32)

    def matmul(self, k: int, tag: str, name: str, v: np.ndarray, O: int, wbits: int,
               dyadic: bool) -> tuple[str, np.ndarray]:
        I = v.shape[-1]
        wmax = 127 if wbits == 8 else 7
        W = self.rng.integers(-wmax, wmax + 1, (I, O)).astype(np.int8)
        e = np.round(np.log2(1.0 / (wmax * np.sqrt(I)))) + self.rng.integers(-1, 2, O)
        sw = (2.0 ** e * (1 if dyadic else self.rng.uniform(1, 2, O))).astype(np.float32)
        wd = self.node("DequantizeLinear", [self.const(f"W{k}{tag}", W), self.const(f"sw{k}{tag}", sw),
                                            self.const(f"wz{k}{tag}", np.zeros(O, np.int8))], f"Wd{k}{tag}", axis=1)
        y = self.node("MatMul", [name, wd], f"y{k}{tag}")
        self.values.append(y)
        return y, (v.astype(np.float64) @ (W.astype(np.float64) * sw)).astype(np.float32)

    def linear(self, k: int, name: str, v: np.ndarray, lin: LinearSpec) -> tuple[str, np.ndarray]:
        O = v.shape[-1] if lin.kind == "residual" else lin.out
        y, yv = self.matmul(k, "", name, v, O, lin.wbits, lin.dyadic)
        if lin.kind in ("add", "mul", "fork"):
            y2, y2v = self.matmul(k, "b", name, v, O, lin.wbits2, lin.dyadic)
            if lin.kind == "fork":
                self.outputs.append(y2)
                self.shapes[y2] = y2v.shape
            else:
                op = "Add" if lin.kind == "add" else "Mul"
                y = self.node(op, [y, y2], f"h{k}")
                yv = (yv + y2v) if lin.kind == "add" else (yv * y2v)
                self.values.append(y)
        elif lin.kind == "residual":
            y = self.node("Add", [y, name], f"h{k}")
            yv = yv + v
            self.values.append(y)
        return y, yv.astype(np.float32)

    def input(self, a: ActSpec) -> np.ndarray:
        """Values across the first quantizer's window and beyond it, exact ties and their neighbours."""
        shape = self.spec.rows + (self.spec.channels,)
        s = np.float32(2.0 ** (self.spec.scale_exp + a.exp) * (1 + a.mant / 2 ** 23))
        N, z = a.levels - 1, a.zero
        u = self.rng.uniform(-0.25, 1.25, shape) * N - z          # in steps: ~1/3 outside the window
        ties = self.rng.integers(-z - 2, N - z + 2, shape) + 0.5
        kind = self.rng.integers(0, 5, shape)                      # 0, 1: random; 2: tie; 3, 4: next to a tie
        x = np.where(kind < 2, u, ties) * np.float64(s)
        x = x.astype(np.float32)
        x = np.where(kind == 3, np.nextafter(x, np.float32(np.inf)), x)
        x = np.where(kind == 4, np.nextafter(x, np.float32(-np.inf)), x)
        return x.astype(np.float32)

    def build(self) -> tuple[onnx.ModelProto, np.ndarray]:
        spec = self.spec
        x = self.input(spec.stages[0][0])
        name, v = "x", x
        for k, (a, lin) in enumerate(spec.stages):
            name, v = self.pre_op(k, name, v, a.pre)
            if name != "x" and a.pre != "none" and k > 0:
                self.values.append(name)
            name, v = self.quantizer(k, name, v, a, spec.scale_exp if k == 0 else None)
            name, v = self.linear(k, name, v, lin)
        self.outputs.insert(0, name)
        self.shapes[name] = v.shape
        opsets = (("", 18), (MS_DOMAIN, 1)) if self.wide else (("", 18),)
        outs = [h.make_tensor_value_info(o, TP.FLOAT, list(self.shapes[o])) for o in self.outputs]
        model = onnx_model(self.nodes, [h.make_tensor_value_info("x", TP.FLOAT, list(x.shape))], outs,
                           self.inits, "random_qdq", opsets)
        return model, x


def random_qdq_model(spec: QdqGraphSpec) -> tuple[onnx.ModelProto, np.ndarray, dict]:
    """The QDQ model of ``spec``, an input ``x`` for it, and what the test compares.

    info: ``quantizers`` (QuantizeLinear node names), ``values`` (float tensors between stages
    that a hybrid compile keeps under the same name: MatMul outputs, their sums/products, float
    ops before a quantizer).
    """
    b = _QdqBuilder(spec)
    model, x = b.build()
    return model, x, {"quantizers": b.quantizers, "values": [v for v in b.values if v not in b.outputs]}


def compare_stages(qdq: onnx.ModelProto, compiled: onnx.ModelProto, x: np.ndarray,
                   level: ort.GraphOptimizationLevel, values: Iterable[str] = (), probes: bool = True) -> list[str]:
    """What differs between a compiled model and its QDQ model on input ``x``: [] when nothing.

    Both run under ``exact_options`` of the compiled model (the QDQ side as ``ttfsc verify``'s
    reference, the spiking side through ``open_session``). Every graph output must be equal, bit
    for bit. With ``probes``, as ``ttfsc verify`` compares them: also each emission's spike times,
    turned back into codes, against the codes of the QuantizeLinear it stands for (exact ties
    included: they must round the same), and the float tensors ``values`` both models keep.

    Probes belong at ORT_DISABLE_ALL: fetching a QuantizeLinear's output changes how onnxruntime
    fuses the QDQ model (an int8 activation's DQ -> MatMul then stays float instead of
    MatMulIntegerToFloat, 1 ulp apart), while the spiking model fuses the same either way.
    """
    outs = [o.name for o in qdq.graph.output]
    so = exact_options(compiled, default_options(level))
    plain_ref = ort.InferenceSession(qdq.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(outs, {"x": x})
    plain = open_session(compiled, default_options(level)).run(outs, {"x": x})
    bad = [f"output {n} differs: max |diff| {np.max(np.abs(a - b)) if a.shape == b.shape else 'shape'}"
           for n, a, b in zip(outs, plain_ref, plain)
           if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b)]
    if not probes:
        return bad
    from ttfsc.compiler.verify import find_probes  # a compiler-layer helper; graphs.py is imported widely
    from ttfsc.ttfs import is_exact_tie

    stages_ = find_probes(qdq, compiled)
    values = list(values)
    q_names = [p.codes for p in stages_] + [p.value for p in stages_] + values
    s_names = [p.spikes for p in stages_] + values
    ref = ort.InferenceSession(with_outputs(qdq, q_names).SerializeToString(), so, providers=["CPUExecutionProvider"])
    snn = open_session(with_outputs(compiled, s_names), default_options(level))
    qo = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, {"x": x})))
    co = dict(zip([o.name for o in snn.get_outputs()], snn.run(None, {"x": x})))
    for p in stages_:
        mine, theirs = p.snn_codes(co[p.spikes]), qo[p.codes].astype(np.int64) - p.code_min
        diff = mine != theirs
        if diff.any():
            ties = int((diff & is_exact_tie(qo[p.value], p.scale)).sum())
            bad.append(f"stage {p.stage} (T={p.T}): {int(diff.sum())} of {diff.size} codes differ "
                       f"({ties} at exact ties), e.g. QDQ {theirs[diff][:4].tolist()} vs SNN {mine[diff][:4].tolist()}")
    for n in values + outs:
        a, b = qo[n], co[n]
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
            bad.append(f"tensor {n} differs (probed): max |diff| {np.max(np.abs(a - b)) if a.shape == b.shape else 'shape'}")
    return bad
