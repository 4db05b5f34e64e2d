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

import math
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


# ---------------------------------------------------------------- Corollary 1: codes, times, zero points

def zero_point_of(T: int, t_ref: int) -> int:
    """Corollary 1 read backwards, ``z = N - t_ref``: a stage's node stores t_ref, its QANN has z."""
    return T - 1 - t_ref


def tau_of_step(step: float) -> float:
    """``tau = 1/step``, in float64 from the stage's float32 step (the node attribute ``tau``)."""
    return float(1.0 / np.float64(step))


def corollary1_theta(step: float, t_ref: int) -> np.float32:
    """``theta = b - step/2 = step * (t_ref - 1/2)``: the half-step compensation that makes floor round."""
    return np.float32(np.float64(np.float32(step)) * (t_ref - 0.5))


def rounding_top(b: float, step: float) -> np.float64:
    """``b' = b - Delta`` with ``Delta = step/2``: the level Theorem 2's output kernels are built around."""
    return np.float64(b) - np.float64(step) / 2


def times_grid(step: float, t_ref: int) -> tuple[np.float32, int]:
    """Spike times as the codes of a quantizer: scale ``-step``, zero point ``t_ref``.

    ``t = round(t_ref - V/step)`` and ``x = (t - t_ref) * (-step)``: the negative scale turns a
    standard QuantizeLinear / DequantizeLinear into the emission / the decoding of spike times.
    """
    return np.float32(-np.float32(step)), int(t_ref)


def tie_blocked(t_ref: int, N: int) -> np.ndarray:
    """Slots k in 0..N-1 where ``half_even`` does not fire on an exact hit: ``t_ref - k`` odd."""
    return (t_ref - np.arange(N)) % 2 != 0


class Window:
    """Something with a window of ``T`` slots: ``N = T - 1`` firing slots, slot ``N`` the silent time.

    The one definition of ``N`` for the stages here and the emission specs of ``ttfsc.dialect``
    (a subclass declares the field ``T``).
    """

    T: int

    @property
    def N(self) -> int:
        return self.T - 1


class StepKernels(Window):
    """A stage whose kernels are one ``step`` per slot, ``step`` being the subclass's.

    A constant output kernel ``psi``, and the step input kernel its consumers integrate (Theorem 2
    with f = identity): Corollary 1's stage (step = the QANN's scale) and the continuous baseline's
    (step = (b - a) / T) share both.
    """

    step: np.float32

    def psi(self) -> np.ndarray:
        return np.full(self.N, self.step, dtype=np.float32)

    def eta(self) -> np.ndarray:
        """Step input kernel seen by a consumer of this stage: one step's value per slot."""
        return np.full(self.N, self.step, dtype=np.float32)


@dataclass(frozen=True)
class UniformStage(StepKernels):
    """A Corollary-1 stage: the TTFS neuron equivalent to an asymmetric quantizer.

    ``scale`` and ``zero_point`` are the QANN's (unsigned codes 0..N); everything the neuron
    needs (tau, t_ref, window, kernels, threshold, clip range) is derived here.
    """

    scale: float
    zero_point: int
    T: int
    tie_rule: str = "half_even"

    @property
    def step(self) -> np.float32:
        return np.float32(self.scale)

    @classmethod
    def from_timing(cls, step: float, t_ref: int, T: int, tie_rule: str = "half_even") -> "UniformStage":
        """The stage of an emission node, which stores ``t_ref`` rather than the zero point."""
        return cls(step, zero_point_of(T, t_ref), T, tie_rule)

    @property
    def tau(self) -> float:
        return tau_of_step(self.step)

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
        return corollary1_theta(self.scale, self.t_ref)

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
    """Spike time t carries code q = N - t (int64); the inverse of :func:`codes_to_times`."""
    return N - np.asarray(t, dtype=np.int64)


def decode_times(t: np.ndarray, step: float, t_ref: int) -> np.ndarray:
    """Value of a spike time: x = (t_ref - t) * step (float32, as the runtime computes it)."""
    scale, zp = times_grid(step, t_ref)
    return ((np.asarray(t, dtype=np.int64) - zp).astype(np.float32) * scale).astype(np.float32)


