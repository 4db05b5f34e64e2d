"""The rate-coded baseline (compile --coding rate): IF neuron math, runtime ops, pass, end to end.

The simulator's integrate-and-fire neuron must count exactly the QANN's QuantizeLinear code
(ties included); the runtime's RateEmit/RateReceive/RateDecode must equal the simulator; the
compiled rate model must be bit-identical to its QDQ model; and on the same QANN a rate model
spends more spikes per token than a TTFS model.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402
from onnx import TensorProto as TP, helper as h, numpy_helper as nh  # noqa: E402

from graphs import (assert_compiled_equals_qdq, per_channel_activation_model, qdq_fusions_disabled,  # noqa: E402
                    quantized_linear_model, ttfs_model, ttfs_nodes)
from ttfsc import simulator as sim  # noqa: E402
from ttfsc.cli import main  # noqa: E402
from ttfsc.compiler.pipeline import latency_per_token, run_passes, stages  # noqa: E402
from ttfsc.compiler.verify import verify  # noqa: E402
from ttfsc.passes.decode_matmul_to_receive import DecodeMatMulToReceivePass  # noqa: E402
from ttfsc.passes.qdq_to_rate import QdqToRate  # noqa: E402
from ttfsc.dialect import (RATE_DECODE, RATE_EMIT, RATE_RECEIVE, RateEmitSpec,  # noqa: E402
                               RateReceiveSpec)
from ttfsc.runtime.session import default_options, exact_options, open_session, widest_window  # noqa: E402
from ttfsc.ttfs import RateStage, count_dtype, is_exact_tie, quantizer_codes  # noqa: E402

TIES = ("half_even", "half_up")
DISABLE, ENABLE = ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
CALIB = ["--calib-samples", "2", "--calib-seqlen", "32"]


def _dyadic_inputs(N: int, z: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Every half code from below the window to above it (exact ties), plus random dyadic values."""
    halves = (np.arange(-4, 2 * N + 6) / 2.0 - z) * scale
    rand = (rng.integers(-8 * N, 8 * N + 8 * 4, 64) / 8.0 - z) * scale
    return np.concatenate([halves, rand]).astype(np.float32)


# ------------------------------------------------------------------ the IF neuron == the quantizer

