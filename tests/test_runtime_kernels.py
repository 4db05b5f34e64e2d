"""The runtime's TTFS operators (lowered to native onnxruntime ops) equal the reference simulator.

Every model here is one or two TTFS nodes built with onnx.helper and opened with open_session.
Data are dyadic (small multiples of 1/64 or of a power-of-two step) so float32 (runtime) and
float64 (simulator) are both exact, and exact threshold hits (ties) are part of the inputs.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP, helper as h, numpy_helper as nh

from graphs import dyadic_stage, qdq_fusions_disabled, stage_inputs, ttfs_model  # noqa: E402
from ttfsc import simulator as sim
from ttfsc.graph import MS_DOMAIN
from ttfsc.dialect import (CONT_DECODE, CONT_EMIT, NEURON, RATE_OPS, TTFS_OPS, EmitSpec, ReceiveSpec,
                           time_elem_type)
from ttfsc.runtime.lowerings import LOWERINGS
from ttfsc.runtime.session import default_options, lower_model, open_session
from ttfsc.ttfs import DOMAIN, UniformStage, decode_times, emit_table, quantizer_codes, time_dtype

TIES = ("half_even", "half_up")
LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def _run(model, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    return open_session(model, default_options(level)).run(None, feeds)[0]


def _emit_model(spec: EmitSpec, shape) -> onnx.ModelProto:
    return ttfs_model([spec.make_node("V", "t", "emit")],
                      [h.make_tensor_value_info("V", TP.FLOAT, list(shape))],
                      [h.make_tensor_value_info("t", time_elem_type(spec.T), list(shape))])


# ------------------------------------------------------------------ TTFSEmit

@pytest.mark.parametrize("T", [8, 16, 64])
@pytest.mark.parametrize("tie_rule", TIES)
def test_emit_general_equals_simulator(T, tie_rule):
    rng = np.random.default_rng(T + 7 * len(tie_rule))
    N = T - 1
    for trial in range(3):
        psi = rng.integers(1, 9, N) / 64.0
        psi[0] = psi[1] + 1 / 64                                # never all equal (not Corollary 1)
        theta = int(rng.integers(-64, 65)) / 64.0
        t_ref = int(rng.integers(0, N + 1))
        spec = EmitSpec(T, t_ref, 1 / 64, tuple(psi), theta, tie_rule)
        S = emit_table(psi, N)
        v_ties = theta - S[rng.integers(0, N, 200)]              # exact threshold hits at some slot
        v_rand = rng.integers(int(-S[-1] * 64) - 64, int(theta * 64) + 64, (4, 50)) / 64.0
        v = np.concatenate([v_ties.reshape(4, 50), v_rand], axis=1)
        ref = sim.emit(v, psi, theta, N, t_ref, tie_rule).times
        for level in LEVELS:
            t = _run(_emit_model(spec, v.shape), {"V": v.astype(np.float32)}, level)
            assert t.dtype == time_dtype(T)
            np.testing.assert_array_equal(t.astype(np.int64), ref)
        assert np.any(ref == N) and np.any(ref < N)


@pytest.mark.parametrize("T", [8, 16, 64, 256])
@pytest.mark.parametrize("tie_rule", TIES)
def test_emit_uniform_equals_simulator(T, tie_rule):
    rng = np.random.default_rng(3 * T + len(tie_rule))
    N = T - 1
    for trial in range(3):
        st = dyadic_stage(rng, T, tie_rule, max_shift=8)
        spec = EmitSpec.from_stage(st)
        v = np.concatenate(stage_inputs(rng, st, 600, margin=3))[None, :]
        ref = sim.emit(v, st.psi(), st.theta, N, st.t_ref, tie_rule).times
        np.testing.assert_array_equal(N - ref, quantizer_codes(v, st.scale, st.zero_point, N, tie_rule))
        for level in LEVELS:
            t = _run(_emit_model(spec, v.shape), {"V": v.astype(np.float32)}, level)
            np.testing.assert_array_equal(t.astype(np.int64), ref)


# ------------------------------------------------------------------ TTFSReceive

def _dyadic_weights(rng, I, O, N_in):
    """Multiples of 1/4 whose column sums are multiples of N_in/4, so C = c*colsum/N_in is exact."""
    W = rng.integers(-8, 9, (I, O)) / 4.0
    target = N_in * rng.integers(-3, 4, O) / 4.0
    W[-1] = target - W[:-1].sum(0)
    return W


@pytest.mark.parametrize("T_in", [8, 16, 64])
@pytest.mark.parametrize("gain", [1.0, 0.5, 2.0])
def test_receive_general_equals_simulator(T_in, gain):
    rng = np.random.default_rng(T_in + int(gain * 10))
    N_in = T_in - 1
    I, O, B = 12, 7, 30
    eta = rng.integers(-4, 9, N_in) / 64.0
    c_offset = int(rng.integers(-128, 129)) / 64.0
    t_ref_in = int(rng.integers(0, N_in + 1))
    spec = ReceiveSpec(T_in, t_ref_in, 1 / 16, tuple(eta), c_offset, gain)
    W = _dyadic_weights(rng, I, O, N_in)
    t = rng.integers(0, T_in, (B, I))
    t[0] = N_in                                                  # all silent
    t[1] = 0                                                     # all first slot
    m = ttfs_model([spec.make_node(["t", "W"], "V", "recv")],
                   [h.make_tensor_value_info("t", time_elem_type(T_in), [B, I])],
                   [h.make_tensor_value_info("V", TP.FLOAT, [B, O])],
                   [nh.from_array(W.astype(np.float32), "W")])
    C = c_offset * W.sum(0) / N_in
    ref = sim.receive(t, W, eta, C, N_in, gain)
    for level in LEVELS:
        v = _run(m, {"t": t.astype(time_dtype(T_in))}, level)
        np.testing.assert_array_equal(v.astype(np.float64), ref)


def _fast_receive_model(spec: ReceiveSpec, W, sw, wz, B):
    I, O = W.shape
    return ttfs_model([spec.make_node(["t", "W", "sw", "wz"], "V", "recv")],
                      [h.make_tensor_value_info("t", time_elem_type(spec.T_in), [B, I])],
                      [h.make_tensor_value_info("V", TP.FLOAT, [B, O])],
                      [nh.from_array(W, "W"), nh.from_array(sw, "sw"), nh.from_array(wz, "wz")])


@pytest.mark.parametrize("T_in", [4, 16, 64])
@pytest.mark.parametrize("dyadic", [True, False])
def test_receive_step_kernel_fast_path(T_in, dyadic):
    rng = np.random.default_rng(T_in + dyadic)
    N_in = T_in - 1
    I, O, B = 24, 10, 20
    z_in = int(rng.integers(0, N_in + 1))
    step_in = 2.0 ** -4 if dyadic else float(rng.uniform(0.01, 0.2))
    spec = ReceiveSpec.from_emit(EmitSpec.from_stage(UniformStage(step_in, z_in, T_in)))
    W = rng.integers(-127, 128, (I, O)).astype(np.int8)
    if dyadic:
        sw = (2.0 ** -rng.integers(4, 9, O)).astype(np.float32)
        wz = np.zeros(O, np.int8)
    else:
        sw = rng.uniform(0.001, 0.02, O).astype(np.float32)
        wz = rng.integers(-5, 6, O).astype(np.int8)
    t = rng.integers(0, T_in, (B, I))
    t[0] = N_in
    m = _fast_receive_model(spec, W, sw, wz, B)
    # the fast lowering really was taken (no table Gather)
    assert not any(n.op_type == "Gather" for n in lower_model(m).graph.node)
    Wf = (W.astype(np.float64) - wz) * sw.astype(np.float64)
    a_in = float(np.float32(spec.step_in) * np.float32(spec.t_ref_in - N_in))
    C = a_in * Wf.sum(0) / N_in
    eta = np.asarray(spec.eta, dtype=np.float64)
    ref = sim.receive(t, Wf, eta, C, N_in)
    for level in LEVELS:
        v = _run(m, {"t": t.astype(time_dtype(T_in))}, level).astype(np.float64)
        if dyadic:
            np.testing.assert_allclose(v, ref, rtol=0, atol=1e-9)
            np.testing.assert_array_equal(v, ref.astype(np.float32))
        else:
            np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _chain_model(rs: ReceiveSpec, es: EmitSpec, B: int, I: int, O: int, weights: list) -> onnx.ModelProto:
    """TTFSReceive(t, *weights) -> TTFSEmit: one stage from uint8 spike times to uint8 spike times."""
    nodes = [rs.make_node(["t", *(w.name for w in weights)], "V", "recv"), es.make_node("V", "t_out", "emit")]
    return ttfs_model(nodes, [h.make_tensor_value_info("t", TP.UINT8, [B, I])],
                      [h.make_tensor_value_info("t_out", TP.UINT8, [B, O])], weights)


@pytest.mark.parametrize("tie_rule", TIES)
def test_stage_chain_general_equals_simulator(tie_rule):
    """TTFSReceive (table form) -> TTFSEmit (table form) == simulator.stage, spike for spike."""
    rng = np.random.default_rng(11 + len(tie_rule))
    T_in, T = 16, 32
    N_in, N = T_in - 1, T - 1
    I, O, B = 10, 9, 60
    eta = rng.integers(-2, 9, N_in) / 64.0
    c_offset = int(rng.integers(-64, 65)) / 64.0
    rs = ReceiveSpec(T_in, 5, 1 / 16, tuple(eta), c_offset, 1.0)
    W = _dyadic_weights(rng, I, O, N_in)
    psi = rng.integers(1, 9, N) / 64.0
    psi[0] = psi[1] + 1 / 64
    theta = 3.0
    t_ref = 20
    es = EmitSpec(T, t_ref, 1 / 64, tuple(psi), theta, tie_rule)
    t = rng.integers(0, T_in, (B, I))
    C = c_offset * W.sum(0) / N_in
    weights = [nh.from_array(W.astype(np.float32), "W")]
    m = _chain_model(rs, es, B, I, O, weights)
    tr = sim.stage(t, W, eta, C, N_in, psi, theta, N, t_ref, 1.0, tie_rule)
    assert np.any(tr.times < N) and np.any(tr.times == N)
    for level in LEVELS:
        out = _run(m, {"t": t.astype(np.uint8)}, level)
        np.testing.assert_array_equal(out.astype(np.int64), tr.times)
    # exact ties: theta placed on V + S[k] for a few neurons
    S = emit_table(psi, N)
    theta2 = float(tr.v_emit[0, 0] + S[3])
    es2 = EmitSpec(T, t_ref, 1 / 64, tuple(psi), theta2, tie_rule)
    m2 = _chain_model(rs, es2, B, I, O, weights)
    tr2 = sim.stage(t, W, eta, C, N_in, psi, theta2, N, t_ref, 1.0, tie_rule)
    assert tr2.times[0, 0] == (4 if tie_rule == "half_even" else 3)   # t_ref - 3 is odd
    np.testing.assert_array_equal(_run(m2, {"t": t.astype(np.uint8)}).astype(np.int64), tr2.times)


@pytest.mark.parametrize("tie_rule", TIES)
def test_stage_chain_uniform_equals_simulator(tie_rule):
    """Step-kernel receive (int8 weights) -> uniform emit == simulator.stage == quantizer."""
    rng = np.random.default_rng(5 + len(tie_rule))
    T_in, T = 64, 16
    N_in, N = T_in - 1, T - 1
    I, O, B = 16, 12, 40
    step_in = 2.0 ** -5
    rs = ReceiveSpec.from_emit(EmitSpec.from_stage(UniformStage(step_in, N_in, T_in)))  # a_in = -N_in*step
    W = rng.integers(-127, 128, (I, O)).astype(np.int8)
    sw = (2.0 ** -rng.integers(5, 8, O)).astype(np.float32)
    wz = np.zeros(O, np.int8)
    out = UniformStage(2.0 ** -2, 6, T, tie_rule)
    es = EmitSpec.from_stage(out)
    m = _chain_model(rs, es, B, I, O, [nh.from_array(W, "W"), nh.from_array(sw, "sw"), nh.from_array(wz, "wz")])
    t = rng.integers(0, T_in, (B, I))
    Wf = W.astype(np.float64) * sw
    C = -step_in * Wf.sum(0)
    tr = sim.stage(t, Wf, np.asarray(rs.eta), C, N_in, out.psi(), out.theta, N, out.t_ref, 1.0, tie_rule)
    x = ((0 - t) * step_in) @ Wf
    np.testing.assert_array_equal(tr.v_emit, x)
    np.testing.assert_array_equal(N - tr.times, quantizer_codes(x, float(out.step), 6, N, tie_rule))
    for level in LEVELS:
        got = _run(m, {"t": t.astype(np.uint8)}, level)
        np.testing.assert_array_equal(got.astype(np.int64), tr.times)


# ------------------------------------------------------------------ TTFSDecode

@pytest.mark.parametrize("T", [4, 16, 256, 1024])
def test_decode_equals_decode_times(T):
    rng = np.random.default_rng(T)
    step, t_ref = float(np.float32(rng.uniform(0.001, 0.3))), int(rng.integers(0, T))
    e = EmitSpec(T, t_ref, step, (step,) * (T - 1), 0.0)
    m = ttfs_model([e.make_decode("t", "x", "dec")],
                   [h.make_tensor_value_info("t", time_elem_type(T), [5, 40])],
                   [h.make_tensor_value_info("x", TP.FLOAT, [5, 40])])
    t = rng.integers(0, T, (5, 40))
    t[0, :2] = [0, T - 1]
    for level in LEVELS:
        x = _run(m, {"t": t.astype(time_dtype(T))}, level)
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, decode_times(t, step, t_ref))


# ------------------------------------------------------------------ T = 1024 (uint16 times)

@pytest.mark.parametrize("tie_rule", TIES)
def test_T1024_uniform_emit_and_decode(tie_rule):
    T, N = 1024, 1023
    scale, z = 2.0 ** -6, 300
    st = UniformStage(scale, z, T, tie_rule)
    es = EmitSpec.from_stage(st)
    v = np.concatenate(stage_inputs(np.random.default_rng(1), st, 1000, margin=3, per_step=8))[None, :]
    m = ttfs_model([es.make_node("V", "t", "emit"), es.make_decode("t", "x", "dec")],
                   [h.make_tensor_value_info("V", TP.FLOAT, list(v.shape))],
                   [h.make_tensor_value_info("t", TP.UINT16, list(v.shape)),
                    h.make_tensor_value_info("x", TP.FLOAT, list(v.shape))])
    low = lower_model(m)
    assert any(n.domain == MS_DOMAIN for n in low.graph.node)          # uint16 Q/DQ
    assert any(o.domain == MS_DOMAIN for o in low.opset_import)
    codes = quantizer_codes(v, scale, z, N, tie_rule)
    for level in LEVELS:
        t, x = open_session(m, default_options(level)).run(None, {"V": v.astype(np.float32)})
        assert t.dtype == np.uint16
        np.testing.assert_array_equal(N - t.astype(np.int64), codes)
        np.testing.assert_array_equal(x, decode_times(t, float(st.step), st.t_ref))
        np.testing.assert_array_equal(x, ((codes - z) * scale).astype(np.float32))


# ------------------------------------------------------------------ lowering

def test_lower_model_leaves_no_ttfs_nodes_and_checks():
    rng = np.random.default_rng(0)
    st = UniformStage(0.05, 7, 16)
    es = EmitSpec.from_stage(st)
    rs = ReceiveSpec.from_emit(es)
    W = rng.integers(-127, 128, (8, 4)).astype(np.int8)
    nodes = [es.make_node("V", "t", "emit"),
             rs.make_node(["t", "W", "sw", "wz"], "y", "recv_fast"),
             ReceiveSpec(16, 3, 0.05, tuple(rng.standard_normal(15)), 0.1, 0.5).make_node(["t", "Wf"], "y2", "recv_tab"),
             EmitSpec(16, 4, 0.1, tuple(rng.uniform(0.1, 1, 15)), 0.7, "half_even").make_node("y2", "t2", "emit_tab"),
             EmitSpec.from_stage(UniformStage(0.1, 3, 16, "half_up")).make_node("y", "t3", "emit_up"),
             es.make_decode("t", "x", "dec")]
    m = ttfs_model(nodes, [h.make_tensor_value_info("V", TP.FLOAT, [3, 8])],
                   [h.make_tensor_value_info(n, tp, [3, d]) for n, tp, d in
                    [("t2", TP.UINT8, 4), ("t3", TP.UINT8, 4), ("x", TP.FLOAT, 8)]],
                   [nh.from_array(W, "W"), nh.from_array(np.full(4, 0.01, np.float32), "sw"),
                    nh.from_array(np.zeros(4, np.int8), "wz"),
                    nh.from_array(rng.standard_normal((8, 4)).astype(np.float32), "Wf")])
    low = lower_model(m)
    assert not any(n.domain == DOMAIN for n in low.graph.node)
    assert not any(o.domain == DOMAIN for o in low.opset_import)
    assert any(n.domain == DOMAIN for n in m.graph.node)      # the input model is not modified
    onnx.checker.check_model(low, full_check=True)
    V = rng.standard_normal((3, 8)).astype(np.float32)
    outs = open_session(m).run(None, {"V": V})
    assert [o.shape for o in outs] == [(3, 4), (3, 4), (3, 8)]



def test_every_dialect_op_has_one_lowering():
    """The registry names each ai.ttfsc operator of the dialect once, the neuron's included."""
    assert set(LOWERINGS) == set(TTFS_OPS) | set(RATE_OPS) | {CONT_EMIT, CONT_DECODE, NEURON}