def decode_counts(c: np.ndarray, threshold: float, zero_point: int) -> np.ndarray:
    """Value of a rate stage's spike count: x = (c - z) * threshold (float32, as DequantizeLinear)."""
    return ((np.asarray(c).astype(np.int64) - zero_point).astype(np.float32) * np.float32(threshold)).astype(np.float32)


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


def receive_bias(c_offset: float, weights: np.ndarray, N_in: int) -> np.ndarray:
    """Theorem 2's bias current ``C_i = c_offset * sum_j w_ij / N_in`` (weights [I, O], per step)."""
    return c_offset * np.asarray(weights).sum(axis=0) / N_in


def emit_ramp(psi: np.ndarray) -> np.ndarray:
    """S[k] = sum_{v<k} psi(v) for k = 0..N (float64): S[N] is what the whole window adds."""
    return np.concatenate([[0.0], np.cumsum(np.asarray(psi, dtype=np.float64))])


def emit_table(psi: np.ndarray, N: int) -> np.ndarray:
    """S[k] = sum_{v<k} psi(v) for k = 0..N-1: the potential added by slot k of the emit phase."""
    psi = np.asarray(psi, dtype=np.float64)
    if psi.shape != (N,):
        raise ValueError(f"psi table has {psi.shape} entries, expected ({N},)")
    return emit_ramp(psi)[:N]  # cumsum accumulates in order, so this prefix is cumsum(psi[:-1])


def is_uniform(psi: np.ndarray, theta: float, step: float, t_ref: int) -> bool:
    """True when (psi, theta) are exactly Corollary 1's, so the closed-form quantizer applies."""
    psi = np.asarray(psi, dtype=np.float32)
    return bool(np.all(psi == np.float32(step)) and np.float32(theta) == corollary1_theta(step, t_ref))


def is_step_kernel(eta: np.ndarray, step_in: float) -> bool:
    return bool(np.all(np.asarray(eta, dtype=np.float32) == np.float32(step_in)))


def range_zero_point(lo: float, scale: float, N: int) -> int:
    """``z = clip(round(-lo / scale), 0, N)``: the code of 0.0 on a grid of ``scale`` starting at ``lo``."""
    return int(np.clip(np.round(-lo / np.float64(scale)), 0, N))


def requantize_params(scale: float, zero_point: int, N_from: int, N_to: int) -> tuple[float, int]:
    """Same value range on a coarser/finer grid (lossy; used by compile --requantize)."""
    lo = -zero_point * scale
    hi = (N_from - zero_point) * scale
    new_scale = (hi - lo) / N_to
    return float(np.float32(new_scale)), range_zero_point(lo, new_scale, N_to)


def code_of_bound(bound: float, scale: float, zero_point: int) -> int:
    """The code a Clip bound quantizes to, ``round(bound / scale) + z`` (float32, as the QANN)."""
    return int(np.rint(np.float32(bound) / np.float32(scale))) + zero_point


def clip_levels(lo: float, hi: float, scale: float) -> int:
    """Code levels a ``Clip(lo, hi)`` leaves a quantizer of this scale: ``round((hi - lo)/scale) + 1``."""
    return int(round((hi - lo) / scale)) + 1


def quantizer_codes(x: np.ndarray, scale: float, zero_point: int, N: int, tie_rule: str = "half_even",
                    dtype: type = np.float32) -> np.ndarray:
    """The n-bit quantizer a uniform stage implements, in numpy (reference for tests).

    ``dtype`` is the precision of the quotient x/scale: float32 is the QANN's; float64 rounds an
    exact target (``ttfsc inspect``'s intended codes).
    """
    x, scale = np.asarray(x, dtype=dtype), dtype(scale)
    if tie_rule == "half_even":
        return grid_codes(x, scale, zero_point, 0, N).astype(np.int64)
    u = x / scale
    r = np.floor(u) + (u - np.floor(u) >= 0.5)
    return np.clip(r + zero_point, 0, N).astype(np.int64)


