"""Reference simulator: one stage of discrete TTFS (or rate-coded IF) neurons, stepped one time step at a time.

This is deliberately slow, plain numpy. It exists to check that the runtime's closed-form kernels
compute what Eq. (7) says: a receive phase that integrates input kernels, an emit phase that adds
the output kernel, a threshold crossing, and at most one spike per neuron. It accepts any
eta, psi, C and theta. Conventions (times, silent neuron, tie rule) come from ttfsc.ttfs.

The rate-coded baseline is simulated the same way: ``rate_emit`` steps the integrate-and-fire
neuron of ttfsc.ttfs (reset by subtraction, at most one spike per step) in exact rational
arithmetic, and ``rate_receive`` integrates the resulting spike trains step by step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttfsc.ttfs import TIE_RULES, RateStage, receive_bias, tie_blocked


@dataclass
class StageTrace:
    """What one simulated stage did: spike times, potential at t_emit, and spikes per slot."""

    times: np.ndarray
    v_emit: np.ndarray
    spikes_per_step: np.ndarray


def receive(t_in: np.ndarray, weights: np.ndarray, eta: np.ndarray, C: np.ndarray,
            N_in: int, gain: float = 1.0) -> np.ndarray:
    """Receive phase: ``V(s+1) = V(s) + gain * (sum_j w_ij eta(s - t_j) + C_i)`` for s < N_in.

    ``t_in`` [..., I] spike times (N_in = silent), ``weights`` [I, O], ``eta`` [N_in] shared or
    [I, N_in] per input, ``C`` [O]. Returns the potential at t_emit, float64.
    """
    t_in = np.asarray(t_in, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    eta = np.asarray(eta, dtype=np.float64)
    if eta.ndim == 1:
        eta = np.broadcast_to(eta, (t_in.shape[-1], N_in))
    V = np.zeros(t_in.shape[:-1] + (w.shape[1],), dtype=np.float64)
    cols = np.arange(t_in.shape[-1])
    for s in range(N_in):
        u = s - t_in                                   # time since each input's spike
        active = (u >= 0) & (t_in < N_in)
        kern = np.where(active, eta[cols, np.clip(u, 0, N_in - 1)], 0.0)
        V = V + gain * (kern @ w + C)
    return V


def emit(v_emit: np.ndarray, psi: np.ndarray, theta: float | np.ndarray, N: int,
         t_ref: int = 0, tie_rule: str = "half_even") -> StageTrace:
    """Emit phase: check ``V >= theta`` at slot k, else ``V += psi(k)``; fire once or stay silent.

    Under ``half_even`` an exact hit ``V == theta`` fires only if ``t_ref - k`` is even (ONNX's
    round-half-to-even); otherwise every hit fires. Silent neurons get time N.
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule must be one of {TIE_RULES}")
    V = np.array(v_emit, dtype=np.float64)
    psi = np.asarray(psi, dtype=np.float64)
    times = np.full(V.shape, N, dtype=np.int64)
    fired = np.zeros(V.shape, dtype=bool)
    per_step = np.zeros(N, dtype=np.int64)
    blocked = tie_blocked(t_ref, N)
    for k in range(N):
        hit = V >= theta
        if tie_rule == "half_even" and blocked[k]:
            hit &= V != theta
        new = hit & ~fired
        times[new] = k
        per_step[k] = int(new.sum())
        fired |= new
        V = V + psi[k]
    return StageTrace(times, np.asarray(v_emit, dtype=np.float64), per_step)


def stage(t_in: np.ndarray, weights: np.ndarray, eta: np.ndarray, C: np.ndarray, N_in: int,
          psi: np.ndarray, theta: float, N: int, t_ref: int = 0, gain: float = 1.0,
          tie_rule: str = "half_even") -> StageTrace:
    """A full stage: receive through eta, then emit through psi."""
    v = receive(t_in, weights, eta, C, N_in, gain)
    return emit(v, psi, theta, N, t_ref, tie_rule)


@dataclass
class RateTrace:
    """What one simulated rate stage did: spike counts, the spike trains [N, ...], spikes per step."""

    counts: np.ndarray
    trains: np.ndarray
    spikes_per_step: np.ndarray


def rate_emit(x: np.ndarray, stage: RateStage) -> RateTrace:
    """Step the IF neuron N times: ``V += I``; spike once if ``V >= theta``, then ``V -= theta``.

    Potentials are in threshold units as exact Fractions (no float error after the quotient
    u = fl32(x / lambda)); the last step applies the tie rule to an exact hit ``V == theta``.
    """
    if stage.tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule must be one of {TIE_RULES}")
    current = stage.current(stage.quotient(x))
    V = np.full(current.shape, stage.v_init, dtype=object)
    counts = np.zeros(current.shape, dtype=np.int64)
    trains = np.zeros((stage.N,) + current.shape, dtype=bool)
    for s in range(stage.N):
        V = V + current
        spike = (V >= 1).astype(bool)
        if s == stage.N - 1:
            exact = (V == 1).astype(bool)
            spike &= ~exact | stage.tie_fires(counts + 1)
        trains[s] = spike
        counts += spike
        V = V - spike.astype(np.int64)
    return RateTrace(counts, trains, trains.reshape(stage.N, -1).sum(axis=1))


def rate_receive(trains: np.ndarray, weights: np.ndarray, step_in: float, z_in: int) -> np.ndarray:
    """Integrate spike trains [N_in, ..., I] through ``weights`` [I, O], one step at a time.

    Each input spike adds ``step_in * w_ij``; a bias current ``-step_in * z_in * sum_j w_ij / N_in``
    per step removes the zero point, so the potential after N_in steps is
    ``sum_j w_ij * step_in * (c_j - z_in)``, the QANN's dequantized MatMul. float64.
    """
    trains = np.asarray(trains, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    N_in = trains.shape[0]
    bias = receive_bias(-np.float64(step_in) * z_in, w, N_in)
    V = np.zeros(trains.shape[1:-1] + (w.shape[1],), dtype=np.float64)
    for s in range(N_in):
        V = V + np.float64(step_in) * (trains[s] @ w) + bias
    return V
