"""Static post-training quantization of a LLaMA ONNX decoder into a QDQ model (the "QANN").

The QANN is an ordinary ONNX model that plain onnxruntime runs; the TTFS compiler later reads its
scales and zero points, so the representation below is a contract, not an implementation detail.

Targets. Every ``MatMul`` whose second input is a float32 initializer (a linear layer, weight
``[in, out]``, lm_head included). Nothing else is touched: the attention-mask ``Add`` and the
attention score / probability-value ``MatMul``s (both inputs computed) stay float.

Weights: per output channel (axis 1 of ``[in, out]``), symmetric, zero point 0::

    W_q (int8 initializer) --DequantizeLinear(axis=1, scale[out], zero_point int8[out] = 0)--> MatMul

``--wbits 8`` stores codes in ``[-127, 127]`` (-128 is never used, so the grid is symmetric).
``--wbits 4`` stores codes in ``[-7, 7]`` *in an int8 tensor*: ONNX ``INT4`` needs opset 21 and the
exported decoder is opset 18, so the width is carried by the code range (and by the metadata key
``ttfsc.wbits``), not by the type.

Activations (the first input of each target): per tensor, static, asymmetric, 2..12 bits. With
``N = 2^abits - 1``, calibrated ``min <= 0 <= max``, ``scale = (max - min) / N`` and
``z = clip(round(-min / scale), 0, N)``. An n-bit code has no ONNX type, so it is carried in a
wider unsigned type and restricted to ``0..N`` by a ``Clip`` whose bounds are exactly
``ttfsc.ttfs.clip_bounds(scale, z, N)`` (the value range of the equivalent TTFS stage)::

    x --Clip(lo, hi)--> QuantizeLinear(scale, z) --> DequantizeLinear(scale, z) --> MatMul(s)

For ``abits <= 8`` the zero point is ``uint8`` and the standard ops are used. For 9..12 bits it is
``uint16`` and the Q/DQ nodes are onnxruntime's ``com.microsoft`` contrib ops (standard ONNX only
accepts 16-bit codes from opset 21). Scale and zero point are scalar initializers. A tensor
feeding several targets (q/k/v share their input) gets one Clip->Q->DQ chain shared by all.

Running the QANN. ``onnxruntime`` with its default optimisations fuses DQ->MatMul into integer
kernels (MatMulIntegerToFloat, MatMulNBits). On x86 CPUs without VNNI the u8 x s8 kernel adds
pairs of products in int16, which saturates when 8-bit activation codes (up to 255) meet 8-bit
weight codes (up to 127): W8A8 then runs visibly less accurately than its own QDQ math. For
bit-exact QDQ numerics set the session option ``session.disable_quant_qdq = 1`` (or disable graph
optimisations); abits <= 7 or wbits = 4 cannot saturate.

Calibration runs the float model in onnxruntime with every target activation added as a graph
output, on text from ``--calib`` or, without it, on sequences the model samples itself from BOS.

Outlier prefix (``--prefix auto``, after PrefixQuant). In SmolLM2 whatever token stands first is
an attention sink whose down_proj input peaks ~2,000x above the median token, so a per-tensor
range fitted to it leaves ordinary tokens a handful of codes. Calibration first scans the float
model for such positions and tokens, then picks a prefix: BOS, plus any token that is an outlier
only as a sink (prefixing it must at least halve its outlier count; tokens that are large at every
occurrence stay out). The prefix's KV cache, computed once by the float model, is saved as
``prefix.npz`` beside the output (metadata ``ttfsc.prefix`` = its token ids) and every
``Generator`` runs sequences after it; calibration itself runs after it, so the ranges never see
the sink.

Range search (``--method search``). Per tensor, the clipped range [r_lo*min, r_hi*max] (ratios
1.0 .. 0.25) of least mean squared error of the following linear layer's output on a seeded
subsample of calibration rows; minmax is a candidate, so it is never worse on that sample.

Memory stays bounded: weights are read one at a time (memory-mapped for external data), quantized
in row blocks and spilled to a temporary file that ``modelio.save_model`` streams into the output.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ttfsc import modelio
from ttfsc.errors import TtfscError
from ttfsc.quantizer.rotate import ONLINE_TRANSFORM_SUFFIX, KINDS as ROTATIONS, rotate_down_inputs, analyse, merge_channel_max, rotate_model, smooth_model, smoothable_inputs
from ttfsc.runtime.generate import PREFIX_FILE, PREFIX_META, Generator, Prefix, format_ids
from ttfsc.ttfs import MAX_BITS, MIN_BITS, clip_bounds, window_for_bits

MS_DOMAIN = "com.microsoft"
WEIGHT_BITS = {8: 127, 4: 7}  # wbits -> largest symmetric code
METHODS = ("minmax", "percentile", "search")
DEFAULT_METHOD = "search"  # measured best on SmolLM2-135M W8A6/W8A4 (benchmarks/lowT.md)
PREFIX_MODES = ("auto", "none", "bos")  # or explicit comma-separated token ids
SEED = 0
PERCENTILE_SUBSAMPLE = 1 << 16  # values kept per tensor per calibration sequence
OUTLIER_RATIO = 10.0  # a token is an outlier when its peak |activation| exceeds 10x the median peak
MAX_PREFIX_TOKENS = 4  # BOS + up to 3 other outlier tokens (PrefixQuant uses 1-4)
DETECT_SEQUENCES = 4  # calibration sequences the outlier scan looks at
SEARCH_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(16))  # clip ratios 1.0 .. 0.25
SEARCH_ROWS = 256  # token rows per tensor kept for the clipping search (over all sequences)
SEARCH_COLUMNS = 512  # output columns of the following linear(s) that score a clipping
BLOCK_BYTES = 64 << 20  # weight rows processed at once (float32 bytes)
DEFAULT_BOS = 1
ROTATE_AUTO = "hadamard"  # what --rotate auto applies to a recognised LLaMA decoder
DEFAULT_ROTATE = "auto"  # SmolLM2 W8A6: 71.2 -> 34.0 with smoothing (benchmarks/lowT.md)
ONLINE_CHOICES = ("auto", "on", "off")  # online Hadamard before down_proj; auto: with a Hadamard rotation, not --full
DEFAULT_SMOOTH = 0.5  # SmoothQuant alpha before calibration, 0 = off (benchmarks/lowT.md)
LOW_BIT_SMOOTH = 0.75  # at <= 4 activation bits: SmolLM2 W8A4 163 (0.5) -> 109 (0.75), benchmarks/lowT.md
DEFAULT_WEIGHT_METHOD = {4: "gptq", 8: "rtn"}  # SmolLM2 W4A6 RTN 99.7 -> GPTQ 46.3 (benchmarks/bits_T.md); W8A6 GPTQ 24.04 vs RTN 23.99: no gain


def bits_for(name: str, abits: int, overrides: dict[str, int] | None) -> int:
    """Activation width of tensor ``name``: the first override whose pattern it contains, else ``abits``.

    Per-stage widths let a few sensitive tensors get a wider TTFS window (more latency only on
    their stages) while the rest stay narrow; ``ttfsc compile -T auto`` keeps each stage's window.
    """
    for pattern, bits in (overrides or {}).items():
        if pattern in name:
            return bits
    return abits


def parse_bits_overrides(specs: Sequence[str] | None) -> dict[str, int]:
    """``["mlp/Mul=8", ...]`` -> {"mlp/Mul": 8}; bad syntax or widths are a clear error."""
    out: dict[str, int] = {}
    for spec in specs or ():
        pattern, sep, bits = spec.rpartition("=")
        if not sep or not pattern or not bits.isdigit() or not MIN_BITS <= int(bits) <= MAX_BITS:
            raise TtfscError(f"--abits-for {spec!r}: expected PATTERN=BITS with BITS in {MIN_BITS}..{MAX_BITS}, "
                             "e.g. --abits-for mlp/Mul=8 (PATTERN is a substring of the activation tensor name).")
        out[pattern] = int(bits)
    return out


def default_smooth(abits: int) -> float:
    """SmoothQuant alpha when none is given: stronger migration pays off at 4 bits and below."""
    return LOW_BIT_SMOOTH if abits <= 4 else DEFAULT_SMOOTH
Chain = tuple[list[onnx.NodeProto], str]  # new nodes and the tensor their consumers read


# ---------------------------------------------------------------- validation and discovery

def _check_options(wbits: int, abits: int, method: str, percentile: float, calib_samples: int,
                   calib_seqlen: int, prefix: str, rotate: str = "none", smooth: float = 0.0) -> None:
    """Reject bad options before any file is read, so errors are about the option, not the model."""
    if wbits not in WEIGHT_BITS:
        raise TtfscError(f"--wbits {wbits} is not supported; use 8 or 4.")
    if not MIN_BITS <= abits <= MAX_BITS:
        raise TtfscError(f"--abits {abits} is outside {MIN_BITS}..{MAX_BITS}; pick an activation width in that range (e.g. 6).")
    if method not in METHODS:
        raise TtfscError(f"--method {method} is unknown; use one of {', '.join(METHODS)}.")
    if method == "percentile" and not 50.0 < percentile <= 100.0:
        raise TtfscError(f"--percentile {percentile} must be in (50, 100], e.g. 99.99.")
    if calib_samples < 1:
        raise TtfscError(f"--calib-samples {calib_samples} must be at least 1.")
    if calib_seqlen < 2:
        raise TtfscError(f"--calib-seqlen {calib_seqlen} must be at least 2.")
    if rotate not in ("auto", "none", *ROTATIONS):
        raise TtfscError(f"--rotate {rotate} is unknown; use auto, none, {', '.join(ROTATIONS)}.")
    if not 0.0 <= smooth <= 1.0:
        raise TtfscError(f"--smooth {smooth} is outside [0, 1]; 0 turns smoothing off, SmoothQuant uses 0.5.")
    parse_prefix(prefix)


def parse_prefix(prefix: str) -> str | list[int]:
    """``auto``, ``none``, ``bos``, or explicit token ids "1,198" (returned as a list)."""
    if prefix in PREFIX_MODES:
        return prefix
    try:
        ids = [int(t) for t in prefix.split(",")]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise TtfscError(f"--prefix {prefix} is not valid; use auto, none, bos or token ids such as 1,198.")
    return ids


def find_linears(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a 2-D float32 initializer: the model's linear layers."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        if ONLINE_TRANSFORM_SUFFIX in node.name:  # a constant rotation kept in float by design
            continue
        w = inits.get(node.input[1])
        if w is not None and w.data_type == TensorProto.FLOAT and len(w.dims) == 2:
            out.append(node)
    return out


def _activation_names(model: onnx.ModelProto, linears: list[onnx.NodeProto]) -> list[str]:
    """Distinct first inputs of the linears, in graph order; constants are not activations."""
    inits = {t.name for t in model.graph.initializer}
    names: list[str] = []
    for node in linears:
        x = node.input[0]
        if x and x not in inits and x not in names:
            names.append(x)
    return names


def _check_opset(model: onnx.ModelProto, path: str) -> None:
    """Per-axis DequantizeLinear needs opset 13; the Optimum export is 18."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < 13:
        raise TtfscError(f"{path}: opset {version} is too old for per-channel QDQ (needs 13+). "
                         "Re-export the model with `ttfsc export` (opset 18).")