@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("tie_rule", TIES)
def test_if_neuron_count_equals_quantizer_codes(bits, tie_rule):
    rng = np.random.default_rng(bits)
    N = (1 << bits) - 1
    for z in (0, N // 3, N):
        scale = 3 * 2.0 ** -6                            # dyadic: x / scale is exact in float32
        x = _dyadic_inputs(N, z, scale, rng)
        assert is_exact_tie(x, scale).sum() > N           # ties are really exercised
        trace = sim.rate_emit(x, RateStage(scale, z, N, tie_rule))
        np.testing.assert_array_equal(trace.counts, quantizer_codes(x, scale, z, N, tie_rule))
        assert trace.trains.shape == (N,) + x.shape
        assert trace.trains.sum(axis=0).max() <= N and trace.trains.dtype == bool   # <= 1 spike per step
        assert trace.spikes_per_step.sum() == trace.counts.sum()


def test_tie_rules_differ_only_on_ties():
    N, z, scale = 15, 5, 0.25
    x = ((np.arange(0, 2 * N + 1) / 2.0 - z) * scale).astype(np.float32)
    even = sim.rate_emit(x, RateStage(scale, z, N, "half_even")).counts
    up = sim.rate_emit(x, RateStage(scale, z, N, "half_up")).counts
    differ = even != up
    assert differ.any() and is_exact_tie(x, scale)[differ].all()
    assert ((even[differ] - z) % 2 == 0).all() and (up[differ] == even[differ] + 1).all()


# ------------------------------------------------------------------ runtime ops == simulator

def _count_type(N: int) -> int:
    return TP.UINT8 if count_dtype(N) == np.uint8 else TP.UINT16


@pytest.mark.parametrize("bits", [2, 6, 8, 10])
@pytest.mark.parametrize("tie_rule", TIES)
@pytest.mark.parametrize("level", [DISABLE, ENABLE])
def test_rate_emit_equals_simulator(bits, tie_rule, level):
    rng = np.random.default_rng(bits)
    N = (1 << bits) - 1
    z = int(rng.integers(0, N + 1))
    scale = 5 * 2.0 ** -7
    x = _dyadic_inputs(N, z, scale, rng)
    spec = RateEmitSpec(N, scale, z, tie_rule)
    m = ttfs_model([spec.make_node("V", "c", "emit")], [h.make_tensor_value_info("V", TP.FLOAT, [x.size])],
                   [h.make_tensor_value_info("c", _count_type(N), [x.size])])
    out = open_session(m, default_options(level)).run(None, {"V": x})[0]
    assert out.dtype == count_dtype(N)
    if bits <= 8:                                       # the Fraction simulator is slow for N = 1023
        np.testing.assert_array_equal(out, sim.rate_emit(x, spec.stage()).counts)
    np.testing.assert_array_equal(out, quantizer_codes(x, scale, z, N, tie_rule))


@pytest.mark.parametrize("level", [DISABLE, ENABLE])
def test_rate_receive_and_decode_equal_simulator(level):
    rng = np.random.default_rng(3)
    N, z, scale, I, O, M = 63, 20, 2.0 ** -5, 16, 8, 6
    x = ((rng.integers(-40, 60, (M, I)) / 2.0) * scale).astype(np.float32)
    W = rng.integers(-127, 128, (I, O)).astype(np.int8)
    sw = (rng.integers(1, 16, O) * 2.0 ** -10).astype(np.float32)
    e = RateEmitSpec(N, scale, z)
    nodes = [e.make_node("V", "c", "emit"), e.receive_spec().make_node(["c", "W", "sw"], "y", "recv"),
             e.make_decode("c", "xd", "dec")]
    m = ttfs_model(nodes, [h.make_tensor_value_info("V", TP.FLOAT, [M, I])],
                   [h.make_tensor_value_info("y", TP.FLOAT, [M, O]), h.make_tensor_value_info("xd", TP.FLOAT, [M, I])],
                   [nh.from_array(W, "W"), nh.from_array(sw, "sw")])
    y, xd = open_session(m, default_options(level)).run(None, {"V": x})
    trace = sim.rate_emit(x, e.stage())
    v_ref = sim.rate_receive(trace.trains, W.astype(np.float64) * sw.astype(np.float64), scale, z)
    np.testing.assert_allclose(y, v_ref, rtol=1e-6, atol=1e-6 * np.abs(v_ref).max())
    np.testing.assert_array_equal(xd, ((trace.counts - z) * scale).astype(np.float32))
    assert RateReceiveSpec.from_node(nodes[1]) == e.receive_spec()


def test_exact_options_treat_rate_windows_like_ttfs():
    for N, disabled in ((127, False), (255, True)):
        e = RateEmitSpec(N, 0.1, 3)
        m = ttfs_model([e.make_node("V", "c", "emit")], [h.make_tensor_value_info("V", TP.FLOAT, [2])],
                       [h.make_tensor_value_info("c", _count_type(N), [2])])
        assert widest_window(m) == N + 1
        so = exact_options(m)
        assert qdq_fusions_disabled(so) is disabled


# ------------------------------------------------------------------ the pass

@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_qdq_to_rate_positive(bits):
    m, info = quantized_linear_model(bits=bits, extra_consumer=True)
    rep = QdqToRate(1 << bits).run(m).as_dict()
    assert rep["rewritten"] == {"QuantDequantToRate": 1} and rep["skipped"] == []
    (emit,), (dec,) = ttfs_nodes(m, RATE_EMIT), ttfs_nodes(m, RATE_DECODE)
    e = RateEmitSpec.from_node(emit)
    assert (e.N, e.zero_point, e.threshold) == (info["N"], info["zero_point"], float(info["scale"]))
    assert e.qann_tensor == "xq" and emit.input[0] == "x" and dec.output[0] == "xd"
    rep = DecodeMatMulToReceivePass().run(m).as_dict()
    assert rep["rewritten"] == {"DecodeMatMulToReceive": 2}
    assert len(ttfs_nodes(m, RATE_RECEIVE)) == 2 and len(ttfs_nodes(m, RATE_DECODE)) == 1   # kept for Relu


def test_qdq_to_rate_negative_cases_are_skipped_with_reasons():
    m = per_channel_activation_model()
    before = copy.deepcopy(m)
    rep = QdqToRate(256).run(m).as_dict()
    assert rep["rewritten"] == {} and "per-channel" in rep["skipped"][0]["reason"]
    assert m.graph == before.graph
    # activation x activation product: the decode stays, the MatMul is left alone
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
             h.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
             h.make_node("MatMul", ["xd", "y"], ["out"], name="mm")]
    m = ttfs_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [2, 4]),
                          h.make_tensor_value_info("y", TP.FLOAT, [4, 3])],
                   [h.make_tensor_value_info("out", TP.FLOAT, [2, 3])],
                   [nh.from_array(np.array(0.1, np.float32), "s"), nh.from_array(np.array(128, np.uint8), "zp")])
    reports = run_passes(m, 256, coding="rate")
    assert reports[1]["rewritten"] == {} and reports[1]["skipped"][0]["node"] == "mm"
    assert [n.op_type for n in m.graph.node] == [RATE_EMIT, RATE_DECODE, "MatMul"]