def is_exact_tie(x: np.ndarray, scale: float) -> np.ndarray:
    """x / scale lies exactly half-way between two codes (the only place rounding rules differ)."""
    u = np.asarray(x, dtype=np.float32) / np.float32(scale)
    return (u - np.floor(u)) == np.float32(0.5)


def distance_to_tie(x: np.ndarray, scale: float) -> np.ndarray:
    """``|frac(x/scale) - 1/2|`` in float64, in steps: how far x lies from a rounding boundary."""
    u = np.asarray(x, dtype=np.float64) / np.float64(scale)
    return np.abs(u - np.floor(u) - 0.5)


# ---------------------------------------------------------------- continuous-kernel baseline

#: TTFSFormer-style windows: 16 .. 8192 slots (the paper runs TTFSFormer at T = 8192 = 2^13)
CONTINUOUS_MIN_BITS, CONTINUOUS_MAX_BITS = 4, 13
NEURONS = ("qc", "continuous")


def continuous_window(T: int) -> int:
    """Check a continuous-kernel window: a power of two from 16 to 8192; returns its bits.

    Wider than :func:`bits_for_window` (at most 12 bits, the QANN's widest code) because the
    baseline is defined by its clock, not by a quantizer: the paper reports it at T = 8192.
    """
    bits = int(T).bit_length() - 1
    if T <= 0 or (1 << bits) != T or not CONTINUOUS_MIN_BITS <= bits <= CONTINUOUS_MAX_BITS:
        raise ValueError(f"-T {T} is not a power of two from {1 << CONTINUOUS_MIN_BITS} to "
                         f"{1 << CONTINUOUS_MAX_BITS} (the continuous-kernel baseline's windows, e.g. 64 or 8192)")
    return bits


@dataclass(frozen=True)
class ContinuousStage(StepKernels):
    """A TTFSFormer-style stage: the continuous theory's kernels (Eq. 4) sampled on the discrete clock.

    The range ``[a, b]`` is the float activation's calibrated min/max and ``tau = T / (b - a)``
    maps it onto the whole window, with no regard for any quantizer's grid (there is none). With
    ``h = f = identity`` (every stage of today's hybrid graph), Eq. 4 gives

    * ``psi(s) = 1 / (tau * h'(.)) = 1/tau = step``: a constant output kernel;
    * ``theta = h^-1(b) = b``;
    * ``eta(s) = f'(s/tau + a) = 1`` per unit of value, i.e. ``step`` per time step (the paper's
      1/tau factor absorbed as in Theorem 2's normalisation), and ``C`` from ``f(a) = a``: a
      receiver's table is ``F[t] = a + (N - t) * step`` (``receive_table(eta, a, N)``).

    Discrete clock. Eq. 7 adds ``psi(k)`` during slot ``k`` and the neuron spikes in the slot in
    which ``V`` reaches ``theta``: ``V(k) + psi(k) >= b``. In ttfsc's emit convention (compare at
    the start of slot ``k``, ``ttfsc.simulator.emit``) that is the threshold
    ``theta_slot = b - step``. The first such slot is

        ``t = clip(N - floor((V - a) / step), 0, N)``,

    so the decoded value ``a + (N - t) * step`` is ``a + clip(floor((V - a)/step), 0, N) * step``:
    a *floor* quantizer onto T levels over ``[a, b)``. This is exactly where QC-A2S differs: its
    Corollary-1 stage puts the threshold half a step lower (``Delta = step/2``), turning floor
    into round-to-nearest, and takes ``a``, ``step`` from the QANN, so the SNN *is* the QANN.
    Here the expected error per stage is half a step plus the clipping of the calibrated range,
    which only a longer window shrinks (Theorem 3). A hit exactly on the threshold fires (plain
    ``V >= theta``, ``tie_rule="half_up"``); in float32 that boundary is not reproducible across
    implementations anyway, and nothing is bit-exact here: the reference is the float model.
    """

    a: float
    b: float
    T: int

    @classmethod
    def from_range(cls, lo: float, hi: float, T: int) -> "ContinuousStage":
        """Stage for a calibrated range; float32 ends (ONNX attributes), a constant range widened."""
        a, b = np.float32(lo), np.float32(hi)
        if not b > a:  # a constant activation: any positive width represents it exactly (level 0)
            b = np.float32(a + max(abs(float(a)), 1.0))
        return cls(float(a), float(b), int(T))

    @property
    def step(self) -> np.float32:
        """Value of one time step, 1/tau = (b - a) / T, in float32 as the runtime uses it."""
        return np.float32((np.float64(self.b) - np.float64(self.a)) / self.T)

    @property
    def tau(self) -> float:
        return float(self.T / (np.float64(self.b) - np.float64(self.a)))

    def nearest_t_ref(self) -> int:
        """The integer reference in 0..N nearest to ``a``'s: ``round(N + a/step)`` (a receiver's t_ref_in)."""
        return int(np.clip(np.rint(self.N + np.float64(self.a) / np.float64(self.step)), 0, self.N))

    @property
    def theta(self) -> np.float32:
        """Eq. 4: theta = h^-1(b) = b."""
        return np.float32(self.b)

    @property
    def theta_slot(self) -> np.float32:
        """theta as ttfsc's emit phase compares it, at the start of a slot (see the class docstring)."""
        return np.float32(np.float64(self.b) - np.float64(self.step))

    def values(self) -> np.ndarray:
        """Value of each spike time t = 0..N (N silent = a): the table decoders and receivers gather."""
        return receive_table(self.eta(), float(self.a), self.N).astype(np.float32)

    def times(self, v: np.ndarray) -> np.ndarray:
        """Closed form of the first threshold crossing, in float32 as the runtime computes it."""
        u = np.floor((np.asarray(v, dtype=np.float32) - np.float32(self.a)) / self.step)
        return np.clip(self.N - u, 0, self.N).astype(time_dtype(self.T))

    def quantize(self, v: np.ndarray) -> np.ndarray:
        """What the stage passes on: the floor quantizer onto the T levels of [a, b)."""
        return self.values()[self.times(v).astype(np.int64)]


