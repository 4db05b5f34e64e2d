"""GPTQ weight quantization (Frantar et al. 2022) onto the per-channel symmetric weight grid (weights.py).

Why. Round-to-nearest (RTN) rounds every weight on its own; at 4 bits the errors of a column add
up in the layer output, and on SmolLM2 W4 RTN dominates every cell of the bits x T study. GPTQ
quantizes the input rows of a weight one at a time and moves each row's rounding error onto the
rows not yet quantized, weighted by the inverse Hessian of the layer's squared output error
``||X W - X Q||^2`` (H = 2 X^T X / N, X = the layer's calibration inputs). The result is the
same kind of tensor RTN gives: int codes in [-qmax, qmax] with the SAME per-output-channel scales
max|W[:, c]| / qmax, so the QDQ format, the compiler and the spiking model are untouched; only
which grid point each weight takes changes.

Layout. ONNX linears are ``x @ W`` with W ``[in, out]``; GPTQ's "columns" (quantized in order,
error propagated forward) are W's input rows here. Work is float64 numpy: Cholesky of the damped
inverse Hessian, then blocks of ``BLOCK`` input rows whose later rows are updated lazily.

Calibration inputs. ``collect_hessians`` runs the (transformed) float model once more on the same
calibration sequences, after the same prefix, and accumulates X^T X per linear input. With
``quantized=True`` (the default) X is first fake-quantized with the activation's final Clip/Q/DQ
parameters, i.e. exactly the values the quantized layer multiplies: GPTQ then minimizes
``||Xq W - Xq Q||``, the weight part of the layer's error as the QANN computes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from ttfsc.errors import TtfscError
from ttfsc.graph import extra_outputs
from ttfsc.quantizer.calibration import Log, session
from ttfsc.quantizer.prefix import calibration_feeds
from ttfsc.quantizer.ranges import fake_quant
from ttfsc.ttfs import grid_codes

DAMP = 0.01  # dampening: fraction of mean(diag H) added to the diagonal (GPTQ's default)
BLOCK = 128  # input rows per lazy block update


@dataclass
class Hessian:
    """Running sum of X^T X (float64) over calibration rows of one activation tensor."""

    xtx: np.ndarray | None = None
    rows: int = 0

    def update(self, x: np.ndarray) -> None:
        rows = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        with np.errstate(invalid="ignore", over="ignore"):  # a masked (-inf) input is detected later, not warned
            gram = rows.T @ rows
        self.xtx = gram if self.xtx is None else self.xtx + gram
        self.rows += rows.shape[0]

    def matrix(self) -> np.ndarray:
        """H = 2 X^T X / N (the scale does not change GPTQ; it keeps DAMP comparable across layers)."""
        if self.xtx is None or self.rows == 0:
            raise ValueError("no calibration rows were seen")
        return 2.0 * self.xtx / self.rows


def damped_inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of (H + damp*mean(diag H)*I)^-1 (U^T U = H^-1), and the dead-input mask.

    Inputs that never moved during calibration (zero diagonal) get a unit diagonal, which keeps H
    positive definite and decouples them: their weights are rounded to nearest and receive no
    error (GPTQ's reference zeroes them instead; that would change the layer on other data).
    """
    h = np.array(h, dtype=np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += damp * (mean_diag if mean_diag > 0 else 1.0)
    try:
        np.linalg.cholesky(h)  # raises if H is not positive definite
        hinv = np.linalg.inv(h)
        return np.linalg.cholesky((hinv + hinv.T) / 2).T, dead
    except np.linalg.LinAlgError:
        raise TtfscError("GPTQ: the calibration Hessian is not positive definite even after dampening; "
                         "use --weight-method rtn or more calibration text.") from None


def round_codes(w: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Nearest symmetric code (half to even, like weights.weight_codes) of each value on its channel's grid."""
    return grid_codes(w, scale, 0, -qmax, qmax)


class SharedHessian:
    """One layer input's H with its factor computed once: q/k/v (and gate/up) read the same input,
    so they share H and the O(n^3) Cholesky work."""

    def __init__(self, h: np.ndarray) -> None:
        self.h = h
        self._factor: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def shape(self) -> tuple[int, ...]:
        return self.h.shape

    def factor(self, damp: float) -> tuple[np.ndarray, np.ndarray]:
        if damp not in self._factor:
            self._factor[damp] = damped_inverse_cholesky(self.h, damp)
        return self._factor[damp]


def gptq_codes(w: np.ndarray, scale: np.ndarray, qmax: int, h: np.ndarray | SharedHessian, damp: float = DAMP,
               block: int = BLOCK) -> np.ndarray:
    """GPTQ codes (int8, ``[in, out]``) of weight ``w [in, out]`` on the per-output-channel grid ``scale``.

    Row i of W is rounded after rows < i have pushed their errors onto it; row i's error
    ``(w_i - q_i) / U_ii`` is then spread over rows > i along row i of U. Inside a block the
    update is immediate; rows after the block receive the block's errors in one matrix product.
    """
    n_in = w.shape[0]
    if h.shape != (n_in, n_in):
        raise ValueError(f"Hessian {h.shape} does not match weight {w.shape}")
    if not np.all(np.isfinite(h.h if isinstance(h, SharedHessian) else h)):
        raise ValueError("Hessian is not finite")
    u, _ = h.factor(damp) if isinstance(h, SharedHessian) else damped_inverse_cholesky(h, damp)
    work = np.array(w, dtype=np.float64, copy=True)  # [in, out]; rows are GPTQ's columns
    s = np.asarray(scale, dtype=np.float64)[None, :]
    codes = np.empty(w.shape, dtype=np.int8)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        errs = np.empty((i2 - i1, w.shape[1]), dtype=np.float64)
        for i in range(i1, i2):
            q = round_codes(work[i:i + 1], s, qmax)
            codes[i] = q[0].astype(np.int8)
            err = (work[i] - q[0] * s[0]) / u[i, i]
            work[i + 1:i2] -= np.outer(u[i, i + 1:i2], err)
            errs[i - i1] = err
        if i2 < n_in:
            work[i2:] -= u[i1:i2, i2:].T @ errs
    return codes


def weight_inputs(linears: Sequence[onnx.NodeProto]) -> dict[str, list[str]]:
    """Weight initializer name -> the activation tensors it multiplies (several if a weight is shared)."""
    out: dict[str, list[str]] = {}
    for node in linears:
        names = out.setdefault(node.input[1], [])
        if node.input[0] not in names:
            names.append(node.input[0])
    return out


class QuantizedHessian(Hessian):
    """Hessian of the fake-quantized input (the values the QANN's layer actually multiplies)."""

    def __init__(self, quant: Callable[[np.ndarray], np.ndarray] | None) -> None:
        super().__init__()
        self.quant = quant

    def update(self, x: np.ndarray) -> None:
        super().update(self.quant(np.asarray(x, dtype=np.float32)) if self.quant is not None else x)


def collect_hessians(model: onnx.ModelProto, path: str, linears: Sequence[onnx.NodeProto], params: Mapping[str, Any],
                     calib: Any, prefix_ids: Sequence[int] | None, samples: int, seqlen: int,
                     log: Log, quantized: bool = True) -> dict[str, "SharedHessian"]:
    """Per weight, H from its layer's inputs over the calibration data (after the same prefix).

    ``params`` are the activation quantizers (ranges.ActParams) fixed by calibration; a tensor
    without one (non-finite range, left float) contributes its float values.
    """
    by_weight = weight_inputs(linears)
    acts = sorted({a for names in by_weight.values() for a in names})
    feeds_acts = [a for a in acts if a not in {i.name for i in model.graph.input}]

    def make(name: str) -> Hessian:
        p = params.get(name) if quantized else None
        return QuantizedHessian((lambda x, p=p: fake_quant(x, p)) if p is not None else None)

    prefix_mode: Any = list(prefix_ids) if prefix_ids else "none"
    with extra_outputs(model, feeds_acts), session(model, path) as sess:
        feeds, _, _ = calibration_feeds(sess, path, feeds_acts, calib, prefix_mode, samples, seqlen, log)
        observers = {a: make(a) for a in acts}
        fetch = [a for a in acts if a in {o.name for o in sess.get_outputs()}]
        for f in feeds:
            values = dict(zip(fetch, sess.run(fetch, f)))
            for a in acts:
                x = values.get(a, f.get(a))
                if x is not None:
                    observers[a].update(np.asarray(x))
    shared = {a: SharedHessian(o.matrix()) for a, o in observers.items() if o.rows and np.all(np.isfinite(o.xtx))}
    for a in sorted(set(observers) - set(shared)):
        log(f"GPTQ: input {a} has no finite calibration values; its weights are rounded to nearest")
    hessians: dict[str, SharedHessian] = {}
    for weight, names in by_weight.items():
        seen = [a for a in names if a in shared]
        if len(seen) == 1:
            hessians[weight] = shared[seen[0]]
        elif seen:  # a weight applied to several inputs: H of all their rows together
            rows = [observers[a].rows for a in seen]
            hessians[weight] = SharedHessian(sum(shared[a].h * r for a, r in zip(seen, rows)) / sum(rows))
    rows = max((o.rows for o in observers.values()), default=0)
    log(f"GPTQ: Hessians of {len(shared)} layer inputs ({rows} calibration rows each) for {len(hessians)} weights "
        f"({'quantized' if quantized else 'float'} inputs)")
    return hessians
