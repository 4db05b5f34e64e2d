"""``ttfsc compile --neuron continuous``: the continuous-kernel (TTFSFormer-style) baseline.

What QC-A2S is compared against (paper Sec. 3.1-3.2, Tables 1-2 "TTFSFormer T=8192"): a spiking
model built from the continuous-time theory, Eq. 4, with no quantization consistency. From the
*float* model:

1. min/max calibration of every linear layer's input (the same tensors the QANN quantizes),
   without prefix, rotation, smoothing or clipping search: TTFSFormer has none of them;
2. one continuous-kernel stage per tensor on its range ``[a, b]`` with ``tau = T/(b - a)``
   (passes/qdq_to_continuous.py; ttfsc.ttfs.ContinuousStage), float weights in the receivers;
3. the usual decode -> receive folding and dead-code passes.

Each stage is a floor quantizer onto T levels of its float range, so the model is evaluated
against the FP model (perplexity): it is not bit-exact to any QANN and ``ttfsc verify`` does
not apply. Windows from 16 to 8192 slots (``ttfsc.ttfs.continuous_window``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import onnx

from ttfsc.quantizer import quantize
from ttfsc.errors import TtfscError
from ttfsc.modelio import copy_sidecars, load_model, model_dir, save_model
from ttfsc.passes.dead_code import DeadCode
from ttfsc.passes.decode_matmul_to_receive import DecodeMatMulToReceivePass
from ttfsc.passes.qdq_to_continuous import ActivationsToContinuous
from ttfsc.runtime.generate import PREFIX_META
from ttfsc.dialect import ContinuousEmitSpec, emit_spec
from ttfsc.ttfs import DOMAIN, DOMAIN_VERSION, continuous_window

#: options of `ttfsc compile` that the QANN path uses but this baseline does not
QANN_ONLY = ("wbits", "method", "percentile", "prefix", "rotate", "rotate_seed", "smooth", "abits_for")


def check_window(T: int | str) -> int:
    """-T for the continuous baseline: a power of two from 16 to 8192 (one clear error otherwise)."""
    try:
        return continuous_window(int(T))
    except ValueError as exc:
        detail = str(exc) if str(T).lstrip("-").isdigit() else f"-T {T}: give a power of two from 16 to 8192"
        raise TtfscError(f"--neuron continuous: {detail}") from None


def float_ranges(model_path: str, calib: Any = None, samples: int = 8, seqlen: int = 128,
                 log: Callable[[str], Any] = print) -> dict[str, tuple[float, float]]:
    """min/max of every linear layer's input in the float model, on quantize's calibration data.

    Same tensors, same calibration text (``calib`` None: self-generated) as ``ttfsc quantize``,
    but method minmax and no prefix: the ranges a continuous conversion of the float model sees.
    """
    model = load_model(model_path)
    linears = quantize.find_linears(model)
    if not linears:
        raise TtfscError(f"{model_path}: no MatMul with a float32 initializer weight; --neuron continuous "
                         "needs the float model (as exported by `ttfsc export`), not a QDQ one.")
    acts = quantize._activation_names(model, linears)
    cal = quantize._calibrate_model(model, model_path, linears, acts, calib, "minmax", 100.0, lambda _n: 8,
                                    "none", samples, seqlen, log)
    return cal.ranges


def stages(model: onnx.ModelProto) -> list[dict]:
    """One entry per continuous stage: its window, float range and time constant."""
    out = []
    for n in model.graph.node:
        e = emit_spec(n)
        if isinstance(e, ContinuousEmitSpec):
            st = e.stage()
            out.append({"stage": n.name, "coding": "continuous", "steps": e.T, "window": e.T, "a": e.a, "b": e.b,
                        "tau": st.tau, "step": float(st.step), "source_tensor": e.source_tensor})
    return out


def compile_continuous(model_path: str, out_path: str, T: int | str, quant_options: dict | None = None,
                       log: Callable[[str], Any] = print) -> dict:
    """Compile the float model ``model_path`` into the continuous-kernel baseline at ``out_path``."""
    from ttfsc.compiler.pipeline import _check_saved, is_qdq, latency_per_token

    check_window(T)
    T = int(T)
    opts = quant_options or {}
    t0 = time.perf_counter()
    model = load_model(model_path)
    src_dir = model_dir(model)
    if is_qdq(model):
        raise TtfscError(f"{model_path} is a QDQ model; --neuron continuous converts the float model "
                         "(its ranges come from min/max of float activations). Give the float .onnx.")
    log(f"ttfsc: continuous-kernel baseline at T={T}: min/max ranges of the float model, float weights "
        f"(quantization options {', '.join(QANN_ONLY)} do not apply); compare with the FP model, not with verify.")
    ranges = float_ranges(model_path, opts.get("calib"), opts.get("calib_samples", 8), opts.get("calib_seqlen", 128), log)
    report: dict = {"input": str(model_path), "T": T, "coding": "ttfs", "neuron": "continuous"}
    report["passes"] = [p.run(model).as_dict()
                        for p in (ActivationsToContinuous(T, ranges), DecodeMatMulToReceivePass(), DeadCode())]
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    report["stages"] = stages(model)
    if not report["stages"]:
        raise TtfscError(f"{model_path}: no linear layer input could become a continuous stage; see --json.")
    report["latency_steps_per_token"] = latency_per_token(model)
    _set_meta(model, T)
    save_model(model, out_path)
    _check_saved(out_path, model_path)
    copy_sidecars(src_dir, str(Path(out_path).resolve().parent))
    report["compile_seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _set_meta(model: onnx.ModelProto, T: int) -> None:
    """T, coding and neuron; an empty prefix so a prefix.npz nearby is never applied to this model."""
    keep = [p for p in model.metadata_props if p.key not in ("ttfsc.T", "ttfsc.coding", "ttfsc.neuron", PREFIX_META)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in (("ttfsc.T", str(T)), ("ttfsc.coding", "ttfs"), ("ttfsc.neuron", "continuous"), (PREFIX_META, "")):
        model.metadata_props.add(key=k, value=v)