# ---------------------------------------------------------------- onnxruntime sessions

def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


@contextlib.contextmanager
def _session(model: onnx.ModelProto, path: str) -> Iterator[Any]:
    """A CPU session for ``model`` as it is now; external data is found by saving beside the original.

    The temporary graph file is deleted as soon as the session has loaded it.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        if not _uses_external_data(model):
            yield ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return
        folder = modelio.model_dir(model)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".ttfsc-calib.", suffix=".onnx", dir=folder)
        except OSError as exc:
            raise TtfscError(f"{path}: cannot write a temporary calibration graph in {folder} ({exc.strerror}); "
                             "copy the model to a writable folder.") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model.SerializeToString())
            sess = ort.InferenceSession(tmp, so, providers=["CPUExecutionProvider"])
        finally:
            os.unlink(tmp)
        yield sess
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors become one clear line
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise TtfscError(f"{path}: onnxruntime cannot run the float model for calibration: "
                         f"{str(exc).splitlines()[0][:300]}") from None


# ---------------------------------------------------------------- model inputs

def decoder(sess: Any, path: str, prefix: Prefix | None = None) -> Generator:
    """The shared KV-cache driver (feeds, generation) for a session of an exported decoder.

    The prefix is always explicit here: a stale prefix.npz beside the float model must not leak
    into calibration.
    """
    try:
        return Generator(sess, Path(path).parent, prefix=prefix)
    except TtfscError:
        raise TtfscError(f"{path}: the model has no input_ids input or logits output, so it cannot be calibrated on "
                         "text; export a LLaMA decoder with `ttfsc export`, or pass calibration feeds through the API.") from None


# ---------------------------------------------------------------- calibration data

def _load_tokenizer(model_path: str):
    """The tokenizer beside the model, or None when there is none (or the module is not there yet)."""
    try:
        from ttfsc.runtime.tokenizer import load_tokenizer
    except ImportError:
        return None
    try:
        return load_tokenizer(model_path)
    except (TtfscError, OSError, ValueError):
        return None


def text_sequences(text_path: str, model_path: str, samples: int, seqlen: int,
                   log: Callable[[str], Any]) -> tuple[list[np.ndarray], str]:
    """Cut the tokenized text into ``samples`` consecutive windows of ``seqlen`` tokens."""
    p = Path(text_path)
    if not p.is_file():
        raise TtfscError(f"--calib {p}: no such file. Give a plain-text file, or omit --calib to self-generate.")
    tok = _load_tokenizer(model_path)
    if tok is None:
        raise TtfscError(f"--calib {p}: no tokenizer found beside {model_path}; put the tokenizer files there "
                         "(ttfsc export does) or omit --calib to calibrate on self-generated text.")
    ids = np.asarray(tok.encode(p.read_text(encoding="utf-8", errors="replace"), bos=True), dtype=np.int64)
    if ids.size < 2:
        raise TtfscError(f"--calib {p}: the text gives fewer than 2 tokens; give a longer text.")
    n = min(samples, ids.size // seqlen)
    if n == 0:
        log(f"calibration: {p.name} has only {ids.size} tokens (< {seqlen}); using it as one sequence")
        return [ids], f"text {p.name}: 1 x {ids.size} tokens"
    if n < samples:
        log(f"calibration: {p.name} has {ids.size} tokens, enough for {n} of {samples} sequences")
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)], f"text {p.name}: {n} x {seqlen} tokens"


def _sample(logits: np.ndarray, rng: np.random.Generator) -> int:
    """One token at temperature 1.0."""
    z = logits.astype(np.float64)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    return int(min(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"), p.size - 1))


def self_generated(gen: Generator, bos: int, samples: int, seqlen: int) -> list[np.ndarray]:
    """Sequences sampled from the float model itself (temperature 1.0, seeded, KV cache)."""
    return [np.asarray([bos] + gen.generate([bos], seqlen - 1, temperature=1.0, seed=SEED + i, stop_at_eos=False),
                       dtype=np.int64) for i in range(samples)]


# ---------------------------------------------------------------- range observers

class MinMax:
    """Running min/max; NaN propagates so a non-finite tensor is detected and skipped."""

    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf

    def update(self, x: np.ndarray) -> None:
        if x.size:
            self.lo = float(min(self.lo, np.min(x)))
            self.hi = float(max(self.hi, np.max(x)))
            if np.isnan(np.min(x)):
                self.lo = self.hi = float("nan")

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi


class Percentile:
    """(100-p, p) percentiles over a bounded, seeded random subsample of each batch."""

    def __init__(self, p: float, keep: int = PERCENTILE_SUBSAMPLE) -> None:
        self.p, self.keep = p, keep
        self.rng = np.random.default_rng(SEED)
        self.parts: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        flat = np.asarray(x, dtype=np.float32).reshape(-1)
        if flat.size > self.keep:
            flat = flat[self.rng.choice(flat.size, self.keep, replace=False)]
        self.parts.append(flat.copy())

    def range(self) -> tuple[float, float]:
        if not self.parts:
            return float("nan"), float("nan")
        values = np.concatenate(self.parts).astype(np.float64)
        if not np.all(np.isfinite(values)):
            return float("nan"), float("nan")
        lo, hi = np.percentile(values, [100.0 - self.p, self.p])
        return float(lo), float(hi)


class RowSample(MinMax):
    """Min/max plus a bounded, seeded subsample of whole token rows, for the clipping search.

    Whole rows (not single values) are kept because the search scores a clipping by the error of
    the following linear layer's output, which mixes the channels of a row.
    """

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = max(1, keep)
        self.rng = np.random.default_rng(SEED)
        self.rows: list[np.ndarray] = []

    def update(self, x: np.ndarray) -> None:
        super().update(x)
        rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        if rows.shape[0] > self.keep:
            rows = rows[np.sort(self.rng.choice(rows.shape[0], self.keep, replace=False))]
        self.rows.append(rows.copy())

    def sample(self) -> np.ndarray:
        return np.concatenate(self.rows) if self.rows else np.zeros((0, 1), np.float32)


def make_observer(method: str, percentile: float, sequences: int) -> Callable[[], Any]:
    """Factory of the per-tensor observer ``method`` needs."""
    if method == "percentile":
        return lambda: Percentile(percentile)
    if method == "search":
        return lambda: RowSample(-(-SEARCH_ROWS // max(1, sequences)))
    return MinMax


def calibrate(sess: Any, names: Sequence[str], feeds_list: Sequence[dict[str, np.ndarray]],
              make: Callable[[], Any]) -> dict[str, Any]:
    """One observer per named tensor, updated with its values over all calibration feeds."""
    observers = {n: make() for n in names}
    outputs = {o.name for o in sess.get_outputs()}
    fetch = [n for n in names if n in outputs]
    for feeds in feeds_list:
        values = dict(zip(fetch, sess.run(fetch, feeds))) if fetch else {}
        for n in names:
            x = values[n] if n in values else feeds.get(n)
            if x is not None:
                observers[n].update(np.asarray(x))
    return observers


# ---------------------------------------------------------------- clipping search

def fake_quant(x: np.ndarray, p: "ActParams") -> np.ndarray:
    """Clip -> QuantizeLinear -> DequantizeLinear in numpy (round half to even), as the QANN computes it."""
    q = np.clip(np.rint(x / p.scale) + p.zero_point, 0, p.N)
    return ((q - p.zero_point) * p.scale).astype(np.float32)


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


def searched_ranges(model: onnx.ModelProto, linears: list[onnx.NodeProto], observers: dict[str, RowSample],
                    bits: Callable[[str], int]) -> tuple[dict[str, tuple[float, float]], dict[str, dict[str, float]]]:
    """Per tensor, the searched (lo, hi); non-finite tensors keep their (non-finite) range and are skipped later."""
    ranges, report = {}, {}
    for name, ob in observers.items():
        lo, hi = ob.range()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            ranges[name] = (lo, hi)
            continue
        r = search_range(ob.sample(), consumer_weights(model, linears, name), lo, hi, bits(name))
        ranges[name], report[name] = (r["lo"], r["hi"]), r
    return ranges, report


@contextlib.contextmanager
def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> Iterator[None]:
    """Temporarily expose ``names`` as (type-less) graph outputs; onnxruntime infers their types."""
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    n_before = len(model.graph.output)
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
    try:
        yield
    finally:
        del model.graph.output[n_before:]


def _bos_id(path: str) -> int:
    tok = _load_tokenizer(path)
    return int(tok.bos_id) if tok is not None and getattr(tok, "bos_id", None) is not None else DEFAULT_BOS


def calibration_sequences(gen: Generator, path: str, calib: Any, samples: int, seqlen: int,
                          log: Callable[[str], Any]) -> tuple[list[np.ndarray], str]:
    """Token sequences (each starting with BOS where the text does) and where they came from."""
    if calib is not None:
        return text_sequences(str(calib), path, samples, seqlen, log)
    bos = _bos_id(path)
    if _load_tokenizer(path) is None:
        log(f"calibration: no tokenizer beside {Path(path).name}; self-generating from BOS id {DEFAULT_BOS}")
    seqs = self_generated(gen, bos, samples, seqlen)
    return seqs, f"self-generated: {samples} x {seqlen} tokens from BOS {bos}, temperature 1.0, seed {SEED}"


# ---------------------------------------------------------------- prefixed outliers

def position_ratios(sess: Any, acts: Sequence[str], gen: Generator, seqs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per sequence and position: the largest, over tensors, of max|x| over channels / its median over positions.

    An attention sink shows up as a ratio of hundreds (SmolLM2: 25,000 vs 160) in the linear
    inputs of later layers, while ordinary tokens stay within a few times the median.
    """
    peaks = []
    for ids in seqs:
        values = sess.run(list(acts), gen.feeds(ids))
        peaks.append(np.stack([np.abs(v).max(-1).reshape(-1) for v in values]))  # [tensor, position]
    median = np.median(np.concatenate(peaks, axis=1), axis=1, keepdims=True)
    return [(p / np.maximum(median, np.finfo(np.float32).tiny)).max(0) for p in peaks]


