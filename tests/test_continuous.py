"""The continuous-kernel (TTFSFormer-style) baseline: compile --neuron continuous.

Its stage must be a floor quantizer onto T levels of the float range [a, b] (checked in
onnxruntime against numpy's floor), the step simulator running Eq. 7 with the stage's kernels
must produce the same spike times and received potentials as the runtime, the compiled tiny
model must approach the float model as T grows from 16 to 8192, and a bad -T is one clear error.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP, helper as h, numpy_helper as nh

from graphs import ttfs_model
from ttfsc import simulator as sim
from ttfsc.cli import main
from ttfsc.compiler.pipeline import compile_model
from ttfsc.passes.decode_matmul_to_receive import DecodeMatMulToReceivePass
from ttfsc.passes.qdq_to_continuous import ActivationsToContinuous
from ttfsc.runtime.generate import Generator
from ttfsc.dialect import CONT_DECODE, CONT_EMIT, RECEIVE, ContinuousEmitSpec
from ttfsc.runtime.session import open_session
from ttfsc.ttfs import DOMAIN, ContinuousStage, time_dtype

QUICK_CALIB = {"calib_samples": 2, "calib_seqlen": 32}


def _off_grid_inputs(st: ContinuousStage, rng: np.random.Generator, n: int) -> np.ndarray:
    """Values inside [a, b) at least 2% of a step away from every level, plus some outside the range."""
    j = rng.integers(0, st.T, n)
    frac = rng.uniform(0.02, 0.98, n)
    x = np.float64(st.a) + (j + frac) * np.float64(st.step)
    x[: n // 10] = st.a - rng.uniform(0.1, 5.0, n // 10) * (st.b - st.a)   # below a: silent -> a
    x[n // 10: n // 5] = st.b + rng.uniform(0.0, 5.0, n // 10) * (st.b - st.a)  # above b: first slot
    return x.astype(np.float32)


def _floor_quantizer(x: np.ndarray, st: ContinuousStage) -> np.ndarray:
    """The expected value, float64: a + clip(floor((x - a)/step), 0, T-1) * step."""
    step = np.float64(st.step)
    k = np.clip(np.floor((x.astype(np.float64) - st.a) / step), 0, st.T - 1)
    return st.a + k * step


@pytest.mark.parametrize("T", [16, 256, 8192])
def test_emission_is_floor_quantizer(T):
    rng = np.random.default_rng(T)
    st = ContinuousStage.from_range(-1.7 + rng.random(), 2.3 + rng.random(), T)
    spec = ContinuousEmitSpec.from_stage(st, source_tensor="x")
    m = ttfs_model([spec.make_node("x", "t", "emit"), spec.make_decode("t", "y", "decode")],
                   [h.make_tensor_value_info("x", TP.FLOAT, [None])],
                   [h.make_tensor_value_info("t", TP.UINT16 if T > 256 else TP.UINT8, [None]),
                    h.make_tensor_value_info("y", TP.FLOAT, [None])])
    mids = np.float64(st.a) + (np.arange(T) + 0.5) * np.float64(st.step)  # one input per level
    x = np.concatenate([_off_grid_inputs(st, rng, 4000), mids.astype(np.float32)])
    t, y = open_session(m).run(["t", "y"], {"x": x})
    assert t.dtype == time_dtype(T) and t.max() <= T - 1
    np.testing.assert_allclose(y, _floor_quantizer(x, st), rtol=0, atol=1e-5 * (st.b - st.a))
    assert np.all(y <= np.maximum(x, st.a) + 1e-6)  # floor: never above the input (QC-A2S rounds)
    np.testing.assert_array_equal(t, st.times(x))
    # every level is used: T distinct values, the top one b - step, the bottom (silent) one a
    assert len(np.unique(t)) == T
    assert np.isclose(y.max(), st.b - st.step) and np.isclose(y.min(), st.a)


@pytest.mark.parametrize("T", [16, 64, 512])
def test_simulator_agrees_with_runtime(T):
    """x -> ContinuousEmit -> MatMul(float W): spike times and received potentials, runtime vs Eq. 7 stepped."""
    rng = np.random.default_rng(7 + T)
    st = ContinuousStage.from_range(-0.8, 1.9, T)
    I, O, M = 12, 5, 300
    W = rng.standard_normal((I, O)).astype(np.float32)
    m = ttfs_model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                   [h.make_tensor_value_info("x", TP.FLOAT, [M, I])], [h.make_tensor_value_info("y", TP.FLOAT, [M, O])],
                   [nh.from_array(W, "W")])
    ActivationsToContinuous(T, {"x": (st.a, st.b)}).run(m)
    DecodeMatMulToReceivePass().run(m)
    ops = [n.op_type for n in m.graph.node]
    assert ops == [CONT_EMIT, RECEIVE]  # the decoder was folded into the receiving neurons
    t_name = m.graph.node[0].output[0]
    m.graph.output.append(h.make_tensor_value_info(t_name, TP.UINT16 if T > 256 else TP.UINT8, [M, I]))
    x = _off_grid_inputs(st, rng, M * I).reshape(M, I)
    y, t = open_session(m).run(["y", t_name], {"x": x})

    trace = sim.emit(x, st.psi(), float(st.theta_slot), st.N, tie_rule="half_up")
    np.testing.assert_array_equal(t, trace.times)
    C = np.float64(st.a) * W.astype(np.float64).sum(axis=0) / st.N   # C_i = f(a) sum_j w_ij / N
    v = sim.receive(trace.times, W, st.eta(), C, st.N)
    np.testing.assert_allclose(y, v, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(v, _floor_quantizer(x, st) @ W.astype(np.float64), rtol=1e-6, atol=1e-5)


def _mean_logit_error(fp: Generator, snn: Generator, ids: list[int]) -> float:
    return float(np.mean(np.abs(fp.logits(ids) - snn.logits(ids))))


def test_tiny_model_error_shrinks_with_T(tiny_llama_onnx, tmp_path):
    fp = Generator(open_session(tiny_llama_onnx), tiny_llama_onnx.parent)
    ids = [1] + list(np.random.default_rng(0).integers(3, 98, 40))
    errors, n_linear_inputs = {}, None
    for T in (16, 256, 8192):
        out = tmp_path / f"c{T}" / "model.onnx"
        report = compile_model(str(tiny_llama_onnx), str(out), T, quant_options=QUICK_CALIB, log=lambda *a: None,
                               neuron="continuous")
        st = report["stages"]
        assert st and all(s["window"] == T and s["b"] > s["a"] for s in st)
        assert n_linear_inputs in (None, len(st))
        n_linear_inputs = len(st)
        assert report["latency_steps_per_token"] % T == 0 and report["latency_steps_per_token"] >= 2 * T
        model = onnx.load(str(out), load_external_data=False)
        assert {n.op_type for n in model.graph.node if n.domain == DOMAIN} <= {CONT_EMIT, CONT_DECODE, RECEIVE}
        assert {p.key: p.value for p in model.metadata_props}["ttfsc.neuron"] == "continuous"
        errors[T] = _mean_logit_error(fp, Generator(open_session(out), out.parent), ids)
    assert errors[16] > errors[256] > errors[8192] > 0
    assert errors[8192] < errors[16] / 20


@pytest.mark.parametrize("T", ["100", "8", "16384", "auto"])
def test_bad_window_is_one_clear_error(tiny_llama_onnx, tmp_path, capsys, T):
    out = tmp_path / "m.onnx"
    rc = main(["compile", str(tiny_llama_onnx), "-T", T, "--neuron", "continuous", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("ttfsc: error: --neuron continuous:") and "16 to 8192" in err[0]
    assert not out.exists()


def test_qdq_input_and_rate_coding_are_refused(tiny_llama_onnx, tmp_path, capsys):
    rc = main(["compile", str(tiny_llama_onnx), "-T", "64", "--neuron", "continuous", "--coding", "rate",
               "-o", str(tmp_path / "m.onnx")])
    assert rc == 2 and "drop --coding rate" in capsys.readouterr().err


def test_verify_refuses_continuous_models_with_a_clear_message() -> None:
    """A continuous-kernel model has no QANN twin; verify says so instead of a missing-tensor error."""
    from onnx import TensorProto, helper
    from ttfsc.compiler.verify import find_probes
    node = helper.make_node("ContinuousEmit", ["v"], ["t"], domain="ai.ttfsc")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("v", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("t", TensorProto.UINT8, [2])])
    snn = helper.make_model(g)
    from ttfsc.errors import TtfscError
    with pytest.raises(TtfscError, match="--neuron continuous"):
        find_probes(helper.make_model(helper.make_graph([], "q", [], [])), snn)
