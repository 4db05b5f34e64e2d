"""The TTFS math of QC-A2S, in one place.

Every other part of ttfsc (passes, runtime kernels, reference simulator, quantizer, verifier)
imports the definitions below instead of re-deriving them, so that a change of convention can
only happen here.

Conventions (documented in README "Spike-time encoding"):

* A *stage* is one layer of TTFS neurons with an emission window of ``T`` slots, ``N = T - 1``.
* The neuron may spike at a slot ``t`` in ``0 .. N-1`` (relative to ``t_emit = 0``).
  ``t = N`` (= ``t_end``) encodes a *silent* neuron: it never reached threshold and represents
  the bottom of its range ``a``. Spike-time tensors therefore hold integers in ``[0, T)`` and a
  silent neuron costs no spike.
* The value of spike time ``t`` is ``x = (t_ref - t) * step`` where ``step = 1/tau`` is the value
  of one time step (the quantizer's scale lambda). Earlier spikes mean larger values.
* Corollary 1: with a step input kernel, a constant output kernel ``psi = step``, threshold
  ``theta = b - step/2`` (the paper's compensation Delta = half a step), ``t_ref = N - z``, the
  neuron is the asymmetric n-bit quantizer with scale ``step`` and zero point ``z``:
  code ``q = N - t``.
* Ties: a membrane potential exactly equal to the threshold is an exact tie of the quantizer.
  ``tie_rule="half_even"`` (default) fires on an exact hit only if ``t_ref - t`` is even, which is
  ONNX QuantizeLinear's round-half-to-even; ``"half_up"`` fires on every hit (plain ``V >= theta``,
  round-half-up). The verifier counts exact ties apart from real mismatches.

Receive phase (Eq. 7, our exact normalisation). The receive window is the previous stage's
emission window, ``N_in`` steps. At step ``s`` the potential grows by
``gain * (sum_j w_ij * eta(s - t_j) + C_i)`` with ``eta(u) = 0`` for ``u < 0``. Theorem 2's input
kernel for a target ``f`` is ``eta(u) = f(a_in + (u+1)*step_in) - f(a_in + u*step_in)`` (the
paper's factor tau_in is absorbed into the gain), and ``C_i = c_offset * sum_j w_ij / N_in`` with
``c_offset = f(a_in)``. Then the potential at ``t_emit`` is exactly ``gain * sum_j w_ij f(x_j)``.

Emission phase. ``V(k+1) = V(k) + psi(k)``; the neuron fires at the first ``k`` in ``0..N-1``
with ``V(k) >= theta`` (tie rule above), at most once.

Rate coding (the SpikeLLM-style baseline, ``ttfsc compile --coding rate``). A rate stage runs
``N = 2^n - 1`` steps and its neuron's *spike count* is the QANN code, so it reproduces the same
QANN as a TTFS stage but spends up to N spikes per neuron instead of at most one. With the QANN's
scale ``lambda``, zero point ``z`` and the stage's input ``x`` (the potential the stage received):

* ``u = fl32(x / lambda)``: the float32 quotient ONNX QuantizeLinear computes. This is the one
  rounding of the chain; everything below is exact (rational) arithmetic, and the simulator
  (``ttfsc.simulator.rate_emit``) steps it with ``fractions.Fraction``.
* Threshold ``theta = lambda``; initial potential ``V(0) = theta/2`` (the half-step offset that
  turns floor into rounding); a constant input current per step
  ``I = theta * (u + z) / N`` (the QANN value spread over the window, plus the zero point as a
  bias current ``theta * z / N``).
* Integrate-and-fire with reset by subtraction, for steps ``s = 1..N``: ``V <- V + I``; if
  ``V >= theta`` the neuron spikes (at most once per step) and ``V <- V - theta``.

Then the count is ``c = clip(floor(u + z + 1/2), 0, N)``: for ``0 <= I <= theta`` the potential
stays in ``[0, theta)`` after every step, so ``c*theta + V(N) = theta/2 + N*I`` exactly; for
``I > theta`` it fires every step (``c = N``), for ``I < 0`` never (``c = 0``). No clip is needed:
the window saturates exactly where the QANN's Clip does.

Ties: ``u`` lies half-way between two codes iff ``u + z + 1/2`` is an integer iff ``V(N) = 0``
iff the *last* step is an exact hit ``V == theta`` (a hit at an earlier step is not a tie of
the count). ``tie_rule="half_even"`` fires on that last-step exact hit only if the resulting
count ``c`` has ``c - z`` even (ONNX's round-half-to-even); ``"half_up"`` is the plain
``V >= theta`` neuron (``floor(u + z + 1/2)``). So, under ``half_even``,
``c == quantizer_codes(x, lambda, z, N)`` bit for bit, which the tests check.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np

DOMAIN = "ai.ttfsc"
DOMAIN_VERSION = 1
TIE_RULES = ("half_even", "half_up")
CODINGS = ("ttfs", "rate")
MIN_BITS, MAX_BITS = 2, 12


def window_for_bits(bits: int) -> int:
    """T = 2^n spike slots for an n-bit activation (the paper's core identity)."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"activation width {bits} outside {MIN_BITS}..{MAX_BITS} bits")
    return 1 << bits


def bits_for_window(T: int) -> int:
    """Inverse of :func:`window_for_bits`; T must be a power of two between 4 and 4096."""
    bits = int(T).bit_length() - 1
    if T <= 0 or (1 << bits) != T or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"-T {T} is not 2^n for n in {MIN_BITS}..{MAX_BITS} (e.g. 16, 64, 256)")
    return bits