def outlier_hits(seqs: Sequence[np.ndarray], ratios: Sequence[np.ndarray], bos: int) -> Counter:
    """How often each token is an outlier; position 0 counts as BOS (whatever stands first is a sink)."""
    hits: Counter = Counter()
    for ids, r in zip(seqs, ratios):
        for pos in np.flatnonzero(r > OUTLIER_RATIO):
            hits[bos if pos == 0 else int(ids[pos])] += 1
    return hits


def detect_prefix(sess: Any, acts: Sequence[str], gen: Generator, path: str, seqs: Sequence[np.ndarray], bos: int,
                  log: Callable[[str], Any]) -> list[int]:
    """Outlier tokens that a prefix removes: BOS, then greedily the most frequent remaining outlier
    token, kept only if prefixing it at least halves its outlier occurrences.

    The check matters: some tokens (SmolLM2's " the" in layer 2) are large at every occurrence,
    not only as a sink, and a prefix cannot help them. Empty when no position is an outlier.
    """
    def scan(ids: tuple[int, ...]) -> Counter:
        g = decoder(sess, path, gen.compute_prefix(ids)) if ids else gen
        stripped = [np.asarray(g.strip_bos(s)) for s in seqs]
        return outlier_hits(stripped, position_ratios(sess, acts, g, stripped), bos)

    hits = scan(())
    if not hits:
        return []
    prefix, rejected = [bos], []
    for _ in range(MAX_PREFIX_TOKENS - 1):
        hits = scan(tuple(prefix))
        cands = sorted((t for t in hits if t not in prefix and t not in rejected), key=lambda t: (-hits[t], t))
        if not cands:
            break
        after = scan(tuple(prefix + [cands[0]]))
        (prefix if 2 * after[cands[0]] <= hits[cands[0]] else rejected).append(cands[0])
        log(f"prefix: token {cands[0]} is an outlier {hits[cands[0]]} times, {after[cands[0]]} once prefixed: "
            + ("kept" if prefix[-1] == cands[0] else "not a sink, left out"))
    return prefix