def test_full_twins_run_without_qdq_fusion() -> None:
    """A --full twin (metadata) or a graph with TTFSNeuron nodes gets Q/DQ fusions off: the reference
    verify uses, so `run`/`eval` of the QANN and of its fully spiking model round alike."""
    from ttfsc.runtime.session import exact_options, is_full_twin
    x = h.make_tensor_value_info("x", TP.FLOAT, [2])
    y = h.make_tensor_value_info("y", TP.FLOAT, [2])
    plain = h.make_model(h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    assert not is_full_twin(plain)
    with pytest.raises(RuntimeError):
        exact_options(plain).get_session_config_entry("session.disable_quant_qdq")
    twin = onnx.ModelProto()
    twin.CopyFrom(plain)
    onnx.helper.set_model_props(twin, {"ttfsc.full": "1"})
    assert is_full_twin(twin)
    assert exact_options(twin).get_session_config_entry("session.disable_quant_qdq") == "1"
    neuron = onnx.ModelProto()
    neuron.CopyFrom(plain)
    neuron.graph.node.append(h.make_node("TTFSNeuron", ["y"], ["z"], domain="ai.ttfsc"))
    assert is_full_twin(neuron)


@pytest.mark.parametrize("levels,disabled", [(64, False), (128, False), (256, True)])
def test_plain_qdq_models_above_128_levels_run_exact(levels: int, disabled: bool) -> None:
    """A QDQ model's Clip-bounded activation quantizer sets its levels; above 128, fusions go off."""
    from ttfsc.runtime.session import exact_options, qdq_levels
    scale = 0.5
    nodes = [h.make_node("Clip", ["x", "lo", "hi"], ["c"]), h.make_node("QuantizeLinear", ["c", "s", "z"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [nh.from_array(np.float32(0.0), "lo"), nh.from_array(np.float32(scale * (levels - 1)), "hi"),
             nh.from_array(np.float32(scale), "s"), nh.from_array(np.uint8(0), "z")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", TP.FLOAT, [4])],
                     [h.make_tensor_value_info("y", TP.FLOAT, [4])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
    assert qdq_levels(m) == levels
    so = exact_options(m)
    assert qdq_fusions_disabled(so) is disabled
    x = np.array([-1.0, 0.26, 3.0, 500.0], np.float32)
    out = open_session(m).run(None, {"x": x})[0]
    np.testing.assert_array_equal(out, np.clip(np.round(x / scale), 0, levels - 1) * scale)
