"""``ttfsc report``: op/energy counts on a hand-built two-stage graph, the float reference, the command."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP, helper as h, numpy_helper as nh

from graphs import quantized_linear_model, ttfs_model
from ttfsc.cli import main
from ttfsc.analysis.energy import (Counts, EnergyConstants, float_op_macs, qann_energy, snn_energy)
from ttfsc.analysis.report import count_network, find_stages, float_reference
from ttfsc.dialect import EmitSpec
from ttfsc.graph import with_outputs
from ttfsc.runtime.session import default_options, open_session, session_from_model
from ttfsc.ttfs import UniformStage

M, I, H, O, T = 5, 12, 10, 7, 16
N = T - 1


def _two_stage(seed: int = 0) -> tuple[onnx.ModelProto, dict]:
    """x -> emit1 -> receive(W1) -> emit2 -> receive(W2) -> y, every stage at T = 16."""
    rng = np.random.default_rng(seed)
    s1, s2 = UniformStage(0.1, 4, T), UniformStage(0.05, 6, T)
    e1, e2 = EmitSpec.from_stage(s1), EmitSpec.from_stage(s2)
    W1 = rng.integers(-127, 128, (I, H)).astype(np.int8)
    W2 = rng.integers(-127, 128, (H, O)).astype(np.int8)
    sw1 = np.full(H, 0.002, np.float32)
    sw2 = np.full(O, 0.003, np.float32)
    nodes = [e1.make_node("x", "t1", "emit1"), e1.receive_spec().make_node(["t1", "W1", "sw1"], "v2", "recv1"),
             e2.make_node("v2", "t2", "emit2"), e2.receive_spec().make_node(["t2", "W2", "sw2"], "y", "recv2")]
    inits = [nh.from_array(W1, "W1"), nh.from_array(sw1, "sw1"), nh.from_array(W2, "W2"), nh.from_array(sw2, "sw2")]
    model = ttfs_model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, [M, I])],
                       [h.make_tensor_value_info("y", TP.FLOAT, [M, O])], inits, "two")
    codes = rng.integers(0, T, (M, I))
    codes[0, :4] = 0                                  # a few certainly silent neurons
    x = ((codes - s1.zero_point) * np.float64(s1.step)).astype(np.float32)  # exactly on the grid: t = N - code
    return model, {"x": x, "codes": codes}


def test_counts_on_two_stage_graph():
    model, d = _two_stage()
    probes = ["t1", "v2", "t2"]
    out = dict(zip(probes, open_session(with_outputs(model, probes)).run(probes, {"x": d["x"]})))
    np.testing.assert_array_equal(out["t1"], N - d["codes"])      # known spike times from known codes
    stages = find_stages(model, None, "two.onnx")
    assert [s.name for s in stages] == ["emit1", "emit2"]
    snn, qann = count_network(model, stages, out)
    spikes1 = int(np.count_nonzero(d["codes"] > 0))               # code 0 = t = N = silent
    spikes2 = int(np.count_nonzero(out["t2"] < N))
    assert snn.spikes == spikes1 + spikes2
    assert snn.silent == (M * I - spikes1) + (M * H - spikes2)
    assert snn.ac_synaptic == spikes1 * H + spikes2 * O           # spikes x fan-out
    # per-step updates: emitters over their N slots, receivers over the N steps of their input window
    assert snn.ac_neuron == M * I * N + M * H * N + M * H * N + M * O * N
    assert snn.move_bits == (spikes1 + spikes2) * math.log2(T)
    assert qann.mac_dense == M * I * H + M * H * O
    assert qann.move_bits == (M * I + M * H) * math.log2(T)
    e = EnergyConstants(e_ac=1.0, e_mac=10.0, e_bit=0.5, e_static=0.25)
    se = snn_energy(snn, e)
    assert sum(se.values()) == pytest.approx(snn.ac_synaptic + snn.ac_neuron + 0.5 * snn.move_bits + 0.25 * snn.neuron_steps)
    assert sum(qann_energy(qann, e).values()) == pytest.approx(10 * qann.mac_dense + 0.5 * qann.move_bits)


def test_float_op_macs_from_shapes():
    assert float_op_macs("MatMul", [(2, 3, 4)], (2, 3, 5)) == 2 * 3 * 5 * 4
    assert float_op_macs("Softmax", [(2, 6)], (2, 6)) == 3 * 12
    assert float_op_macs("ReduceMean", [(4, 8)], (4, 1)) == 32
    assert float_op_macs("Mul", [(4, 8)], (4, 8)) == 32
    assert float_op_macs("Reshape", [(4, 8)], (32,)) == 0
    c = Counts(spikes=4.0, mac_float_by_kind={"a": 2.0}).scaled(0.5)
    assert c.spikes == 2.0 and c.mac_float_by_kind == {"a": 1.0}


def test_float_reference_removes_exactly_the_activation_pairs():
    qann, d = quantized_linear_model(seed=3, bits=4, I=16, O=8, M=6)
    ref, pairs = float_reference(qann)
    assert pairs == 1
    kinds = [n.op_type for n in ref.graph.node]
    assert "QuantizeLinear" not in kinds and "Clip" not in kinds
    assert kinds.count("DequantizeLinear") == 2                       # the two weight dequantizers stay
    x = d["x"] * 1.5                                                   # some values beyond the clip range
    so = default_options()
    so.add_session_config_entry("session.disable_quant_qdq", "1")  # as the report runs it: no dynamic quantization
    got = session_from_model(ref, so).run(None, {"x": x})
    q = session_from_model(qann).run(None, {"x": x})
    init = {t.name: nh.to_array(t) for t in qann.graph.initializer}
    for k in range(2):
        Wf = init[f"W{k}"].astype(np.float64) * init[f"sw{k}"].astype(np.float64)
        np.testing.assert_allclose(got[k], x.astype(np.float64) @ Wf, rtol=1e-5, atol=1e-5)
        assert np.abs(got[k] - q[k]).max() > 1e-3                      # the QANN differs: it quantizes x


@pytest.fixture(scope="module")
def tiny_snn(tiny_llama_onnx: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    qdq = folder / "model.qdq.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "--abits", "4", "--method", "minmax", "--prefix", "none",
                 "--rotate", "none", "--calib-samples", "2", "--calib-seqlen", "16", "-o", str(qdq)]) == 0
    snn = folder / "model.snn.onnx"
    assert main(["compile", str(qdq), "-T", "16", "-o", str(snn)]) == 0
    return snn


@pytest.fixture()
def text(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. Spikes arrive early for large values. " * 2)
    return p


def test_report_on_tiny_model(tiny_snn: Path, text: Path, tmp_path: Path):
    out = tmp_path / "rep"
    assert main(["report", str(tiny_snn), "--text", str(text), "--out", str(out), "--tokens", "40"]) == 0
    r = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert "ttfsc report" in md and r["command"] in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["energy.png", "error.png", "latency.png", "raster.png", "spikes.png"]
    assert all(0 < (out / p).stat().st_size < 200_000 for p in pngs)
    assert r["tokens"] == 40 and r["stages"] == 9
    assert r["latency"]["steps_per_token"] == 9 * 16 == r["latency"]["sum_of_stage_steps"]
    assert r["latency"]["pipelined_steps_per_token"] == 16
    assert 0 < r["spikes"]["per_neuron"] <= 1 and 0 < r["spikes"]["silent_fraction"] < 1
    ops = r["ops_per_token"]
    assert ops["snn"]["mac_dense"] == 0 and ops["qann"]["mac_dense"] > 0
    assert ops["snn"]["mac_float"] == ops["qann"]["mac_float"] > 0
    assert r["float_reference_pairs_removed"] == 9
    t = r["trace"]
    assert t["sim_matches_runtime_spikes"] == t["neurons"]            # the simulator reproduces the runtime
    assert t["receive_max_abs_diff"] <= 1e-4 * max(t["receive_scale"], 1.0)
    for s in r["error"]["stages"]:
        # inside [a, b] a stage's own rounding is at most half a step (the grid term)
        assert s["err_own_mean"] <= s["grid_max"] + s["clip_mean"] + s["err_input_mean"] + 1e-6
        assert s["err_mean"] > 0 and s["grid_max"] == pytest.approx(s["step"] / 2)
    assert not list(tmp_path.glob(".rep.*"))                             # no temporary left behind


def test_report_errors(tiny_snn: Path, text: Path, tmp_path: Path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(tiny_snn), "--text", str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
    assert "missing.txt" in capsys.readouterr().err
    qdq = tiny_snn.with_name("model.qdq.onnx")
    assert main(["report", str(qdq), "--text", str(text), "--out", str(out), "--qann", str(qdq)]) == 2
    assert "not a spiking model" in capsys.readouterr().err
    lonely = tmp_path / "lonely" / "x.snn.onnx"
    lonely.parent.mkdir()
    lonely.write_bytes(tiny_snn.read_bytes())
    data = tiny_snn.with_name(tiny_snn.name + ".data")  # the model with its weights, but no QANN beside it
    if data.exists():
        (lonely.parent / data.name).write_bytes(data.read_bytes())
    assert main(["report", str(lonely), "--text", str(text), "--out", str(out)]) == 2
    assert "--qann" in capsys.readouterr().err
    assert not out.exists()


def test_report_on_rate_model(tiny_snn: Path, text: Path, tmp_path: Path):
    qdq = tiny_snn.with_name("model.qdq.onnx")
    rate = tmp_path / "rate.snn.onnx"
    assert main(["compile", str(qdq), "-T", "16", "--coding", "rate", "-o", str(rate)]) == 0
    out = tmp_path / "rep"
    assert main(["report", str(rate), "--text", str(text), "--qann", str(qdq), "--out", str(out), "--tokens", "12"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["coding"] == "rate" and r["latency"]["steps_per_token"] == 9 * 15
    assert 1 < r["spikes"]["per_neuron"] <= 15                           # a code q costs q spikes
    assert r["ops_per_token"]["snn"]["move_bits"] == r["spikes"]["per_token"]  # 1-bit events
    t = r["trace"]
    assert t["sim_matches_runtime_spikes"] == t["neurons"]
    assert t["receive_max_abs_diff"] <= 1e-4 * max(t["receive_scale"], 1.0)