def choose_prefix(mode: str | list[int], sess: Any, acts: Sequence[str], gen: Generator, path: str,
                  seqs: Sequence[np.ndarray], bos: int, log: Callable[[str], Any]) -> Prefix | None:
    """The prefix ``mode`` asks for, its KV cache computed by the float model; None for no prefix."""
    if mode == "none":
        return None
    if mode == "auto":
        ids = detect_prefix(sess, acts, gen, path, seqs[:DETECT_SEQUENCES], bos, log)
        if not ids:
            log(f"prefix: no outlier tokens (peak |activation| > {OUTLIER_RATIO:g}x median) found; no prefix")
            return None
    else:
        ids = [bos] if mode == "bos" else list(mode)
    prefix = gen.compute_prefix(ids)
    log(f"prefix: [{format_ids(ids)}], {prefix.length} tokens, float KV cache {prefix.kv_bytes / 1024:.0f} KiB")
    return prefix


# ---------------------------------------------------------------- activation parameters

@dataclass(frozen=True)
class ActParams:
    """Per-tensor asymmetric quantizer of one activation, plus its exact clip range."""

    scale: np.float32
    zero_point: int
    N: int
    lo: np.float32
    hi: np.float32


def activation_params(lo: float, hi: float, abits: int) -> ActParams:
    """scale = (max - min) / N with 0 inside the range; z = clip(round(-min/scale), 0, N)."""
    N = window_for_bits(abits) - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / N) if hi > lo else np.float32(1.0)  # all-zero tensor: any scale is exact
    scale = max(scale, np.finfo(np.float32).tiny)
    z = int(np.clip(np.round(-lo / np.float64(scale)), 0, N))
    c_lo, c_hi = clip_bounds(float(scale), z, N)
    return ActParams(scale, z, N, c_lo, c_hi)


