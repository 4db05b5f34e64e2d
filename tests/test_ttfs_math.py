"""The TTFS math of ttfsc.ttfs, checked against the step-by-step reference simulator.

Corollary 1 (a uniform stage is the n-bit quantizer, ties included), Theorem 2 (input kernels
for a target f, output kernels for a target h), the receive/emit tables and the small helpers.
Where exactness is claimed, scales are powers of two so float arithmetic is exact.
"""
from __future__ import annotations

import numpy as np
import pytest

from graphs import dyadic_stage, stage_inputs
from ttfsc import simulator as sim
from ttfsc.ttfs import (
    UniformStage,
    bits_for_window,
    code_of_bound,
    codes_to_times,
    corollary1_theta,
    decode_counts,
    decode_times,
    distance_to_tie,
    emit_ramp,
    emit_table,
    range_zero_point,
    rounding_top,
    tie_blocked,
    times_grid,
    zero_point_of,
    quantizer_codes,
    receive_table,
    spike_count,
    theorem2_eta,
    theorem2_psi,
    theorem2_theta,
    time_dtype,
    times_to_codes,
    window_for_bits,
)

TIES = ("half_even", "half_up")


def _receive_one(stage_in: UniformStage, t_in: np.ndarray, eta=None, c_offset=None) -> np.ndarray:
    """Potential at t_emit of a neuron with one input of weight 1 (C = c_offset * 1 / N_in)."""
    eta = stage_in.eta() if eta is None else eta
    c_offset = float(stage_in.a) if c_offset is None else c_offset
    N_in = stage_in.N
    C = np.array([c_offset / N_in])
    return sim.receive(np.asarray(t_in).reshape(-1, 1), np.ones((1, 1)), eta, C, N_in)[:, 0]


def _emit_stage(stage: UniformStage, v: np.ndarray, tie_rule: str) -> np.ndarray:
    return sim.emit(v, stage.psi(), stage.theta, stage.N, stage.t_ref, tie_rule).times


def _ref_round(u: np.ndarray, tie_rule: str) -> np.ndarray:
    """Independent rounding reference: numpy rint (ONNX QuantizeLinear) or floor(u + 1/2)."""
    return np.rint(u) if tie_rule == "half_even" else np.floor(u + 0.5)


# ------------------------------------------------------------------ Corollary 1

@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("tie_rule", TIES)
def test_corollary1_receive_emit_is_quantizer(bits, tie_rule):
    """Input stage (finer grid, step kernel, C from a_in) -> uniform stage == quantizer_codes."""
    rng = np.random.default_rng(100 * bits + len(tie_rule))
    T = window_for_bits(bits)
    N = T - 1
    for trial in range(3):
        k = int(rng.integers(1, 8))
        scale = 2.0 ** -k
        z = int(rng.integers(0, N + 1))
        out = UniformStage(scale, z, T, tie_rule)
        # Input grid: step_in = scale/4 (so half-steps of the output grid, i.e. exact ties, are on it),
        # and wide enough to cover the output range [a, b] plus overflow on both sides.
        step_in = scale / 4
        N_in = 4 * N + 16
        # z_in in {0, N_in}: C = a_in / N_in is then exact (0 or -step_in), so V is exactly x.
        for z_in in (0, N_in):
            stage_in = UniformStage(step_in, z_in, N_in + 1)
            t_in = np.arange(N_in + 1)
            x = (stage_in.t_ref - t_in) * step_in
            v = _receive_one(stage_in, t_in)
            np.testing.assert_array_equal(v, x)                      # Theorem 2, f = identity
            times = _emit_stage(out, v, tie_rule)
            codes = quantizer_codes(x, scale, z, N, tie_rule)
            np.testing.assert_array_equal(times, codes_to_times(codes, N).astype(np.int64))
            ref = np.clip(_ref_round(x / scale, tie_rule) + z, 0, N)
            np.testing.assert_array_equal(codes, ref)
            assert np.any((x / scale) % 1 == 0.5)                   # ties really were exercised


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("tie_rule", TIES)
def test_corollary1_emit_random_dyadic(bits, tie_rule):
    rng = np.random.default_rng(7 + bits)
    T = window_for_bits(bits)
    N = T - 1
    for trial in range(4):
        st = dyadic_stage(rng, T, tie_rule, max_shift=10)
        scale, z = st.scale, st.zero_point
        # random multiples of scale/64 over [a - 3 steps, b + 3 steps), plus every exact tie (and its negative)
        ties, x = stage_inputs(rng, st, 400, margin=2)
        x = np.concatenate([x, ties, -ties])
        times = _emit_stage(st, x, tie_rule)
        codes = quantizer_codes(x, scale, z, N, tie_rule)
        np.testing.assert_array_equal(N - times, codes)
        np.testing.assert_array_equal(codes, np.clip(_ref_round(x / scale, tie_rule) + z, 0, N))


