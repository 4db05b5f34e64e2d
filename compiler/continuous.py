"""``ttfsc compile --neuron continuous``: the continuous-kernel (TTFSFormer-style) baseline.

What QC-A2S is compared against (paper Sec. 3.1-3.2, Tables 1-2 "TTFSFormer T=8192"): a spiking
model built from the continuous-time theory, Eq. 4, with no quantization consistency. From the
*float* model:

1. min/max calibration of every linear layer's input (the same tensors the QANN quantizes),
   without prefix, rotation, smoothing or clipping search: TTFSFormer has none of them;
2. one continuous-kernel stage per tensor on its range ``[a, b]`` with ``tau = T/(b - a)``
   (passes/qdq_to_continuous.py; ttfsc.ttfs.ContinuousStage), float weights in the receivers;
3. the usual decode -> receive folding and dead-code passes (the registry's ``continuous``).

Each stage is a floor quantizer onto T levels of its float range, so the model is evaluated
against the FP model (perplexity): it is not bit-exact to any QANN and ``ttfsc verify`` does
not apply. Windows from 16 to 8192 slots (``ttfsc.ttfs.continuous_window``).

``ContinuousCompile`` is this baseline's plan for the compile skeleton (compiler/pipeline.py).
"""
from __future__ import annotations

from typing import Any, Callable

import onnx

from ttfsc.dialect import ContinuousEmitSpec, emissions
from ttfsc.errors import TtfscError
from ttfsc.modelio import load_model
from ttfsc.passes.registry import PassOptions
from ttfsc.quantizer.calibration import check_calib_text, check_finite_weights
from ttfsc.quantizer.config import compile_options
from ttfsc.quantizer.qdq import activation_names, float_linears
from ttfsc.quantizer.ranges import calibrate_model
from ttfsc.runtime.generate import PREFIX_META
from ttfsc.ttfs import continuous_window

#: the quantization options of `ttfsc compile` this baseline reads (its float ranges come from calibration text)
CALIBRATION_OPTIONS = ("calib", "calib_samples", "calib_seqlen")


def qann_only_options() -> tuple[str, ...]:
    """The options of `ttfsc compile` that only the QANN path uses: said aloud when the baseline ignores them."""
    return tuple(o for o in compile_options() if o not in CALIBRATION_OPTIONS)


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
    check_calib_text(calib)
    model = load_model(model_path)
    check_finite_weights(model, model_path)  # an Inf weight gave NaN ranges and a compile that "succeeded"
    linears = float_linears(model, model_path, "; --neuron continuous needs the float model (as exported by "
                            "`ttfsc export`), not a QDQ one.")
    acts = activation_names(model, linears)
    cal = calibrate_model(model, model_path, linears, acts, calib, "minmax", 100.0, lambda _n: 8,
                          "none", samples, seqlen, log)
    return cal.ranges


def stages(model: onnx.ModelProto) -> list[dict]:
    """One entry per continuous stage: its window, float range and time constant."""
    out = []
    for n, e in emissions(model):
        if isinstance(e, ContinuousEmitSpec):
            st = e.stage()
            out.append({"stage": n.name, "coding": "continuous", "steps": e.T, "window": e.T, "a": e.a, "b": e.b,
                        "tau": st.tau, "step": float(st.step), "source_tensor": e.source_tensor})
    return out


class ContinuousCompile:
    """The continuous baseline's plan: TTFS coding from the float model, no QANN (no --requantize)."""

    pipeline = "continuous"

    def __init__(self, T: int | str, coding: str, requantize: bool, quant_options: dict | None,
                 log: Callable[..., Any]):
        if coding != "ttfs" or requantize:
            raise TtfscError("--neuron continuous is a TTFS baseline built from the float model: "
                             "drop --coding rate / --requantize.")
        check_window(T)
        self.T = int(T)
        self.quant_options = quant_options or {}
        self.log = log

    def prepare(self, model: onnx.ModelProto, model_path: str, out_path: str,
                qdq: bool) -> tuple[onnx.ModelProto, dict, PassOptions]:
        """The float model and the min/max range of each linear input, which set the stages."""
        if qdq:
            raise TtfscError(f"{model_path} is a QDQ model; --neuron continuous converts the float model "
                             "(its ranges come from min/max of float activations). Give the float .onnx.")
        self.log(f"ttfsc: continuous-kernel baseline at T={self.T}: min/max ranges of the float model, float "
                 f"weights (quantization options {', '.join(qann_only_options())} do not apply); compare with the FP model, "
                 "not with verify.")
        opts = self.quant_options
        ranges = float_ranges(model_path, opts.get("calib"), opts.get("calib_samples", 8),
                              opts.get("calib_seqlen", 128), self.log)
        report: dict = {"input": str(model_path), "T": self.T, "coding": "ttfs", "neuron": "continuous"}
        return model, report, PassOptions(self.T, ranges=ranges)

    def check(self, model: onnx.ModelProto, model_path: str) -> None:
        if not stages(model):
            raise TtfscError(f"{model_path}: no linear layer input could become a continuous stage; see --json.")

    def stages(self, model: onnx.ModelProto) -> list[dict]:
        return stages(model)

    def coverage(self, model: onnx.ModelProto, src_dir: str | None) -> dict:
        return {}

    def metadata(self) -> tuple[tuple[str, ...], dict[str, str]]:
        """T, coding and neuron; an empty prefix so a prefix.npz nearby is never applied to this model."""
        entries = {"ttfsc.T": str(self.T), "ttfsc.coding": "ttfs", "ttfsc.neuron": "continuous", PREFIX_META: ""}
        return tuple(entries), entries
