"""Theorem 1 (kernels -> function) and ``ttfsc inspect --neurons`` on every neuron kind."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from onnx import helper as h  # noqa: E402

from test_full_passes import EXPECTED, build, compile_full, one_neuron  # noqa: E402
from ttfsc import simulator as sim  # noqa: E402
from ttfsc.cli import main  # noqa: E402
from ttfsc.compiler.inspect import inspect_neurons  # noqa: E402
from ttfsc.ttfs import (UniformStage, output_kernels, realised_function, receive_table, theorem1_times,  # noqa: E402
                        theorem2_eta)

KINDS = ["silu", "exp", "rsqrt", "gelu"] + sorted(EXPECTED)


@pytest.mark.parametrize("group", KINDS)
def test_inspect_every_neuron_kind(group):
    snn, _ = compile_full(build(group, 6)[0], 64)
    rep = inspect_neurons(snn, samples=256)
    assert len(rep["neurons"]) == 1 and rep["ok"]
    r = rep["neurons"][0]
    assert r["checked"] >= 64 and r["mismatch"] == 0 and r["max_code_error"] <= 1


@pytest.mark.parametrize("span,ok", [(12, True), (30, False)])
def test_wide_range_log_sum_exp_kernels(span, ok):
    """8-bit scores over [-span, span]. The log kernel needs theta - S[k] = exp(-(b - k*step)) resolved
    next to theta: up to ~36 e-folds of output range in float64 (scaled by exp(b'), it holds at
    span 12); a 49 e-fold range (span 30) is beyond any float64 Eq. 7 neuron and inspect says so."""
    from test_full_passes import Builder, _act, _mask, _out_stage
    b = Builder(8, seed=3)
    s = _act(b, "s", (2, 2, 5, 6), -span, span)
    v = b.op("ReduceLogSumExp", [b.op("Add", [s, _mask(b)], "m"), b.const("ax", np.array([-1], np.int64))],
             "lse", keepdims=1)
    snn, _ = compile_full(b.model([_out_stage(b, v)]), 256)
    rep = inspect_neurons(snn, samples=2048)
    assert rep["neurons"][0]["kind"] == "lse" and rep["total"]["checked"] == 2048
    assert rep["ok"] is ok


def _replace_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set a kernel attribute, in float32 and in its float64 copy (the one the spec reads)."""
    keep = [a for a in node.attribute if a.name not in (name, f"{name}_f64")]
    del node.attribute[:]
    f64 = [int(v) for v in np.asarray(value, dtype=np.float64).reshape(-1).view(np.int64)]
    node.attribute.extend(keep + [h.make_attribute(name, value), h.make_attribute(f"{name}_f64", f64)])


def test_wrong_kernels_are_caught():
    """A SiLU neuron given the identity's step kernel no longer realises its table."""
    snn, n, spec = one_neuron(build("silu", 6)[0], 64)
    _replace_attr(n, "eta", [spec.steps_in[0]] * (spec.windows_in[0] - 1))
    rep = inspect_neurons(snn)
    assert not rep["ok"] and rep["total"]["mismatch"] > 0


def test_wrong_output_kernel_is_caught():
    """An LSE neuron with a uniform psi (h = identity instead of log) emits other codes."""
    snn, n, spec = one_neuron(build("lse", 6)[0], 64)
    st = UniformStage(spec.emit.step, spec.emit.N - spec.emit.t_ref, spec.emit.T)
    _replace_attr(n, "psi", [float(v) for v in st.psi()])
    _replace_attr(n, "theta", float(st.theta))
    assert inspect_neurons(snn)["total"]["mismatch"] > 0


def test_theorem1_matches_the_step_simulator():
    """The closed form equals Eq. 7 stepped slot by slot, for a nonlinear eta and a log psi."""
    rng = np.random.default_rng(0)
    T_in, T = 16, 16
    inp = UniformStage(0.25, 8, T_in)
    eta = theorem2_eta(np.exp, float(inp.a), float(inp.step), T_in - 1)
    out = UniformStage(0.3, 0, T)
    psi, theta = output_kernels(np.exp, float(out.b), float(out.step), T - 1)
    t_in = rng.integers(0, T_in, (50, 6))
    w = np.ones((6, 1))
    C = np.array([np.exp(float(inp.a)) * 6 / (T_in - 1)])
    trace = sim.stage(t_in, w, eta, C, T_in - 1, psi, theta, T - 1, out.t_ref)
    codes = realised_function([t_in], [eta], [np.exp(float(inp.a))], [1.0], [T_in - 1], psi, theta, T - 1,
                              out.t_ref, reduce=True)
    np.testing.assert_array_equal(codes, T - 1 - trace.times[:, 0])
    # and it is log-sum-exp rounded to the output grid (away from rounding boundaries)
    x = (inp.t_ref - t_in) * np.float64(inp.step)
    v = np.log(np.exp(x).sum(-1)) / np.float64(out.step)
    clear = np.abs(v - np.floor(v) - 0.5) > 1e-6
    want = np.clip(np.rint(v), 0, T - 1)
    np.testing.assert_array_equal(codes[clear], want[clear])


def test_theorem1_uniform_is_corollary1():
    """With the step kernel and Corollary 1's psi/theta, the realised function is the quantizer."""
    st = UniformStage(0.1, 20, 64)
    t = np.arange(64)
    F = receive_table(st.eta(), float(st.a), 63)
    codes = 63 - theorem1_times(F[t] * 0.7, st.psi(), st.theta, 63, st.t_ref)
    np.testing.assert_array_equal(codes, np.clip(np.rint(F[t] * 0.7 / 0.1) + 20, 0, 63))


def _inspect_cli(snn: onnx.ModelProto, path) -> int:
    """``snn`` saved to ``path``, then ``ttfsc inspect path --neurons``: its exit status."""
    onnx.save(snn, path)
    return main(["inspect", str(path), "--neurons"])


def test_inspect_cli(tmp_path, capsys):
    snn, n, _ = one_neuron(build("silu", 6)[0], 64)
    p = tmp_path / "silu.snn.onnx"
    assert _inspect_cli(snn, p) == 0
    assert "inspect: OK" in capsys.readouterr().out
    _replace_attr(n, "eta", [0.0] * 63)
    assert _inspect_cli(snn, p) == 1


def test_inspect_cli_without_neurons(tmp_path, capsys):
    from graphs import quantized_linear_model
    m, _ = quantized_linear_model()
    snn, _ = compile_full(m, 64)
    assert _inspect_cli(snn, tmp_path / "hybrid.snn.onnx") == 2
    assert "no TTFSNeuron" in capsys.readouterr().err


@pytest.mark.parametrize("group", ["silu", "rsqrt", "gelu"])
def test_compiled_neuron_kernels_step_through_eq7(group):
    """The compiled neuron's own eta, C, psi, theta stepped by the Eq. 7 simulator give its table."""
    _, _, spec = one_neuron(build(group, 6)[0], 64)
    N_in, e = spec.windows_in[0] - 1, spec.emit
    t_in = np.arange(N_in + 1)[:, None]
    C = np.array([spec.c_offset[0] / N_in])  # Eq. 7 adds C once per receive step
    trace = sim.stage(t_in, np.ones((1, 1)), np.asarray(spec.eta[0]), C, N_in, np.asarray(e.psi), e.theta, e.N,
                      e.t_ref, tie_rule=e.tie_rule)
    stepped = e.N - trace.times[:, 0]
    table = e.N - np.asarray(spec.table)
    differ = stepped != table
    assert differ.sum() <= 1 and np.abs(stepped - table).max() <= 1  # at most a float64/float32 boundary code
