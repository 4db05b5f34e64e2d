"""The function-preserving transforms quantization starts from: rotation, smoothing, online Hadamard.

Why first: they change which coordinates the float model computes in, never what it computes, so
they can be applied before calibration and make the per-tensor grids fit (rotate.py has the
math). Order matters: the rotation spreads the residual stream's outlier channels; smoothing then
measures the *rotated* model's channel maxima (after the prefix, so the sink does not set them);
the online Hadamards go last, before every down_proj input, which the residual rotation cannot
reach. Every later stage (prefix KV, calibration, search, GPTQ) runs on the transformed float
model, kept in a temporary folder beside the output and deleted afterwards.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ttfsc import modelio
from ttfsc.errors import TtfscError
from ttfsc.graph import extra_outputs
from ttfsc.quantizer.calibration import Log, calibrate, session
from ttfsc.quantizer.config import ROTATE_AUTO, QuantConfig
from ttfsc.quantizer.prefix import calibration_feeds
from ttfsc.quantizer.qdq import activation_names, find_linears
from ttfsc.quantizer.rotate import (analyse, merge_channel_max, rotate_down_inputs, rotate_model, smooth_model,
                                    smoothable_inputs)
from ttfsc.transaction import transaction


class ChannelMax:
    """Per-channel max|x| (last axis): the activation statistic SmoothQuant balances against weights."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        self.value = merge_channel_max(self.value, x)


@dataclass
class Transform:
    """The float model quantization starts from, and what was done to get it."""

    path: str                       # model to calibrate and quantize (the original or a temporary copy)
    prefix_mode: str | list[int]    # prefix for calibration: ids already chosen while smoothing, else as given
    meta: dict[str, str]            # ttfsc.rotation / ttfsc.smoothing (/ ttfsc.down_rotation)


def smooth(path: str, out: str, alpha: float, calib: Any, prefix_mode: str | list[int], samples: int,
           seqlen: int, log: Log) -> tuple[str | list[int], str]:
    """SmoothQuant ``path`` into ``out`` with channel maxima measured after the prefix.

    The prefix is chosen here (the sink would otherwise set every maximum) and its ids are handed
    on, so calibration of the smoothed model uses the same prefix without scanning again; the
    smoothing is function-preserving, so the sink tokens are the same.
    """
    model = modelio.load_model(path)
    acts = activation_names(model, find_linears(model))
    targets = smoothable_inputs(model)
    with extra_outputs(model, acts), session(model, path) as sess:
        feeds, prefix, _ = calibration_feeds(sess, path, acts, calib, prefix_mode, samples, seqlen, log)
        observers = calibrate(sess, targets, feeds, ChannelMax)
    act_max = {n: ob.value for n, ob in observers.items() if ob.value is not None}
    info = smooth_model(path, out, act_max, alpha=alpha)
    log(f"smoothing: alpha {alpha}, {len(info['smoothed'])} linear inputs (norm outputs, down_proj inputs)")
    chosen: str | list[int] = list(prefix.ids) if prefix is not None else "none"
    return chosen, f"alpha={alpha} tensors={len(info['smoothed'])}"


def resolve_auto(path: str, rotate: str, alpha: float, log: Log) -> tuple[str, float]:
    """``auto``: rotate (and smooth) a graph rotate.py recognises as a LLaMA decoder, leave others alone.

    Defaults must not make quantize refuse a graph it can quantize; an explicit --rotate does raise.
    """
    if rotate != "auto":
        return rotate, alpha
    try:
        analyse(modelio.load_model(path))
    except TtfscError as exc:
        log(f"rotation/smoothing: skipped, not a recognised LLaMA decoder ({str(exc)[:120]})")
        return "none", 0.0
    return ROTATE_AUTO, alpha


def wants_online_hadamard(online: str, rotate: str, full: bool) -> bool:
    """auto: the online down_proj Hadamard comes with a Hadamard rotation, except in --full twins
    (there the product gate*up is itself a quantized stage, so a float rotation after it has no place).

    ``online`` is a checked option (QuantConfig.check); ``rotate`` the rotation actually applied.
    """
    return online == "on" or (online == "auto" and rotate == "hadamard" and not full)


@contextlib.contextmanager
def transformed(path: str, out_dir: Path, config: QuantConfig, log: Log) -> Iterator[Transform]:
    """Rotate, smooth, then add online down_proj Hadamards to ``path`` in a temporary folder inside
    ``out_dir`` (deleted afterwards), as ``config`` asks."""
    meta = {"ttfsc.rotation": "none", "ttfsc.smoothing": "none"}
    rotate, alpha = resolve_auto(path, config.rotate, config.smooth_alpha, log)
    down = wants_online_hadamard(config.online_hadamard, rotate, config.full)
    if rotate == "none" and not alpha and not down:
        yield Transform(path, config.prefix_mode, meta)
        return
    with transaction() as txn:  # quantize's: the scratch folder goes with it however the run ends
        tmp = txn.scratch(out_dir, "transform")
        try:
            yield _transform(path, tmp, rotate, alpha, down, config, meta, log)
        finally:
            txn.release(tmp)


def _transform(path: str, tmp: Path, rotate: str, alpha: float, down: bool, config: QuantConfig,
               meta: dict[str, str], log: Log) -> Transform:
    """The transformed copies of ``path`` in the scratch folder ``tmp``, in order; the last is quantized."""
    prefix_mode, seed = config.prefix_mode, config.rotate_seed
    src = path
    if rotate != "none":
        t0 = time.perf_counter()
        src = str(tmp / "rotated" / "model.onnx")
        rotate_model(path, src, seed=seed, kind=rotate)
        meta["ttfsc.rotation"] = f"{rotate} seed={seed}"
        log(f"rotation: {rotate} seed {seed} ({time.perf_counter() - t0:.1f}s)")
    if alpha:
        smoothed = str(tmp / "smoothed" / "model.onnx")
        prefix_mode, meta["ttfsc.smoothing"] = smooth(src, smoothed, alpha, config.calib, prefix_mode,
                                                      config.calib_samples, config.calib_seqlen, log)
        src = smoothed
    if down:
        rotated = str(tmp / "online" / "model.onnx")
        info = rotate_down_inputs(src, rotated, seed=seed)
        meta["ttfsc.down_rotation"] = f"online hadamard seed={seed} blocks={info['rotated']}"
        log(f"online Hadamard before {info['rotated']} down_proj inputs (float x·H, factored; W_down := H^T W_down)")
        src = rotated
    return Transform(src, prefix_mode, meta)
