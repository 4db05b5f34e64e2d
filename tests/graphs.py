"""Tiny hand-built QDQ graphs for the pass and runtime tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as TP, helper as h, numpy_helper as nh

from ttfsc.ttfs import clip_bounds


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
    g = h.make_graph(nodes, "qlin", [h.make_tensor_value_info("x", TP.FLOAT, [M, I])], outputs, inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 9
    x = (rng.standard_normal((M, I)) * N * scale / 3).astype(np.float32)
    x[0, :8] = (np.arange(8) - 4 + 0.5) * scale  # exact ties
    return model, {"x": x, "scale": scale, "zero_point": z, "N": N}


def qdq_fusions_disabled(so) -> bool:
    """Whether session options turn onnxruntime's Q/DQ fusions off (exact integer math above 128 levels)."""
    try:
        return so.get_session_config_entry("session.disable_quant_qdq") == "1"
    except RuntimeError:  # onnxruntime raises for an entry that was never set
        return False