VARIANTS = [({}, (DISABLE, ENABLE)), ({"extra_consumer": True, "per_channel": False}, (DISABLE, ENABLE)),
            ({"bits": 2}, (DISABLE, ENABLE)), ({"bits": 4}, (DISABLE, ENABLE)),
            ({"bits": 8}, (DISABLE, ENABLE)),
            # int8 QANN: unfused at ENABLE_ALL while the uint8 counts fuse (as for TTFS; see test_passes)
            ({"bits": 8, "signed_act": True, "clip": False}, (DISABLE,))]


@pytest.mark.parametrize("kw,levels", VARIANTS, ids=[str(v[0]) for v in VARIANTS])
def test_rate_compiled_equals_qdq(kw, levels):
    m, info = quantized_linear_model(seed=1, **kw)
    T = info["N"] + 1
    c = copy.deepcopy(m)
    run_passes(c, T, coding="rate")
    assert not any(n.op_type in ("QuantizeLinear", "Clip", "DequantizeLinear") for n in c.graph.node)
    assert len(ttfs_nodes(c, RATE_RECEIVE)) == 2
    onnx.checker.check_model(c)
    x_big = (np.random.default_rng(5).standard_normal((16, 32)) * info["N"] * info["scale"]).astype(np.float32)
    assert_compiled_equals_qdq(m, c, (info["x"], x_big), levels, exact_reference=True, tag=kw)


def test_rate_stages_and_latency():
    for bits in (2, 4, 6):
        m, info = quantized_linear_model(bits=bits)
        run_passes(m, 1 << bits, coding="rate")
        (st,) = stages(m)
        assert st["coding"] == "rate" and st["steps"] == info["N"] and st["bits"] == bits
        assert latency_per_token(m) == info["N"]


# ------------------------------------------------------------------ end to end on the tiny LLaMA

@pytest.fixture(scope="module")
def qdq_a4(tiny_llama_onnx: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rate") / "model.qdq.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "--abits", "4", "-o", str(out), *CALIB]) == 0
    return out


def test_rate_end_to_end_verifies_and_spends_more_spikes(qdq_a4: Path, capsys):
    rate, ttfs = qdq_a4.with_name("rate.snn.onnx"), qdq_a4.with_name("ttfs.snn.onnx")
    assert main(["compile", str(qdq_a4), "-T", "16", "--coding", "rate", "-o", str(rate), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["coding"] == "rate" and rep["passes"][0]["pass"] == "qdq_to_rate"
    assert len(rep["stages"]) == 9 and all(s["steps"] == 15 and s["coding"] == "rate" for s in rep["stages"])
    assert rep["latency_steps_per_token"] == 9 * 15
    assert main(["compile", str(qdq_a4), "-T", "16", "-o", str(ttfs)]) == 0
    r_rate = verify(str(qdq_a4), str(rate), tokens=16)
    r_ttfs = verify(str(qdq_a4), str(ttfs), tokens=16)
    for r in (r_rate, r_ttfs):
        assert r["ok"] and r["total"]["mismatch"] == 0 and r["max_abs_logit_diff"] == 0.0
    assert r_rate["coding"] == "rate" and r_ttfs["coding"] == "ttfs"
    assert r_rate["neurons_per_token"] == r_ttfs["neurons_per_token"]
    assert 0 < r_ttfs["spikes_per_token"] <= r_ttfs["neurons_per_token"] < r_rate["spikes_per_token"]
    assert r_rate["spikes_by_coding"] == r_ttfs["spikes_by_coding"]             # the same codes
    assert r_rate["spikes_per_token"] == r_rate["spikes_by_coding"]["rate"]