def time_dtype(T: int) -> np.dtype:
    """Smallest unsigned integer type that holds spike times 0..T-1."""
    return np.dtype(np.uint8) if T <= 256 else np.dtype(np.uint16)


@dataclass(frozen=True)
class UniformStage:
    """A Corollary-1 stage: the TTFS neuron equivalent to an asymmetric quantizer.

    ``scale`` and ``zero_point`` are the QANN's (unsigned codes 0..N); everything the neuron
    needs (tau, t_ref, window, kernels, threshold, clip range) is derived here.
    """

    scale: float
    zero_point: int
    T: int
    tie_rule: str = "half_even"

    @property
    def N(self) -> int:
        return self.T - 1

    @property
    def step(self) -> np.float32:
        return np.float32(self.scale)

    @property
    def tau(self) -> float:
        return float(1.0 / np.float64(self.step))

    @property
    def t_ref(self) -> int:
        """t_end - t_ref = z (Corollary 1)."""
        return self.N - self.zero_point

    @property
    def a(self) -> np.float32:
        return np.float32(np.float64(self.step) * (self.t_ref - self.N))

    @property
    def b(self) -> np.float32:
        return np.float32(np.float64(self.step) * self.t_ref)

    @property
    def theta(self) -> np.float32:
        """theta = b - Delta with Delta = step/2: floor becomes round-to-nearest."""
        return np.float32(np.float64(self.step) * (self.t_ref - 0.5))

    def psi(self) -> np.ndarray:
        return np.full(self.N, self.step, dtype=np.float32)

    def eta(self) -> np.ndarray:
        """Step input kernel seen by a consumer of this stage (Theorem 2 with f = identity)."""
        return np.full(self.N, self.step, dtype=np.float32)

    def clip_bounds(self) -> tuple[np.float32, np.float32]:
        """[a, b]: the value range the stage can represent; the QANN clips to exactly this."""
        return self.a, self.b


def clip_bounds(scale: float, zero_point: int, n_levels: int) -> tuple[np.float32, np.float32]:
    """Clip range [scale*(0-z), scale*(N-z)] of an n-bit code carried in a wider ONNX type."""
    stage = UniformStage(scale, zero_point, n_levels + 1)
    return stage.clip_bounds()


def codes_to_times(q: np.ndarray, N: int) -> np.ndarray:
    """Code q (0..N) fires at t = N - q; code 0 is the silent neuron (t = N)."""
    return (N - np.asarray(q, dtype=np.int64)).astype(time_dtype(N + 1))


def times_to_codes(t: np.ndarray, N: int) -> np.ndarray:
    return N - np.asarray(t, dtype=np.int64)


def decode_times(t: np.ndarray, step: float, t_ref: int) -> np.ndarray:
    """Value of a spike time: x = (t_ref - t) * step (float32, as the runtime computes it)."""
    return ((np.asarray(t, dtype=np.int64) - t_ref).astype(np.float32) * np.float32(-step)).astype(np.float32)


def spike_count(t: np.ndarray, T: int) -> int:
    """Spikes emitted: every neuron with t < N fires once; t = N is silent."""
    return int(np.count_nonzero(np.asarray(t) < T - 1))


# ---------------------------------------------------------------- rate coding (baseline)

def count_dtype(N: int) -> np.dtype:
    """Smallest unsigned integer type that holds spike counts 0..N."""
    return time_dtype(N + 1)


@dataclass(frozen=True)
class RateStage:
    """An integrate-and-fire stage whose spike count over N steps is the QANN code (see above).

    ``scale``/``zero_point`` are the QANN's (unsigned codes 0..N); the neuron's constants
    (threshold, initial potential, bias current) are derived here, nowhere else.
    """

    scale: float
    zero_point: int
    N: int
    tie_rule: str = "half_even"

    @property
    def threshold(self) -> np.float32:
        return np.float32(self.scale)

    @property
    def v_init(self) -> Fraction:
        """Half a threshold: the half-step offset that makes the count round to nearest."""
        return Fraction(1, 2)

    def current(self, u: np.ndarray) -> np.ndarray:
        """Per-step input current in threshold units, I/theta = (u + z) / N, exact (Fractions)."""
        u = np.asarray(u, dtype=np.float32)
        return np.array([(Fraction(float(v)) + self.zero_point) / self.N for v in u.ravel()],
                        dtype=object).reshape(u.shape)

    def quotient(self, x: np.ndarray) -> np.ndarray:
        """u = fl32(x / lambda): the one rounding, done as ONNX QuantizeLinear does it."""
        return np.asarray(x, dtype=np.float32) / self.threshold

    def tie_fires(self, count_after: np.ndarray) -> np.ndarray:
        """Whether a last-step exact hit fires: half_even only onto an even code c - z."""
        if self.tie_rule == "half_up":
            return np.ones(np.shape(count_after), dtype=bool)
        return (np.asarray(count_after, dtype=np.int64) - self.zero_point) % 2 == 0

    def clip_bounds(self) -> tuple[np.float32, np.float32]:
        """[a, b] where the window saturates: the same range as the QANN's Clip."""
        return UniformStage(self.scale, self.zero_point, self.N + 1).clip_bounds()


