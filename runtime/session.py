"""Opening an onnxruntime session on a spiking model.

``open_session(path)`` is the one documented call. It replaces every ``ai.ttfsc`` node by its
kernel (runtime.kernels and runtime.neuron, registered in runtime.lowerings) and hands the result
to an ordinary ``onnxruntime.InferenceSession``.
Weights are never copied: for a model with external data the lowered graph is written next to
the original (so relative data paths still resolve), loaded, and deleted.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ttfsc.dialect import code_range
from ttfsc.graph import MS_DOMAIN
from ttfsc.modelio import load_model, model_dir, serialize
from ttfsc.neuron import is_neuron
from ttfsc.runtime.lowerings import LOWERINGS
from ttfsc.ttfs import DOMAIN, clip_levels


def has_ttfs_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN for n in model.graph.node)


def lower_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every TTFS node is replaced by its native-op kernel."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, inits = [], []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        if node.op_type not in LOWERINGS:
            raise ValueError(f"node {node.name!r}: unknown TTFS operator {node.op_type}")
        lw = LOWERINGS[node.op_type](node)
        nodes.extend(lw.nodes)
        inits.extend(lw.inits)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    _fix_opsets(out)
    return out


def _fix_opsets(model: onnx.ModelProto) -> None:
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(o.domain == MS_DOMAIN for o in keep):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


def default_options(level: ort.GraphOptimizationLevel | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = level if level is not None else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def session_from_model(model: onnx.ModelProto, sess_options: ort.SessionOptions | None = None,
                       providers: list[str] | None = None) -> ort.InferenceSession:
    """An InferenceSession for an in-memory model whose external data sits in model_dir(model)."""
    so = sess_options or default_options()
    providers = providers or ["CPUExecutionProvider"]
    uses_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if not uses_external:
        return ort.InferenceSession(serialize(model), so, providers=providers)
    fd, tmp = tempfile.mkstemp(prefix=".ttfsc-session.", suffix=".onnx", dir=model_dir(model))
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            f.write(serialize(model))
        return ort.InferenceSession(tmp, so, providers=providers)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


SATURATION_FREE_T = 128  # 2 * 127 * 127 < 2^15: u8s8 pair sums cannot saturate below this window


def widest_window(model: onnx.ModelProto) -> int:
    """Largest number of code levels of any stage: a TTFS window T, or steps + 1 of a rate window."""
    levels = {"window": 0, "window_in": 0, "steps": 1, "steps_in": 1}
    return max((int(a.i) + levels[a.name] for n in model.graph.node if n.domain == DOMAIN
                for a in n.attribute if a.name in levels), default=0)


def exact_options(model: onnx.ModelProto, so: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """Session options that keep the integer math exact for this model.

    onnxruntime fuses DQ->MatMul into its u8s8 kernel, which on x86 CPUs without VNNI adds pairs
    of products in int16 and saturates once activation codes exceed 127 (T > 128). For such
    windows (of a spiking model, or of a plain QDQ model's activation quantizers) the Q/DQ fusions
    are disabled, so the MatMuls run in float on exact integer codes.
    """
    so = so or default_options()
    if max(widest_window(model), qdq_levels(model)) > SATURATION_FREE_T or is_full_twin(model):
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def qdq_levels(model: onnx.ModelProto) -> int:
    """Most code levels any activation QuantizeLinear of a plain QDQ model can produce.

    A Clip(lo, hi) in front of the quantizer (ttfsc's n-bit form) bounds the codes to
    (hi - lo) / scale + 1 levels; without one, the zero point's type does (256 for 8 bits).
    """
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def scalar(name: str) -> float | None:
        t = inits.get(name)
        if t is None or int(np.prod(t.dims)) != 1 or t.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return float(onnx.numpy_helper.to_array(t).reshape(-1)[0])

    widest = 0
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3 or n.input[2] not in inits:
            continue
        lowest, highest = code_range(inits[n.input[2]].data_type)
        levels = highest - lowest + 1
        clip, scale = producer.get(n.input[0]), scalar(n.input[1])
        if clip is not None and clip.op_type == "Clip" and len(clip.input) == 3 and scale:
            lo, hi = scalar(clip.input[1]), scalar(clip.input[2])
            if lo is not None and hi is not None:
                levels = min(levels, clip_levels(lo, hi, scale))
        widest = max(widest, levels)
    return widest


def is_full_twin(model: onnx.ModelProto) -> bool:
    """A `quantize --full` twin or its fully spiking compile.

    onnxruntime fuses such a twin's DQ->MatMul into integer kernels in some graphs and not in
    others (it depends on which tensors are fetched), so the QANN and the spiking model would
    round near-tie codes differently; both therefore run with Q/DQ fusions off, the reference
    `ttfsc verify` uses.
    """
    if any(is_neuron(n) for n in model.graph.node):
        return True
    return any(p.key == "ttfsc.full" and p.value == "1" for p in model.metadata_props)


def open_session(path: str | os.PathLike | onnx.ModelProto, sess_options: ort.SessionOptions | None = None,
                 providers: list[str] | None = None) -> ort.InferenceSession:
    """Open a spiking (or plain) ONNX model in onnxruntime, with the TTFS kernels installed."""
    model = path if isinstance(path, onnx.ModelProto) else load_model(Path(path))
    if has_ttfs_ops(model):
        sess_options = exact_options(model, sess_options)
        model = lower_model(model)
    else:
        sess_options = exact_options(model, sess_options)
    return session_from_model(model, sess_options, providers)