def test_tie_rules_differ_exactly_on_ties():
    st = UniformStage(0.25, 3, 8)
    x = (np.arange(-3, 5) + 0.5) * 0.25           # exact ties, codes -3..4 relative to z
    even = st.N - _emit_stage(st, x, "half_even")
    up = st.N - _emit_stage(st, x, "half_up")
    u = x / 0.25
    np.testing.assert_array_equal(even - 3, np.clip(np.rint(u), -3, 4))
    np.testing.assert_array_equal(up - 3, np.clip(np.floor(u) + 1, -3, 4))
    # j + 1/2 with j even: half-even rounds down, half-up rounds up (j = 4 is clipped to 4 by both)
    np.testing.assert_array_equal(even != up, np.isin(np.arange(-3, 5), [-2, 0, 2]))
    # and off-tie inputs do not depend on the rule
    y = (np.arange(-20, 30) + 0.25) * 0.25
    np.testing.assert_array_equal(_emit_stage(st, y, "half_even"), _emit_stage(st, y, "half_up"))


# ------------------------------------------------------------------ Theorem 2

def test_theorem2_identity_quantizer():
    """f = identity through theorem2_eta, h = identity through theorem2_psi/theta == Corollary 1."""
    step_in, T_in = 2.0 ** -3, 32
    stage_in = UniformStage(step_in, 11, T_in)
    eta = theorem2_eta(lambda x: x, float(stage_in.a), step_in, stage_in.N)
    np.testing.assert_array_equal(eta, stage_in.eta().astype(np.float64))
    out = UniformStage(2.0 ** -2, 5, 16)
    psi = theorem2_psi(lambda y: y, float(out.b), float(out.step), out.N)
    np.testing.assert_array_equal(psi, out.psi().astype(np.float64))
    theta = theorem2_theta(lambda y: y, float(out.b), -float(out.step) / 2)
    assert theta == float(out.theta)
    t_in = np.arange(T_in)
    x = (stage_in.t_ref - t_in) * step_in
    v = _receive_one(stage_in, t_in, eta, float(stage_in.a))
    np.testing.assert_allclose(v, x, rtol=0, atol=1e-12)
    for tie_rule in TIES:
        times = sim.emit(v, psi, theta, out.N, out.t_ref, tie_rule).times
        # x sits on a grid of step/2 of the output: exact ties occur; v is x up to 1e-12, so
        # compare against the quantizer on x only where no tie is involved, and count ties.
        tie = np.abs((x / float(out.step)) % 1 - 0.5) < 1e-9
        codes = quantizer_codes(x, float(out.step), out.zero_point, out.N, tie_rule)
        np.testing.assert_array_equal((out.N - times)[~tie], codes[~tie])


def silu(x):
    return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("seed", range(4))
