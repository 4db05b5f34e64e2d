"""Static post-training quantization of a LLaMA ONNX decoder into a QDQ model (the "QANN").

``quantize_model`` is the one entry point (``ttfsc quantize``, ``ttfsc compile`` of a float model,
the sweep). It runs the package's stages in order, each in its own module:

* config.py: the options (``QuantConfig``), checked before any file is read;
* transforms.py: rotation, smoothing and online Hadamards of the float model (rotate.py's math);
* prefix.py + calibration.py: the outlier prefix and the calibration feeds after it, observers;
* ranges.py: ranges per activation (min/max, percentile or the clipping search) -> quantizers;
* gptq.py (W4 default) or round to nearest (weights.py): the weight codes;
* qdq.py: writing the QDQ graph (the QANN's contract is documented there), or full.py for the
  fully quantized twin of ``--full``.

Per tensor, static, asymmetric activations of 2..12 bits; per-channel symmetric int8 weights at 8 or
4 bits. The QANN is an ordinary onnxruntime model; ``prefix.npz`` beside it holds the float KV cache
of the prefix, if any, and the tokenizer and config files are copied next to it.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ttfsc import modelio
from ttfsc.quantizer.calibration import Log, check_calib_text, check_finite_weights
from ttfsc.quantizer.config import WEIGHT_BITS, QuantConfig, check_overrides_match
from ttfsc.quantizer.full import quantize_float_full
from ttfsc.quantizer.gptq import collect_hessians
from ttfsc.quantizer.prefix import declares_prefix, input_files, save_prefix
from ttfsc.quantizer.qdq import activation_names, check_opset, float_linears, write_qann
from ttfsc.quantizer.ranges import SEARCH_RATIOS, ActParams, Calibration, calibrate_model, split_finite
from ttfsc.quantizer.transforms import Transform, transformed
from ttfsc.runtime.generate import PREFIX_FILE, PREFIX_META, format_ids
from ttfsc.transaction import guard, transaction


def quantize_model(model_path: str | os.PathLike, out_path: str | os.PathLike, config: QuantConfig | None = None,
                   log: Log = print) -> dict:
    """Quantize ``model_path`` into a QDQ model at ``out_path`` as ``config`` asks; returns a summary dict.

    The float model is first transformed (function-preserving, transforms.py) and the QANN is
    quantized from the transformed one; the prefix's float KV cache, if any, is saved as
    ``prefix.npz`` beside the output and every Generator on the output applies it.
    """
    config = config or QuantConfig()
    config.check()
    if config.calib is not None and not isinstance(config.calib, (str, os.PathLike)):
        # read once: smoothing and calibration both iterate the feeds
        config = dataclasses.replace(config, calib=[dict(f) for f in config.calib])
    path = str(model_path)
    check_calib_text(config.calib)
    model = modelio.load_model(path)
    check_opset(model, path)
    check_finite_weights(model, path)
    out_dir = Path(out_path).resolve().parent
    with transaction():  # the QANN, its data, prefix.npz and the sidecars: all or nothing
        guard(quantize_outputs(out_path, model), input_files(model, path))
        with transformed(path, out_dir, config, log) as tf:
            if config.full:
                summary = quantize_float_full(tf, path, str(out_path), config, log)
            else:
                summary = quantize_float(tf, path, out_path, config, log)
        modelio.copy_sidecars(str(Path(path).resolve().parent), str(out_dir))
    return summary


def quantize_outputs(out_path: str | os.PathLike, model: Any) -> dict[Path, str]:
    """What quantize writes that could clobber an input: the QANN, its data, and prefix.npz beside it when the
    input has a prefix of its own (any other prefix.npz there belongs to a sibling model, replaced as always)."""
    out = Path(out_path)
    files = {out: "the output", out.with_name(modelio.data_file_name(out)): "the output's data file"}
    if declares_prefix(model):
        files[out.with_name(PREFIX_FILE)] = "the output's prefix.npz"
    return files


def quantize_float(tf: Transform, original: str, out_path: str | os.PathLike, config: QuantConfig, log: Log) -> dict:
    """Calibrate and quantize the (transformed) float model ``tf.path``; write the QANN and prefix.npz."""
    path = tf.path
    model = modelio.load_model(path)
    linears = float_linears(model, original)
    acts = activation_names(model, linears)
    check_overrides_match(config.overrides, acts)
    t0 = time.perf_counter()
    cal = calibrate_model(model, path, linears, acts, config.calib, config.method, config.percentile, config.bits,
                          tf.prefix_mode, config.calib_samples, config.calib_seqlen, log)
    t_calib = time.perf_counter() - t0
    params, skipped = split_finite(cal.ranges, config.bits)
    for name in skipped:
        log(f"skipped activation {name}: calibrated range {cal.ranges[name]} is not finite; it stays float")
    weight_method = config.weight_rounding
    meta = {"ttfsc.abits": str(config.abits), "ttfsc.wbits": str(config.wbits), "ttfsc.method": config.method_desc,
            "ttfsc.abits_for": ",".join(f"{k}={v}" for k, v in config.overrides.items()),
            "ttfsc.calibration": cal.desc, PREFIX_META: format_ids(cal.prefix.ids) if cal.prefix else "", **tf.meta,
            "ttfsc.weight_method": weight_method}
    hessians = None
    if weight_method == "gptq":
        hessians = collect_hessians(model, path, linears, params, config.calib,
                                    cal.prefix.ids if cal.prefix else None, config.calib_samples,
                                    config.calib_seqlen, log)
    n_weights = write_qann(model, linears, params, config.wbits, meta, out_path, hessians)
    if cal.prefix is not None:
        save_prefix(cal.prefix, Path(out_path).resolve().parent / PREFIX_FILE)
    summary = _summary(original, out_path, config, tf, cal, params, skipped, n_weights, t_calib)
    _log_summary(summary, cal, params, log)
    return summary


def _summary(original: str, out_path: str | os.PathLike, config: QuantConfig, tf: Transform, cal: Calibration,
             params: dict[str, ActParams], skipped: list[str], n_weights: int, t_calib: float) -> dict:
    """What quantize_model returns (and the sweep and compile reports keep)."""
    return {
        "model": original, "output": str(out_path), "wbits": config.wbits, "abits": config.abits,
        "method": config.method, "weight_method": config.weight_rounding,
        "percentile": config.percentile if config.method == "percentile" else None, "weights": n_weights,
        "activations": len(params), "skipped": skipped, "calibration": cal.desc,
        "calibration_seconds": round(t_calib, 3), "rotation": tf.meta["ttfsc.rotation"],
        "smoothing": tf.meta["ttfsc.smoothing"],
        "prefix": {"tokens": list(cal.prefix.ids), "kv_bytes": cal.prefix.kv_bytes} if cal.prefix else None,
        "search": cal.search,
        "ranges": {n: {"min": cal.ranges[n][0], "max": cal.ranges[n][1], "scale": float(p.scale),
                       "zero_point": p.zero_point} for n, p in params.items()},
    }


def _log_summary(summary: dict, cal: Calibration, params: dict[str, ActParams], log: Log) -> None:
    wbits, abits = summary["wbits"], summary["abits"]
    stored = "int8" if wbits == 8 else "int4 codes stored in int8"
    log(f"quantized {summary['weights']} weights to {stored} (per channel, |q| <= {WEIGHT_BITS[wbits]}, "
        f"{summary['weight_method']}) and "
        f"{len(params)} activations to {abits} bits ({summary['method']}); {len(summary['skipped'])} skipped")
    log(f"calibration: {cal.desc} ({summary['calibration_seconds']:.1f}s)")
    if cal.search:
        ratios = [min(r["ratio_lo"], r["ratio_hi"]) for r in cal.search.values()]
        log(f"clipping search: {sum(r < 1.0 for r in ratios)} of {len(ratios)} tensors clipped "
            f"(median smallest ratio {float(np.median(ratios)):.2f}, {sum(r == SEARCH_RATIOS[-1] for r in ratios)} at the floor)")
    if abits == 8 and wbits == 8:
        log("note: W8A8 may saturate in onnxruntime's fused u8s8 kernels on CPUs without VNNI; "
            "run it with session option session.disable_quant_qdq=1 for exact QDQ numerics")
    _log_ranges(cal.ranges, params, log)
    if cal.prefix is not None:
        log(f"wrote {PREFIX_FILE} beside the model: tokens [{format_ids(cal.prefix.ids)}], "
            f"{cal.prefix.kv_bytes / 1024:.0f} KiB float KV cache")
    log(f"wrote {summary['output']}")


def _log_ranges(ranges: dict[str, tuple[float, float]], params: dict[str, ActParams], log: Log,
                limit: int = 24) -> None:
    for i, (name, p) in enumerate(params.items()):
        if i == limit:
            log(f"  ... {len(params) - limit} more")
            break
        lo, hi = ranges[name]
        log(f"  {name}: [{lo:.4g}, {hi:.4g}] scale {float(p.scale):.4g} zero_point {p.zero_point}")


def quantize_cli(args: Any) -> int:
    """``ttfsc quantize MODEL -o OUT [options of QuantConfig]``."""
    quantize_model(args.model, args.output, QuantConfig.from_args(args))
    return 0
