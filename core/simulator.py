"""Reference simulator: one stage of discrete TTFS neurons, stepped one time step at a time.

This is deliberately slow, plain numpy. It exists to check that the runtime's closed-form kernels
compute what Eq. (7) says: a receive phase that integrates input kernels, an emit phase that adds
the output kernel, a threshold crossing, and at most one spike per neuron. It accepts any
eta, psi, C and theta. Conventions (times, silent neuron, tie rule) come from ttfsc.ttfs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ttfsc.ttfs import TIE_RULES


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
    for k in range(N):
        hit = V >= theta
        if tie_rule == "half_even" and (t_ref - k) % 2 != 0:
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
