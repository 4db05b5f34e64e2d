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