# ---------------------------------------------------------------- Theorem 1 (kernels -> function)

def theorem1_times(v: np.ndarray, psi: np.ndarray, theta: float, N: int, t_ref: int,
                   tie_rule: str = "half_even") -> np.ndarray:
    """Emission of Theorem 1 in closed form: the first slot k with ``V + S[k] >= theta``, else N.

    ``S`` is the cumulative output kernel (:func:`emit_table`); an exact hit fires under
    ``half_even`` only when ``t_ref - k`` is even, as the simulator's emit phase does.
    """
    v = np.asarray(v, dtype=np.float64)
    vk = v[..., None] + emit_table(psi, N)
    cross = vk >= np.float64(theta)
    if tie_rule == "half_even":
        cross &= ~((vk == np.float64(theta)) & tie_blocked(t_ref, N))
    first = np.argmax(cross, axis=-1)
    return np.where(cross.any(axis=-1), first, N).astype(np.int64)


def theorem1_potential(t_in: list[np.ndarray], eta: list[np.ndarray], c_offset: list[float],
                       weights: list, N_in: list[int], reduce: bool = False) -> np.ndarray:
    """Potential at t_emit: ``sum_j w_j * (c_j + sum of eta_j over the steps after t_j)`` (float64).

    Each spike input ``j`` is an array of times; ``weights[j]`` broadcasts against it (a fixed
    weight, 1/I, or, for a product, the other operand's decoded values). ``reduce`` sums the
    last axis (the fan-in of a mean-square, log-sum-exp or dot-product neuron).
    """
    total = 0.0
    for t, e, c, w, n in zip(t_in, eta, c_offset, weights, N_in):
        F = receive_table(np.asarray(e, dtype=np.float64), float(c), int(n))
        part = np.asarray(w, dtype=np.float64) * F[np.asarray(t, dtype=np.int64)]
        total = total + (part.sum(axis=-1) if reduce else part)
    return np.asarray(total, dtype=np.float64)


