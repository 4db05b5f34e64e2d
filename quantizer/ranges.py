"""Activation ranges: from calibrated values to each tensor's quantizer (scale, zero point, Clip bounds).

Per tensor, static, asymmetric, 2..12 bits. With ``N = 2^abits - 1`` and a calibrated range
widened to hold 0, ``scale = (max - min) / N`` and ``z = clip(round(-min / scale), 0, N)``
(``ttfsc.ttfs.range_params``); the Clip in front of the QuantizeLinear has exactly the bounds
``ttfsc.ttfs.clip_bounds(scale, z, N)``, the value range of the equivalent TTFS stage.

Range search (``--method search``). Per tensor, the clipped range [r_lo*min, r_hi*max] (ratios
1.0 .. 0.25) of least mean squared error of the following linear layer's output on a seeded
subsample of calibration rows; minmax is a candidate, so it is never worse on that sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx

from ttfsc import modelio
from ttfsc.graph import extra_outputs
from ttfsc.quantizer.calibration import SEED, Log, calibrate, make_observer, session
from ttfsc.quantizer.prefix import calibration_feeds
from ttfsc.runtime.generate import Prefix
from ttfsc.ttfs import clip_bounds, grid_codes, grid_values, range_params, window_for_bits

SEARCH_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(16))  # clip ratios 1.0 .. 0.25
SEARCH_COLUMNS = 512  # output columns of the following linear(s) that score a clipping


@dataclass(frozen=True)
class ActParams:
    """Per-tensor asymmetric quantizer of one activation, plus its exact clip range."""

    scale: np.float32
    zero_point: int
    N: int
    lo: np.float32
    hi: np.float32


def activation_params(lo: float, hi: float, abits: int) -> ActParams:
    """The ``abits`` quantizer of range [lo, hi] (widened to hold 0) and its Clip bounds."""
    N = window_for_bits(abits) - 1
    scale, z = range_params(lo, hi, N)
    c_lo, c_hi = clip_bounds(float(scale), z, N)
    return ActParams(scale, z, N, c_lo, c_hi)


def fake_quant(x: np.ndarray, p: ActParams) -> np.ndarray:
    """Clip -> QuantizeLinear -> DequantizeLinear in numpy (round half to even), as the QANN computes it."""
    q = grid_codes(x, p.scale, p.zero_point, 0, p.N)
    return grid_values(q, p.scale, p.zero_point).astype(np.float32)


def split_finite(ranges: dict[str, tuple[float, float]],
                 bits: Callable[[str], int]) -> tuple[dict[str, ActParams], list[str]]:
    """Quantizers of the tensors with a finite range, and the names of the others (they stay float)."""
    params, skipped = {}, []
    for name, (lo, hi) in ranges.items():
        if np.isfinite(lo) and np.isfinite(hi):
            params[name] = activation_params(lo, hi, bits(name))
        else:
            skipped.append(name)
    return params, skipped


# ---------------------------------------------------------------- clipping search

def output_mse(x: np.ndarray, w: np.ndarray, lo: float, hi: float, abits: int) -> float:
    """Mean squared error of ``x @ w`` when ``x`` is quantized to [lo, hi] with ``abits`` bits."""
    err = fake_quant(x, activation_params(lo, hi, abits)) - x
    return float(np.mean(np.square(err @ w, dtype=np.float32)))


def search_range(x: np.ndarray, w: np.ndarray, lo: float, hi: float, abits: int) -> dict[str, float]:
    """Clipped range of minimal layer-output MSE: both ends scaled together, then each end alone.

    Ratio 1.0 (minmax) is always a candidate, so the result is never worse than minmax on ``x``.
    """
    def score(r_lo: float, r_hi: float) -> float:
        return output_mse(x, w, lo * r_lo, hi * r_hi, abits)

    best = min(((score(r, r), r, r) for r in SEARCH_RATIOS))
    best = min([best] + [(score(r, best[2]), r, best[2]) for r in SEARCH_RATIOS])
    best = min([best] + [(score(best[1], r), best[1], r) for r in SEARCH_RATIOS])
    mse, r_lo, r_hi = best
    return {"lo": lo * r_lo, "hi": hi * r_hi, "ratio_lo": r_lo, "ratio_hi": r_hi, "mse": mse,
            "mse_minmax": score(1.0, 1.0)}


def consumer_weights(model: onnx.ModelProto, linears: list[onnx.NodeProto], x: str) -> np.ndarray:
    """The weights of every linear reading ``x``, side by side, with at most SEARCH_COLUMNS seeded columns."""
    inits = modelio.Initializers(model)
    rng = np.random.default_rng(SEED)
    parts = []
    for node in linears:
        if node.input[0] == x:
            w = inits.value(node.input[1])
            cols = rng.choice(w.shape[1], SEARCH_COLUMNS, replace=False) if w.shape[1] > SEARCH_COLUMNS else slice(None)
            parts.append(np.asarray(w[:, cols], dtype=np.float32))
    w = np.concatenate(parts, axis=1)
    return w[:, np.sort(rng.choice(w.shape[1], SEARCH_COLUMNS, replace=False))] if w.shape[1] > SEARCH_COLUMNS else w


def searched_ranges(model: onnx.ModelProto, linears: list[onnx.NodeProto], observers: dict[str, Any],
                    bits: Callable[[str], int]) -> tuple[dict[str, tuple[float, float]], dict[str, dict[str, float]]]:
    """Per tensor, the searched (lo, hi); non-finite tensors keep their (non-finite) range and are skipped later.

    ``observers`` are row samples (calibration.RowSample): a range and whole token rows.
    """
    ranges, report = {}, {}
    for name, ob in observers.items():
        lo, hi = ob.range()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            ranges[name] = (lo, hi)
            continue
        r = search_range(ob.sample(), consumer_weights(model, linears, name), lo, hi, bits(name))
        ranges[name], report[name] = (r["lo"], r["hi"]), r
    return ranges, report


# ---------------------------------------------------------------- calibrating a model

@dataclass
class Calibration:
    """What calibration found: ranges per tensor, the prefix, the search report, and the data used."""

    ranges: dict[str, tuple[float, float]]
    prefix: Prefix | None
    search: dict[str, dict[str, float]]
    desc: str


def calibrate_model(model: onnx.ModelProto, path: str, linears: list[onnx.NodeProto], acts: list[str], calib: Any,
                    method: str, percentile: float, bits: Callable[[str], int], prefix_mode: str | list[int],
                    samples: int, seqlen: int, log: Log) -> Calibration:
    """Ranges of ``acts`` from the float model (after the prefix, if any); the model is left as loaded."""
    with extra_outputs(model, acts), session(model, path) as sess:
        feeds, prefix, desc = calibration_feeds(sess, path, acts, calib, prefix_mode, samples, seqlen, log)
        observers = calibrate(sess, acts, feeds, make_observer(method, percentile, len(feeds)))
    if method == "search":
        ranges, search = searched_ranges(model, linears, observers, bits)
    else:
        ranges, search = {n: ob.range() for n, ob in observers.items()}, {}
    return Calibration(ranges, prefix, search, desc)