def test_theorem2_silu_receive_and_quantize(seed):
    rng = np.random.default_rng(seed)
    T_in = int(rng.choice([16, 64, 256]))
    N_in = T_in - 1
    step_in = float(rng.uniform(0.01, 0.1))
    z_in = int(rng.integers(N_in // 4, 3 * N_in // 4))
    stage_in = UniformStage(step_in, z_in, T_in)
    a_in = float((stage_in.t_ref - N_in) * step_in)
    eta = theorem2_eta(silu, a_in, step_in, N_in)
    t = np.arange(N_in + 1)
    x = (stage_in.t_ref - t) * step_in
    v = _receive_one(stage_in, t, eta, silu(a_in))
    np.testing.assert_allclose(v, silu(x), rtol=0, atol=1e-9)
    assert abs(v[-1] - silu(a_in)) < 1e-9                      # silent input gives f(a_in)

    # uniform output stage: spike time == quantized SiLU value
    T = int(rng.choice([16, 64]))
    out = UniformStage(float(rng.uniform(0.01, 0.05)), int(rng.integers(1, T // 3)), T)
    times = _emit_stage(out, v, "half_even")
    fx = silu(x)
    u = fx / np.float64(out.step)
    near_tie = np.abs(u % 1 - 0.5) < 1e-6
    codes = quantizer_codes(fx, float(out.step), out.zero_point, out.N)
    np.testing.assert_array_equal((out.N - times)[~near_tie], codes[~near_tie])
    assert near_tie.sum() <= 1, f"{near_tie.sum()} near-tie SiLU values excluded"


@pytest.mark.parametrize("name", ["cube", "exp"])
def test_theorem2_output_kernel_nonlinear_h(name):
    """psi/theta from theorem2_psi/theta: fire at the first t with h(V) >= b - t*step (floor)."""
    rng = np.random.default_rng(3)
    T, step = 32, 0.125
    N = T - 1
    if name == "cube":
        h, h_inv = (lambda v: v ** 3), np.cbrt
        t_ref = 17
    else:
        h, h_inv = np.exp, np.log
        t_ref = N + 4                       # a = b - N*step = 0.5 > 0: log defined on the range
    b = t_ref * step
    a = b - N * step
    psi = theorem2_psi(h_inv, b, step, N)
    assert psi.shape == (N,) and np.all(psi > 0)
    theta = theorem2_theta(h_inv, b)
    # potentials whose h-values spread over [a - 1, b + 1]
    y = rng.uniform(a - 1.0, b + 1.0, 3000)
    if name == "exp":
        y = np.abs(y) + 1e-3
    v = h_inv(y)
    hv = h(v)
    times = sim.emit(v, psi, theta, N, t_ref, "half_up").times
    k = np.clip(np.ceil((b - hv) / step), 0, N)   # first slot with h(V) >= b - k*step; N = silent
    value = (t_ref - times) * step
    expected_value = np.clip(np.floor(hv / step) * step, a, b)
    r = (b - hv) / step
    near = np.abs(r - np.rint(r)) < 1e-9
    np.testing.assert_array_equal(times[~near], k[~near].astype(np.int64))
    np.testing.assert_allclose(value[~near], expected_value[~near], rtol=0, atol=1e-12)
    assert near.sum() <= 3
    assert np.any(times == 0) and np.any(times == N) and np.any((times > 0) & (times < N))


# ------------------------------------------------------------------ tables

@pytest.mark.parametrize("seed", range(5))
def test_receive_table_matches_simulator(seed):
    rng = np.random.default_rng(seed)
    N_in = int(rng.choice([3, 15, 63, 255]))
    eta = rng.standard_normal(N_in)
    c_offset = float(rng.standard_normal())
    F = receive_table(eta, c_offset, N_in)
    assert F.shape == (N_in + 1,)
    t = np.arange(N_in + 1)
    v = sim.receive(t.reshape(-1, 1), np.ones((1, 1)), eta, np.array([c_offset / N_in]), N_in)[:, 0]
    np.testing.assert_allclose(v, F, rtol=0, atol=1e-10 * (1 + np.abs(F).max()))
    assert F[N_in] == c_offset
    with pytest.raises(ValueError):
        receive_table(eta[:-1], c_offset, N_in)


@pytest.mark.parametrize("seed", range(3))
def test_emit_table_matches_simulator_potential(seed):
    rng = np.random.default_rng(seed)
    N = 15
    psi = rng.uniform(0.1, 1.0, N)
    S = emit_table(psi, N)
    # first crossing against S equals the simulator's, for random V / theta
    v = rng.uniform(-10, 2, 200)
    theta = 1.0
    times = sim.emit(v, psi, theta, N, 0, "half_up").times
    cross = v[:, None] + S[None, :] >= theta
    expected = np.where(cross.any(1), cross.argmax(1), N)
    np.testing.assert_array_equal(times, expected)
    with pytest.raises(ValueError):
        emit_table(psi[:-1], N)


# ------------------------------------------------------------------ helpers

def test_window_bits_round_trip_and_errors():
    for bits in range(2, 13):
        T = window_for_bits(bits)
        assert T == 2 ** bits and bits_for_window(T) == bits
    for bad in (1, 13, 0, -3):
        with pytest.raises(ValueError):
            window_for_bits(bad)
    for bad in (0, -4, 2, 3, 6, 100, 8192, 2 ** 13):
        with pytest.raises(ValueError):
            bits_for_window(bad)
    assert time_dtype(256) == np.uint8 and time_dtype(512) == np.uint16


@pytest.mark.parametrize("T", [4, 16, 256, 1024])
def test_codes_times_decode_consistency(T):
    rng = np.random.default_rng(T)
    N = T - 1
    q = rng.integers(0, N + 1, 500)
    t = codes_to_times(q, N)
    assert t.dtype == time_dtype(T)
    np.testing.assert_array_equal(times_to_codes(t, N), q)
    np.testing.assert_array_equal(codes_to_times(times_to_codes(np.arange(T), N), N), np.arange(T))
    assert codes_to_times(np.array([0]), N)[0] == N          # code 0 is the silent neuron
    scale, z = 0.037, int(rng.integers(0, N + 1))
    st = UniformStage(scale, z, T)
    x = decode_times(t, float(st.step), st.t_ref)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, (q - z) * np.float32(scale), rtol=1e-6, atol=1e-6)
    assert decode_times(np.array([N]), float(st.step), st.t_ref)[0] == st.a
    assert decode_times(np.array([0]), float(st.step), st.t_ref)[0] == st.b


def test_spike_count_counts_only_t_below_N():
    T = 16
    t = np.array([0, 1, 14, 15, 15, 7])
    assert spike_count(t, T) == 4
    assert spike_count(np.full((3, 4), T - 1), T) == 0
    assert spike_count(np.zeros((3, 4), np.uint8), T) == 12


@pytest.mark.parametrize("T", [4, 64, 512])
def test_stage_read_back_from_its_node_fields(T):
    """A node stores (step, t_ref, T); from_timing gives back the QANN's zero point and every derived value."""
    N = T - 1
    for z in (0, 1, N // 2, N):
        st = UniformStage(0.015625, z, T)                   # a power of two: b - step/2 is exact
        back = UniformStage.from_timing(float(st.step), st.t_ref, T)
        assert zero_point_of(T, st.t_ref) == z and back == st
        assert st.theta == corollary1_theta(st.step, st.t_ref) == np.float32(float(st.b) - float(st.step) / 2)
        assert rounding_top(st.b, st.step) == np.float64(st.b) - np.float64(st.step) / 2
        scale, zp = times_grid(st.step, st.t_ref)           # spike times are codes of (-step, t_ref)
        assert scale == -st.step and zp == st.t_ref
    blocked = tie_blocked(5, 8)
    np.testing.assert_array_equal(blocked, [True, False, True, False, True, False, True, False])


def test_clip_bounds_codes_and_zero_point_of_a_range():
    """The codes of the Clip bounds a quantizer writes are 0 and N; a range's zero point is the code of 0."""
    N, scale, z = 63, np.float32(0.02), 20
    st = UniformStage(scale, z, N + 1)
    assert code_of_bound(st.a, scale, z) == 0 and code_of_bound(st.b, scale, z) == N
    assert range_zero_point(float(st.a), scale, N) == z
    assert range_zero_point(0.5, scale, N) == 0 and range_zero_point(-100.0, scale, N) == N   # clipped to 0..N
    np.testing.assert_array_equal(decode_counts(np.array([0, z, N], np.uint8), float(scale), z),
                                  np.array([-z, 0, N - z], np.float32) * scale)


def test_emit_ramp_extends_emit_table_and_tie_distance():
    psi = np.array([0.5, 0.25, 0.125, 1.0])
    np.testing.assert_array_equal(emit_ramp(psi), [0.0, 0.5, 0.75, 0.875, 1.875])
    np.testing.assert_array_equal(emit_table(psi, 4), emit_ramp(psi)[:4])
    np.testing.assert_allclose(distance_to_tie(np.array([0.5, 1.0, 0.75]), 1.0), [0.0, 0.5, 0.25])