def rate_spike_count(counts: np.ndarray) -> int:
    """Spikes a rate stage emitted: the sum of its counts (a code q costs q spikes)."""
    return int(np.asarray(counts, dtype=np.int64).sum())



# ---------------------------------------------------------------- Theorem 2 kernels

def theorem2_eta(f: Callable[[np.ndarray], np.ndarray], a_in: float, step_in: float, N_in: int) -> np.ndarray:
    """Input kernel making the received potential sum_j w_ij f(x_j) - f(a_in) * sum_j w_ij."""
    u = np.arange(N_in + 1, dtype=np.float64)
    fu = f(a_in + u * step_in)
    return np.diff(fu)


def theorem2_psi(h_inv: Callable[[np.ndarray], np.ndarray], b: float, step: float, N: int) -> np.ndarray:
    """Output kernel psi(v) = h^-1(b - v*step) - h^-1(b - (v+1)*step)."""
    v = np.arange(N + 1, dtype=np.float64)
    return -np.diff(h_inv(b - v * step))


def theorem2_theta(h_inv: Callable[[np.ndarray], np.ndarray], b: float, delta: float = 0.0) -> float:
    return float(h_inv(np.float64(b))) + delta


def receive_table(eta: np.ndarray, c_offset: float, N_in: int) -> np.ndarray:
    """F[t] = c_offset + sum_{u < N_in - t} eta(u): what one input spiking at t contributes.

    Index N_in (silent) gives c_offset = f(a_in). The runtime gathers from this table and
    multiplies by the weights; the simulator instead steps eta, and tests check they agree.
    """
    eta = np.asarray(eta, dtype=np.float64)
    if eta.shape != (N_in,):
        raise ValueError(f"eta table has {eta.shape} entries, expected ({N_in},)")
    cum = np.concatenate([[0.0], np.cumsum(eta)])  # cum[k] = E(k)
    t = np.arange(N_in + 1)
    return c_offset + cum[N_in - t]


def emit_table(psi: np.ndarray, N: int) -> np.ndarray:
    """S[k] = sum_{v<k} psi(v) for k = 0..N-1: the potential added by slot k of the emit phase."""
    psi = np.asarray(psi, dtype=np.float64)
    if psi.shape != (N,):
        raise ValueError(f"psi table has {psi.shape} entries, expected ({N},)")
    return np.concatenate([[0.0], np.cumsum(psi[:-1])])


def is_uniform(psi: np.ndarray, theta: float, step: float, t_ref: int) -> bool:
    """True when (psi, theta) are exactly Corollary 1's, so the closed-form quantizer applies."""
    psi = np.asarray(psi, dtype=np.float32)
    expected_theta = np.float32(np.float64(np.float32(step)) * (t_ref - 0.5))
    return bool(np.all(psi == np.float32(step)) and np.float32(theta) == expected_theta)


def is_step_kernel(eta: np.ndarray, step_in: float) -> bool:
    return bool(np.all(np.asarray(eta, dtype=np.float32) == np.float32(step_in)))


def requantize_params(scale: float, zero_point: int, N_from: int, N_to: int) -> tuple[float, int]:
    """Same value range on a coarser/finer grid (lossy; used by compile --requantize)."""
    lo = -zero_point * scale
    hi = (N_from - zero_point) * scale
    new_scale = (hi - lo) / N_to
    new_zp = int(np.clip(np.round(-lo / new_scale), 0, N_to))
    return float(np.float32(new_scale)), new_zp


def quantizer_codes(x: np.ndarray, scale: float, zero_point: int, N: int, tie_rule: str = "half_even") -> np.ndarray:
    """The n-bit quantizer a uniform stage implements, in numpy (reference for tests)."""
    u = np.asarray(x, dtype=np.float32) / np.float32(scale)
    if tie_rule == "half_even":
        r = np.rint(u)
    else:
        r = np.floor(u) + (u - np.floor(u) >= 0.5)
    return np.clip(r + zero_point, 0, N).astype(np.int64)


def is_exact_tie(x: np.ndarray, scale: float) -> np.ndarray:
    """x / scale lies exactly half-way between two codes (the only place rounding rules differ)."""
    u = np.asarray(x, dtype=np.float32) / np.float32(scale)
    return (u - np.floor(u)) == np.float32(0.5)