# ---------------------------------------------------------------- weights

def _row_blocks(w: np.ndarray) -> Iterator[np.ndarray]:
    rows = max(1, BLOCK_BYTES // max(1, w.shape[1] * 4))
    for r in range(0, w.shape[0], rows):
        yield np.asarray(w[r:r + rows], dtype=np.float32)


def weight_scales(w: np.ndarray, qmax: int, name: str) -> np.ndarray:
    """Per-output-channel scale max|W[:, c]| / qmax (1.0 for an all-zero column: codes are 0 anyway)."""
    amax = np.zeros(w.shape[1], dtype=np.float32)
    for block in _row_blocks(w):
        if not np.all(np.isfinite(block)):
            raise TtfscError(f"weight {name}: contains inf/NaN; the checkpoint is corrupt, re-export it.")
        amax = np.maximum(amax, np.abs(block).max(axis=0))
    scale = amax / np.float32(qmax)
    scale[scale == 0] = 1.0
    return scale.astype(np.float32)


def weight_codes(block: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Symmetric codes round-half-even(W / scale) in [-qmax, qmax], int8."""
    return np.clip(np.rint(block / scale), -qmax, qmax).astype(np.int8)


def quantize_weight(inits: modelio.Initializers, name: str, qmax: int, spill: modelio.SpillFile,
                    hessian: np.ndarray | None = None) -> tuple[TensorProto, np.ndarray]:
    """Quantize one [in, out] weight (RTN block by block, or GPTQ given its input Hessian); return its
    spilled int8 tensor and scales (the same scales either way)."""
    w = inits.value(name)
    scale = weight_scales(w, qmax, name)
    start = spill.begin()
    if hessian is not None:
        from ttfsc.quantizer.gptq import gptq_codes
        spill.write(gptq_codes(np.asarray(w, dtype=np.float32), scale, qmax, hessian))
    else:
        for block in _row_blocks(w):
            spill.write(weight_codes(block, scale, qmax))
    del w
    return spill.tensor(f"{name}_quantized", TensorProto.INT8, inits.by_name[name].dims, start), scale


# ---------------------------------------------------------------- graph rewriting

class _Names:
    """Unique tensor/node names: quantizer tensors must never collide with the model's."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.used = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for n in g.node:
            self.used.update(n.input)
            self.used.update(n.output)
            self.used.add(n.name)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def _scalar(value: Any, dtype: np.dtype, name: str) -> TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def activation_chain(x: str, p: ActParams, names: _Names) -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """Clip -> QuantizeLinear -> DequantizeLinear for tensor ``x``; returns nodes, initializers, DQ output."""
    wide = p.N > 255
    zdtype, domain = (np.uint16, MS_DOMAIN) if wide else (np.uint8, "")
    base = x.strip("/").replace("/", "_") or "act"
    lo, hi, s, z = (names(f"{base}_clip_lo"), names(f"{base}_clip_hi"), names(f"{base}_scale"), names(f"{base}_zero_point"))
    inits = [_scalar(p.lo, np.float32, lo), _scalar(p.hi, np.float32, hi), _scalar(p.scale, np.float32, s),
             _scalar(p.zero_point, zdtype, z)]
    clipped, q, dq = names(f"{base}_clipped"), names(f"{base}_quantized"), names(f"{base}_dequantized")
    nodes = [
        helper.make_node("Clip", [x, lo, hi], [clipped], name=names(f"{base}_Clip")),
        helper.make_node("QuantizeLinear", [clipped, s, z], [q], name=names(f"{base}_QuantizeLinear"), domain=domain),
        helper.make_node("DequantizeLinear", [q, s, z], [dq], name=names(f"{base}_DequantizeLinear"), domain=domain),
    ]
    return nodes, inits, dq


def weight_chain(qt: TensorProto, scale: np.ndarray, names: _Names) -> tuple[onnx.NodeProto, list[TensorProto], str]:
    """DequantizeLinear(axis=1) of an int8 weight with per-channel scales and zero points 0."""
    base = qt.name.strip("/").replace("/", "_")
    s, z, out = names(f"{base}_scale"), names(f"{base}_zero_point"), names(f"{base}_dequantized")
    inits = [numpy_helper.from_array(scale, s), numpy_helper.from_array(np.zeros(scale.shape, np.int8), z)]
    node = helper.make_node("DequantizeLinear", [qt.name, s, z], [out], name=names(f"{base}_DequantizeLinear"), axis=1)
    return node, inits, out


def _insert_before_consumers(model: onnx.ModelProto, chains: list[Chain]) -> None:
    """Put each new chain right before the first node reading its output, keeping topological order."""
    consumers: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for x in node.input:
            consumers.setdefault(x, i)
    before: dict[int, list[onnx.NodeProto]] = {}
    for nodes, out in chains:
        before.setdefault(consumers[out], []).extend(nodes)
    new_nodes = []
    for i, node in enumerate(model.graph.node):
        new_nodes.extend(before.get(i, []))
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)


def _used_names(model: onnx.ModelProto) -> set[str]:
    used = {o.name for o in model.graph.output}
    for node in model.graph.node:
        used.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                for sub in a.g.node:
                    used.update(sub.input)
    return used


def _drop_unused_initializers(model: onnx.ModelProto, candidates: set[str]) -> None:
    used = _used_names(model)
    keep = [t for t in model.graph.initializer if t.name not in candidates or t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def quantize_weights(model: onnx.ModelProto, linears: list[onnx.NodeProto], wbits: int,
                     spill: modelio.SpillFile, hessians: dict[str, np.ndarray] | None = None
                     ) -> tuple[list[Chain], set[str]]:
    """Point each linear at int8 codes + per-channel DQ; returns the DQ chains and replaced weights.

    Nodes are rewired in place; the chains are inserted later in one pass (rebuilding the node
    list copies the protobuf messages, so ``linears`` must not be used after that).
    """
    inits = modelio.Initializers(model)
    names = _Names(model)
    qmax = WEIGHT_BITS[wbits]
    done: dict[str, str] = {}
    chains, new_inits = [], []
    for node in linears:
        w = node.input[1]
        if w not in done:
            qt, scale = quantize_weight(inits, w, qmax, spill, (hessians or {}).get(w))
            qt.name = names(qt.name)
            dq_node, extra, out = weight_chain(qt, scale, names)
            new_inits += [qt, *extra]
            chains.append(([dq_node], out))
            done[w] = out
        node.input[1] = done[w]
    model.graph.initializer.extend(new_inits)
    return chains, set(done)


def quantize_activations(model: onnx.ModelProto, linears: list[onnx.NodeProto],
                         params: dict[str, ActParams]) -> list[Chain]:
    """One shared Clip->Q->DQ per calibrated activation; every target reading it reads the DQ."""
    names = _Names(model)
    chains, new_inits, dq_of = [], [], {}
    for x, p in params.items():
        nodes, extra, dq = activation_chain(x, p, names)
        chains.append((nodes, dq))
        new_inits += extra
        dq_of[x] = dq
    for node in linears:
        if node.input[0] in dq_of:
            node.input[0] = dq_of[node.input[0]]
    model.graph.initializer.extend(new_inits)
    if any(p.N > 255 for p in params.values()) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return chains


def _set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in entries.items():
        model.metadata_props.add(key=k, value=v)


# ---------------------------------------------------------------- entry points

def _log_ranges(ranges: dict[str, tuple[float, float]], params: dict[str, ActParams], log: Callable[[str], Any],
                limit: int = 24) -> None:
    for i, (name, p) in enumerate(params.items()):
        if i == limit:
            log(f"  ... {len(params) - limit} more")
            break
        lo, hi = ranges[name]
        log(f"  {name}: [{lo:.4g}, {hi:.4g}] scale {float(p.scale):.4g} zero_point {p.zero_point}")


def _split_finite(ranges: dict[str, tuple[float, float]], bits: Callable[[str], int]) -> tuple[dict[str, ActParams], list[str]]:
    params, skipped = {}, []
    for name, (lo, hi) in ranges.items():
        if np.isfinite(lo) and np.isfinite(hi):
            params[name] = activation_params(lo, hi, bits(name))
        else:
            skipped.append(name)
    return params, skipped


@dataclass
class Calibration:
    """What calibration found: ranges per tensor, the prefix, the search report, and the data used."""

    ranges: dict[str, tuple[float, float]]
    prefix: Prefix | None
    search: dict[str, dict[str, float]]
    desc: str


def _calibration_feeds(sess: Any, path: str, acts: Sequence[str], calib: Any, prefix_mode: str | list[int],
                       samples: int, seqlen: int, log: Callable[[str], Any]
                       ) -> tuple[list[dict[str, np.ndarray]], Prefix | None, str]:
    """Feeds to calibrate on (after the prefix ``prefix_mode`` picks, if any), the prefix, and their origin.

    Shared by range calibration and the smoothing statistics, so both see activations exactly as
    the quantized model will: after the prefix's float KV cache, without the sink.
    """
    if calib is not None and not isinstance(calib, (str, os.PathLike)):
        feeds = [dict(f) for f in calib]
        if not feeds:
            raise TtfscError("calibration feeds are empty; give at least one input dict.")
        if prefix_mode not in ("auto", "none"):
            raise TtfscError("--prefix needs a decoder calibrated on text; given feeds cannot take a prefix.")
        return feeds, None, f"given feeds: {len(feeds)} batches"
    gen = decoder(sess, path)
    seqs, desc = calibration_sequences(gen, path, calib, samples, seqlen, log)
    prefix = choose_prefix(prefix_mode, sess, acts, gen, path, seqs, _bos_id(path), log)
    gen = decoder(sess, path, prefix)
    return [gen.feeds(gen.strip_bos(ids)) for ids in seqs], prefix, desc


def _calibrate_model(model: onnx.ModelProto, path: str, linears: list[onnx.NodeProto], acts: list[str], calib: Any,
                     method: str, percentile: float, bits: Callable[[str], int], prefix_mode: str | list[int], samples: int,
                     seqlen: int, log: Callable[[str], Any]) -> Calibration:
    """Ranges of ``acts`` from the float model (after the prefix, if any); the model is left as loaded."""
    with _with_outputs(model, acts), _session(model, path) as sess:
        feeds, prefix, desc = _calibration_feeds(sess, path, acts, calib, prefix_mode, samples, seqlen, log)
        observers = calibrate(sess, acts, feeds, make_observer(method, percentile, len(feeds)))
    if method == "search":
        ranges, search = searched_ranges(model, linears, observers, bits)
    else:
        ranges, search = {n: ob.range() for n, ob in observers.items()}, {}
    return Calibration(ranges, prefix, search, desc)


# ---------------------------------------------------------------- rotation and smoothing first

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
    meta: dict[str, str]            # ttfsc.rotation / ttfsc.smoothing


def _smooth(path: str, out: str, alpha: float, calib: Any, prefix_mode: str | list[int], samples: int,
            seqlen: int, log: Callable[[str], Any]) -> tuple[str | list[int], str]:
    """SmoothQuant ``path`` into ``out`` with channel maxima measured after the prefix.

    The prefix is chosen here (the sink would otherwise set every maximum) and its ids are handed
    on, so calibration of the smoothed model uses the same prefix without scanning again; the
    smoothing is function-preserving, so the sink tokens are the same.
    """
    model = modelio.load_model(path)
    acts = _activation_names(model, find_linears(model))
    targets = smoothable_inputs(model)
    with _with_outputs(model, acts), _session(model, path) as sess:
        feeds, prefix, _ = _calibration_feeds(sess, path, acts, calib, prefix_mode, samples, seqlen, log)
        observers = calibrate(sess, targets, feeds, ChannelMax)
    act_max = {n: ob.value for n, ob in observers.items() if ob.value is not None}
    info = smooth_model(path, out, act_max, alpha=alpha)
    log(f"smoothing: alpha {alpha}, {len(info['smoothed'])} linear inputs (norm outputs, down_proj inputs)")
    chosen: str | list[int] = list(prefix.ids) if prefix is not None else "none"
    return chosen, f"alpha={alpha} tensors={len(info['smoothed'])}"


def _resolve_auto(path: str, rotate: str, alpha: float, log: Callable[[str], Any]) -> tuple[str, float]:
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


def _resolve_online(online: str, rotate: str, full: bool) -> bool:
    """auto: the online down_proj Hadamard comes with a Hadamard rotation, except in --full twins
    (there the product gate*up is itself a quantized stage, so a float rotation after it has no place)."""
    if online not in ONLINE_CHOICES:
        raise TtfscError(f"--online-hadamard {online!r}: use one of {', '.join(ONLINE_CHOICES)}.")
    if online == "on" and full:
        raise TtfscError("--online-hadamard on and --full exclude each other: a --full twin quantizes gate*up "
                         "itself; drop one of them.")
    return online == "on" or (online == "auto" and rotate == "hadamard" and not full)


@contextlib.contextmanager
def _transformed(path: str, out_dir: Path, rotate: str, seed: int, alpha: float, calib: Any,
                 prefix_mode: str | list[int], samples: int, seqlen: int,
                 log: Callable[[str], Any], online: str = "off", full: bool = False) -> Iterator[Transform]:
    """Rotate, smooth, then add online down_proj Hadamards to ``path`` in a temporary folder inside
    ``out_dir`` (deleted afterwards).

    Order matters: smoothing measures the rotated model's channels, and every later stage (prefix
    KV, calibration, search) runs on the transformed float model the QANN is quantized from.
    """
    meta = {"ttfsc.rotation": "none", "ttfsc.smoothing": "none"}
    rotate, alpha = _resolve_auto(path, rotate, alpha, log)
    down = _resolve_online(online, rotate, full)
    if rotate == "none" and not alpha and not down:
        yield Transform(path, prefix_mode, meta)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ttfsc-transform.", dir=out_dir))
    try:
        src = path
        if rotate != "none":
            t0 = time.perf_counter()
            src = str(tmp / "rotated" / "model.onnx")
            rotate_model(path, src, seed=seed, kind=rotate)
            meta["ttfsc.rotation"] = f"{rotate} seed={seed}"
            log(f"rotation: {rotate} seed {seed} ({time.perf_counter() - t0:.1f}s)")
        if alpha:
            smoothed = str(tmp / "smoothed" / "model.onnx")
            prefix_mode, meta["ttfsc.smoothing"] = _smooth(src, smoothed, alpha, calib, prefix_mode, samples,
                                                           seqlen, log)
            src = smoothed
        if down:
            rotated = str(tmp / "online" / "model.onnx")
            info = rotate_down_inputs(src, rotated, seed=seed)
            meta["ttfsc.down_rotation"] = f"online hadamard seed={seed} blocks={info['rotated']}"
            log(f"online Hadamard before {info['rotated']} down_proj inputs (float x·H, factored; W_down := H^T W_down)")
            src = rotated
        yield Transform(src, prefix_mode, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_qann(model: onnx.ModelProto, linears: list[onnx.NodeProto], params: dict[str, ActParams], wbits: int,
                meta: dict[str, str], out_path: str | os.PathLike, hessians: dict[str, np.ndarray] | None = None) -> int:
    """Rewrite ``model`` into the QDQ form and save it; quantized weights pass through a spill file."""
    spill = modelio.SpillFile(Path(out_path).resolve().parent, "qweights")
    try:
        w_chains, replaced = quantize_weights(model, linears, wbits, spill, hessians)
        a_chains = quantize_activations(model, linears, params)
        _insert_before_consumers(model, w_chains + a_chains)
        _drop_unused_initializers(model, replaced)
        _set_metadata(model, meta)
        modelio.save_model(model, out_path)
    finally:
        spill.close()
    return len(replaced)


def quantize_model(model_path: str | os.PathLike, out_path: str | os.PathLike, wbits: int = 8, abits: int = 6,
                   method: str = DEFAULT_METHOD, percentile: float = 99.99, calib: Any = None, calib_samples: int = 8,
                   calib_seqlen: int = 128, prefix: str = "auto", rotate: str = DEFAULT_ROTATE, rotate_seed: int = 0,
                   smooth: float | None = None, abits_for: Sequence[str] | dict[str, int] | None = None,
                   full: bool = False, windows: Sequence[str] | None = None, online_hadamard: str = "auto",
                   weight_method: str | None = None, log: Callable[[str], Any] = print) -> dict:
    """Quantize ``model_path`` into a QDQ model at ``out_path``; returns a summary dict.

    ``calib`` is None (self-generated text), a plain-text file path, or an iterable of ready feed
    dicts (used as is: for non-decoder graphs and tests). ``prefix`` is auto (outlier tokens
    found in calibration, if any), none, bos, or token ids "1,198"; its float KV cache is saved as
    ``prefix.npz`` beside the output and every Generator on the output applies it. ``rotate``
    (auto, none, hadamard, random) and ``smooth`` (SmoothQuant alpha, 0 = off) transform the float
    model first (function-preserving, quantizer/rotate.py); the QANN is quantized from the transformed
    one. ``auto`` is hadamard for a recognised LLaMA decoder and no transform for any other graph.
    ``smooth=None`` picks ``default_smooth(abits)``. ``abits_for`` gives some tensors another
    width (``["mlp/Mul=8"]``: per-stage windows after ``ttfsc compile -T auto``). ``full`` also
    quantizes every nonlinearity, product and the residual stream (quantizer/full.py), with
    per-kind ``windows`` such as ``["softmax=256"]``. ``online_hadamard`` (auto, on, off) inserts a
    factored float Hadamard before every down_proj input (auto: with a Hadamard rotation, not --full;
    SmolLM2 W8A6 33.5 -> 24.1, benchmarks/lowT.md). ``weight_method`` is rtn (round to nearest) or
    gptq (quantizer/gptq.py, same grid); None picks ``DEFAULT_WEIGHT_METHOD[wbits]`` (rtn with --full).
    """
    smooth = default_smooth(abits) if smooth is None else smooth
    weight_method = _resolve_weight_method(weight_method, wbits, full)
    overrides = abits_for if isinstance(abits_for, dict) else parse_bits_overrides(abits_for)
    _check_options(wbits, abits, method, percentile, calib_samples, calib_seqlen, prefix, rotate, smooth)
    from ttfsc.quantizer.full import parse_windows
    if windows and not full:
        raise TtfscError("--window sets the levels of --full stage kinds; add --full (or drop --window).")
    kind_windows = parse_windows(windows)
    if calib is not None and not isinstance(calib, (str, os.PathLike)):
        calib = [dict(f) for f in calib]  # read once: smoothing and calibration both iterate it
    path = str(model_path)
    _check_opset(modelio.load_model(path), path)
    out_dir = Path(out_path).resolve().parent
    with _transformed(path, out_dir, rotate, rotate_seed, smooth, calib, parse_prefix(prefix), calib_samples,
                      calib_seqlen, log, online_hadamard, full) as tf:
        if full:
            from ttfsc.quantizer.full import quantize_float_full
            summary = quantize_float_full(tf, path, str(out_path), wbits, abits, method, percentile, calib,
                                          calib_samples, calib_seqlen, log, overrides, kind_windows)
        else:
            summary = _quantize_float(tf, path, out_path, wbits, abits, method, percentile, calib, calib_samples,
                                      calib_seqlen, log, overrides, weight_method)
    modelio.copy_sidecars(str(Path(path).resolve().parent), str(out_dir))
    return summary


def _resolve_weight_method(weight_method: str | None, wbits: int, full: bool) -> str:
    """None: the measured default per width; --full twins quantize weights by RTN only (no hook there yet)."""
    if weight_method is None:
        return "rtn" if full or wbits not in DEFAULT_WEIGHT_METHOD else DEFAULT_WEIGHT_METHOD[wbits]
    from ttfsc.quantizer.gptq import WEIGHT_METHODS
    if weight_method not in WEIGHT_METHODS:
        raise TtfscError(f"--weight-method {weight_method!r}: use rtn or gptq.")
    if weight_method == "gptq" and full:
        raise TtfscError("--weight-method gptq is not available with --full yet; use --weight-method rtn.")
    return weight_method


def _quantize_float(tf: Transform, original: str, out_path: str | os.PathLike, wbits: int, abits: int, method: str,
                    percentile: float, calib: Any, calib_samples: int, calib_seqlen: int,
                    log: Callable[[str], Any], abits_for: dict[str, int] | None = None,
                    weight_method: str = "rtn") -> dict:
    """Calibrate and quantize the (transformed) float model ``tf.path``; write the QANN and prefix.npz."""
    path = tf.path
    model = modelio.load_model(path)
    linears = find_linears(model)
    if not linears:
        raise TtfscError(f"{original}: no MatMul with a float32 initializer weight to quantize; "
                         "give a float model exported with `ttfsc export` (not an already quantized one).")
    acts = _activation_names(model, linears)
    t0 = time.perf_counter()
    bits = functools.partial(bits_for, abits=abits, overrides=abits_for)
    cal = _calibrate_model(model, path, linears, acts, calib, method, percentile, bits, tf.prefix_mode,
                           calib_samples, calib_seqlen, log)
    t_calib = time.perf_counter() - t0
    params, skipped = _split_finite(cal.ranges, bits)
    for name in skipped:
        log(f"skipped activation {name}: calibrated range {cal.ranges[name]} is not finite; it stays float")
    method_desc = f"percentile {percentile}" if method == "percentile" else method
    meta = {"ttfsc.abits": str(abits), "ttfsc.wbits": str(wbits), "ttfsc.method": method_desc,
            "ttfsc.abits_for": ",".join(f"{k}={v}" for k, v in (abits_for or {}).items()),
            "ttfsc.calibration": cal.desc, PREFIX_META: format_ids(cal.prefix.ids) if cal.prefix else "", **tf.meta,
            "ttfsc.weight_method": weight_method}
    hessians = None
    if weight_method == "gptq":
        from ttfsc.quantizer.gptq import collect_hessians
        hessians = collect_hessians(model, path, linears, params, calib, cal.prefix.ids if cal.prefix else None,
                                    calib_samples, calib_seqlen, log)
    n_weights = _write_qann(model, linears, params, wbits, meta, out_path, hessians)
    if cal.prefix is not None:
        _save_prefix(cal.prefix, Path(out_path).resolve().parent / PREFIX_FILE)
    summary = {
        "model": original, "output": str(out_path), "wbits": wbits, "abits": abits, "method": method,
        "weight_method": weight_method,
        "percentile": percentile if method == "percentile" else None, "weights": n_weights,
        "activations": len(params), "skipped": skipped, "calibration": cal.desc,
        "calibration_seconds": round(t_calib, 3), "rotation": tf.meta["ttfsc.rotation"],
        "smoothing": tf.meta["ttfsc.smoothing"],
        "prefix": {"tokens": list(cal.prefix.ids), "kv_bytes": cal.prefix.kv_bytes} if cal.prefix else None,
        "search": cal.search,
        "ranges": {n: {"min": cal.ranges[n][0], "max": cal.ranges[n][1], "scale": float(p.scale),
                       "zero_point": p.zero_point} for n, p in params.items()},
    }
    _log_summary(summary, cal, params, log)
    return summary


def _save_prefix(prefix: Prefix, path: Path) -> None:
    """Write prefix.npz atomically: a half-written cache beside a model would silently corrupt it."""
    with modelio.atomic_outputs(path) as (tmp,):
        prefix.save(tmp)


def _log_summary(summary: dict, cal: Calibration, params: dict[str, ActParams], log: Callable[[str], Any]) -> None:
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


def quantize_cli(args: Any) -> int:
    """``ttfsc quantize MODEL -o OUT [--wbits --abits --method --percentile --prefix --rotate --smooth --calib ...]``."""
    quantize_model(args.model, args.output, wbits=args.wbits, abits=args.abits, method=args.method,
                   percentile=args.percentile, calib=args.calib, calib_samples=args.calib_samples,
                   calib_seqlen=args.calib_seqlen, prefix=getattr(args, "prefix", "auto"),
                   rotate=getattr(args, "rotate", DEFAULT_ROTATE), rotate_seed=getattr(args, "rotate_seed", 0),
                   smooth=getattr(args, "smooth", DEFAULT_SMOOTH), abits_for=getattr(args, "abits_for", None),
                   full=getattr(args, "full", False), windows=getattr(args, "window", None),
                   online_hadamard=getattr(args, "online_hadamard", "auto"),
                   weight_method=getattr(args, "weight_method", None))
    return 0
