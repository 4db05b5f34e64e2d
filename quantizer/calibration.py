"""Calibration: running the float model on calibration text and observing the tensors quantization needs.

The float model runs in onnxruntime with the observed tensors added as graph outputs, on text from
``--calib`` or, without it, on sequences the model samples itself from BOS (seeded, temperature
1.0). An *observer* per tensor sees its values batch by batch and keeps only what its method
needs (a running min/max, a bounded subsample), so memory does not grow with the calibration set.
Which sequences are fed after which prefix is decided in prefix.py.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from ttfsc import modelio
from ttfsc.errors import TtfscError
from ttfsc.runtime.generate import Generator, Prefix
from ttfsc.runtime.tokenizer import read_text_file

SEED = 0
DEFAULT_BOS = 1
PERCENTILE_SUBSAMPLE = 1 << 16  # values kept per tensor per calibration sequence
SEARCH_ROWS = 256  # token rows per tensor kept for the clipping search (over all sequences)

Log = Callable[[str], Any]


# ---------------------------------------------------------------- onnxruntime sessions

def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


@contextlib.contextmanager
def session(model: onnx.ModelProto, path: str) -> Iterator[Any]:
    """A CPU session for ``model`` as it is now; external data is found by saving beside the original.

    The temporary graph file is deleted as soon as the session has loaded it.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        if not uses_external_data(model):
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


# ---------------------------------------------------------------- the float weights

WEIGHT_READERS = {"MatMul": None, "Gemm": None, "Conv": None, "Mul": None, "Gather": 0}  # op -> weight input (None: any)
FINITE_CHUNK = 1 << 22  # values per min/max reduction: bounds the check's memory on multi-GB weights


def weight_names(model: onnx.ModelProto) -> list[str]:
    """Float initializers with more than one value that a linear, embedding or norm scale reads.

    Scalars and other readers are left out on purpose: exporters write -inf fill values for
    attention masks, which are meant to be infinite.
    """
    inits = {t.name: t for t in model.graph.initializer}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    names: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHT_READERS or node.domain not in ("", "ai.onnx"):
            continue
        slot = WEIGHT_READERS[node.op_type]
        for name in (node.input if slot is None else node.input[slot:slot + 1]):
            t = inits.get(name)
            if t is not None and t.data_type in floats and int(np.prod(t.dims)) > 1:
                names[name] = None
    return list(names)


def check_finite_weights(model: onnx.ModelProto, path: str) -> None:
    """TtfscError naming the first weight that holds a NaN or an Inf, read one tensor at a time.

    Why before calibrating: one Inf in a weight turns the float model's logits into NaN, and the
    self-generated calibration then failed inside numpy ("Probabilities contain NaN") with no word
    about the model. min/max propagate NaN and show an Inf, so each chunk costs two reductions.
    """
    inits = modelio.Initializers(model)
    for name in weight_names(model):
        flat = np.asarray(inits.value(name)).reshape(-1)
        for start in range(0, flat.size, FINITE_CHUNK):
            chunk = flat[start:start + FINITE_CHUNK]
            if np.isfinite(chunk.min()) and np.isfinite(chunk.max()):
                continue
            bad = ~np.isfinite(chunk)
            raise TtfscError(f"{path}: weight {name!r} holds non-finite values (NaN or Inf; the first at flat index "
                             f"{start + int(np.argmax(bad))}), so the float model computes NaN; fix the checkpoint "
                             "and re-export it with `ttfsc export`.")


# ---------------------------------------------------------------- calibration text

def load_tokenizer(model_path: str):
    """The tokenizer beside the model, or None when there is none (or the module is not there yet)."""
    try:
        from ttfsc.runtime.tokenizer import load_tokenizer as load
    except ImportError:
        return None
    try:
        return load(model_path)
    except (TtfscError, OSError, ValueError):
        return None


def bos_id(path: str) -> int:
    tok = load_tokenizer(path)
    return int(tok.bos_id) if tok is not None and getattr(tok, "bos_id", None) is not None else DEFAULT_BOS


def text_sequences(text_path: str, model_path: str, samples: int, seqlen: int,
                   log: Log) -> tuple[list[np.ndarray], str]:
    """Cut the tokenized text into ``samples`` consecutive windows of ``seqlen`` tokens."""
    p = Path(text_path)
    text = calib_text(p)
    tok = load_tokenizer(model_path)
    if tok is None:
        raise TtfscError(f"--calib {p}: no tokenizer found beside {model_path}; put the tokenizer files there "
                         "(ttfsc export does) or omit --calib to calibrate on self-generated text.")
    ids = np.asarray(tok.encode(text, bos=True), dtype=np.int64)
    if ids.size < 2:
        raise TtfscError(f"--calib {p}: the text gives fewer than 2 tokens; give a longer text.")
    n = min(samples, ids.size // seqlen)
    if n == 0:
        log(f"calibration: {p.name} has only {ids.size} tokens (< {seqlen}); using it as one sequence")
        return [ids], f"text {p.name}: 1 x {ids.size} tokens"
    if n < samples:
        log(f"calibration: {p.name} has {ids.size} tokens, enough for {n} of {samples} sequences")
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)], f"text {p.name}: {n} x {seqlen} tokens"


def calib_text(path: str | os.PathLike) -> str:
    """The --calib text: a missing, binary or non-UTF-8 file is one clear error (read_text_file)."""
    p = Path(path)
    if not p.is_file():
        raise TtfscError(f"--calib {p}: no such file. Give a plain-text file, or omit --calib to self-generate.")
    return read_text_file(p, "--calib")


def check_calib_text(calib: Any) -> None:
    """Read a --calib text file once before any work, so a bad file fails in a second, not after the
    transforms and the prefix search have run (``calib`` may also be feeds given through the API)."""
    if isinstance(calib, (str, os.PathLike)):
        calib_text(calib)


def self_generated(gen: Generator, bos: int, samples: int, seqlen: int) -> list[np.ndarray]:
    """Sequences sampled from the float model itself (temperature 1.0, seeded, KV cache)."""
    return [np.asarray([bos] + gen.generate([bos], seqlen - 1, temperature=1.0, seed=SEED + i, stop_at_eos=False),
                       dtype=np.int64) for i in range(samples)]


def calibration_sequences(gen: Generator, path: str, calib: Any, samples: int, seqlen: int,
                          log: Log) -> tuple[list[np.ndarray], str]:
    """Token sequences (each starting with BOS where the text does) and where they came from."""
    if calib is not None:
        return text_sequences(str(calib), path, samples, seqlen, log)
    bos = bos_id(path)
    if load_tokenizer(path) is None:
        log(f"calibration: no tokenizer beside {Path(path).name}; self-generating from BOS id {DEFAULT_BOS}")
    seqs = self_generated(gen, bos, samples, seqlen)
    return seqs, f"self-generated: {samples} x {seqlen} tokens from BOS {bos}, temperature 1.0, seed {SEED}"


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
    """One observer per named tensor, updated with its values over all calibration feeds.

    A name that is a graph input rather than an output is observed in the feeds themselves.
    """
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