def realised_function(t_in: list[np.ndarray], eta: list[np.ndarray], c_offset: list[float], weights: list,
                      N_in: list[int], psi: np.ndarray, theta: float, N_out: int, t_ref_out: int,
                      tie_rule: str = "half_even", reduce: bool = False) -> np.ndarray:
    """Theorem 1: the output codes (``q = N_out - t``) that neurons with these kernels emit.

    Any ``eta``, ``psi``, ``C`` (as ``c_offset``) and ``theta`` are accepted, so this is how a
    compiled neuron's kernels are checked against the function it is meant to compute
    (``ttfsc inspect --neurons``): feed every input time of the grid and compare codes.
    """
    v = theorem1_potential(t_in, eta, c_offset, weights, N_in, reduce)
    return times_to_codes(theorem1_times(v, psi, theta, N_out, t_ref_out, tie_rule), N_out)


def output_kernels(h_inv: Callable[[np.ndarray], np.ndarray], b: float, step: float,
                   N: int) -> tuple[np.ndarray, float]:
    """Theorem 2's psi and theta for an output function h, with Delta = half a step.

    Building both around ``b - step/2`` makes the neuron fire at the first k with
    ``h(V) >= b - (k + 1/2) * step``: h(V) rounded to the nearest output level (for h =
    identity these are exactly Corollary 1's ``psi = step``, ``theta = b - step/2``).
    """
    b_half = rounding_top(b, step)
    return theorem2_psi(h_inv, b_half, step, N), theorem2_theta(h_inv, b_half)


# ---------------------------------------------------------------- Theorem 3: the error terms

def clipping_term(x: np.ndarray, a: float, b: float) -> tuple[float, float]:
    """Theorem 3's clipping error measured on ``x``: mean distance to [a, b] and the share outside."""
    x = np.asarray(x, dtype=np.float64)
    d = np.maximum(x - b, 0.0) + np.maximum(a - x, 0.0)
    return float(d.mean()) if d.size else 0.0, float(np.count_nonzero(d) / max(d.size, 1))


def grid_terms(step: float) -> tuple[float, float]:
    """Theorem 3's grid error of one step: worst case step/2, RMS of a uniform error step/sqrt(12)."""
    return step / 2.0, step / math.sqrt(12.0)


# ---------------------------------------------------------------- the quantizer's grid

def range_scale(lo: float, hi: float, N: int) -> np.float32:
    """``scale = (hi - lo) / N`` of a range widened to hold 0 (so 0.0 gets an exact code).

    A range of width 0 (an all-zero tensor) gets scale 1: any scale represents it exactly. The
    scale never underflows to 0, which QuantizeLinear would divide by.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / N) if hi > lo else np.float32(1.0)
    return max(scale, np.finfo(np.float32).tiny)


def range_params(lo: float, hi: float, N: int) -> tuple[np.float32, int]:
    """(scale, zero point) of the asymmetric quantizer with N + 1 levels that covers [lo, hi] and 0."""
    scale = range_scale(lo, hi, N)
    return scale, range_zero_point(min(float(lo), 0.0), scale, N)


def grid_codes(x: np.ndarray, scale, zero_point: int, lo: int, hi: int) -> np.ndarray:
    """``clip(round_half_even(x / scale) + zero_point, lo, hi)``: QuantizeLinear's codes, unclipped by type.

    Computed in the arithmetic of ``x`` and ``scale`` (float32 for activations as the QANN runs
    them, float64 inside GPTQ) and returned as floats, so callers choose the integer type. The
    activation grid is ``[0, N]``, the symmetric weight grid ``[-qmax, qmax]`` with zero point 0.
    """
    return np.clip(np.rint(x / scale) + zero_point, lo, hi)


def grid_values(codes: np.ndarray, scale, zero_point: int) -> np.ndarray:
    """``(codes - zero_point) * scale``: what DequantizeLinear makes of codes."""
    return (codes - zero_point) * scale
