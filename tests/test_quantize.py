"""Static PTQ to QDQ (the ttfsc.quantizer package), checked numerically against onnxruntime.

The hand-built graph is a one-head attention block: two linears share their input (q/k style),
a -inf causal mask is added to the scores, and two more linears follow (one reads the masked
scores, whose range is not finite, so its activation must stay float).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import ort_session
from ttfsc import modelio
from ttfsc.cli import main
from ttfsc.errors import TtfscError
from ttfsc.graph import with_outputs
from ttfsc.quantizer.config import QuantConfig
from ttfsc.quantizer.quantize import quantize_model
from ttfsc.quantizer.ranges import activation_params
from ttfsc.runtime.session import exact_options, session_from_model

B, S, D, H, O = 2, 5, 8, 6, 4


def _attention_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = {n: rng.standard_normal(shape).astype(np.float32) * 0.5
         for n, shape in (("W1", (D, H)), ("W2", (D, H)), ("W3", (H, O)), ("W4", (S, 3)))}
    mask = np.triu(np.full((S, S), -np.inf, dtype=np.float32), k=1)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="q_proj"),
        helper.make_node("MatMul", ["x", "W2"], ["b"], name="k_proj"),
        helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["a", "bt"], ["s"], name="scores"),
        helper.make_node("Add", ["s", "mask"], ["sm"], name="mask_add"),
        helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "b"], ["o"], name="pv"),
        helper.make_node("MatMul", ["o", "W3"], ["y"], name="o_proj"),
        helper.make_node("MatMul", ["sm", "W4"], ["z"], name="masked_linear"),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()] + [numpy_helper.from_array(mask, "mask")]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, O]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [B, S, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _feeds(n: int, seed: int = 1, outliers: bool = False) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((B, S, D)).astype(np.float32)
        if outliers and not out:
            x.reshape(-1)[[3, 17]] = (40.0, -40.0)  # 2 of 480 values over all batches
        out.append({"x": x})
    return out


def _save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def _quantize(tmp_path: Path, name: str = "q.onnx", external: bool = False, **kw) -> tuple[Path, dict]:
    src = _save(_attention_model(), tmp_path / ("src_ext.onnx" if external else "src.onnx"), external)
    out = tmp_path / name
    kw.setdefault("calib", _feeds(4))
    summary = quantize_model(src, out, QuantConfig(**kw), log=lambda *_: None)
    return out, summary


def _quantized(tmp_path: Path, **kw) -> tuple[Path, onnx.ModelProto, dict]:
    """``_quantize``, then the QDQ model loaded: (path, model, summary)."""
    out, summary = _quantize(tmp_path, **kw)
    return out, onnx.load(str(out)), summary


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def _act_chain(model: onnx.ModelProto, dq_out: str):
    """(clip, q, dq) nodes feeding tensor ``dq_out``."""
    dq = _producer(model, dq_out)
    q = _producer(model, dq.input[0])
    clip = _producer(model, q.input[0])
    return clip, q, dq


def _fake_quant(x: np.ndarray, lo, hi, scale, z, N) -> np.ndarray:
    """Numpy reference of Clip -> QuantizeLinear -> DequantizeLinear (round half to even)."""
    c = np.clip(x, lo, hi).astype(np.float32)
    q = np.clip(np.rint(c / np.float32(scale)) + z, 0, N)
    return ((q - z).astype(np.float32) * np.float32(scale)).astype(np.float32)


def _linear_inputs(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    return {n.name: (n.input[0], n.input[1]) for n in model.graph.node if n.op_type == "MatMul"}


def _dequantized_weight(model: onnx.ModelProto, dq_out: str) -> tuple[np.ndarray, np.ndarray, onnx.NodeProto]:
    inits = _inits(model)
    dq = _producer(model, dq_out)
    codes, scale = inits[dq.input[0]], inits[dq.input[1]]
    return codes, (codes.astype(np.float32) * scale).astype(np.float32), dq


# ---------------------------------------------------------------- structure

def test_weights_become_int8_per_channel(tmp_path):
    out, model, summary = _quantized(tmp_path, abits=6)
    inits = _inits(model)
    lin = _linear_inputs(model)
    assert summary["weights"] == 4
    assert not {"W1", "W2", "W3", "W4"} & set(inits), "float weights must be removed"
    src = _inits(_attention_model())
    for node, w in (("q_proj", "W1"), ("k_proj", "W2"), ("o_proj", "W3"), ("masked_linear", "W4")):
        codes, deq, dq = _dequantized_weight(model, lin[node][1])
        assert dq.op_type == "DequantizeLinear" and dq.domain == ""
        assert helper.get_attribute_value(dq.attribute[0]) == 1 and dq.attribute[0].name == "axis"
        assert codes.dtype == np.int8 and codes.shape == src[w].shape
        assert np.abs(codes).max() == 127 and codes.min() >= -127
        assert not inits[dq.input[2]].any() and inits[dq.input[2]].dtype == np.int8
        assert inits[dq.input[1]].shape == (src[w].shape[1],)
        np.testing.assert_allclose(deq, src[w], atol=np.abs(src[w]).max() / 127)


def test_shared_input_gets_one_chain_and_mask_add_stays_float(tmp_path):
    out, model, summary = _quantized(tmp_path, abits=6)
    lin = _linear_inputs(model)
    assert lin["q_proj"][0] == lin["k_proj"][0], "q/k share one Clip->Q->DQ"
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 2  # x and o; sm skipped
    assert sum(n.op_type == "Clip" for n in model.graph.node) == 2
    clip, q, dq = _act_chain(model, lin["q_proj"][0])
    assert clip.input[0] == "x" and (clip.op_type, q.op_type, dq.op_type) == ("Clip", "QuantizeLinear", "DequantizeLinear")
    add = next(n for n in model.graph.node if n.name == "mask_add")
    assert list(add.input) == ["s", "mask"]
    assert lin["scores"] == ("a", "bt") and lin["pv"] == ("p", "b")
    assert lin["masked_linear"][0] == "sm", "non-finite activation must stay float"
    assert summary["skipped"] == ["sm"] and summary["activations"] == 2
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["ttfsc.abits"] == "6" and meta["ttfsc.wbits"] == "8" and meta["ttfsc.method"] == "search"  # the default
    assert "4 batches" in meta["ttfsc.calibration"]
    onnx.checker.check_model(model)


def test_activation_params_use_clip_bounds():
    # worked by hand: [-1.5, 3.0] on 6 bits: N = 63, scale = 4.5 / 63 = 1/14, z = 1.5 * 14 = 21,
    # Clip bounds (0 - 21) / 14 = -1.5 and (63 - 21) / 14 = 3.0
    p = activation_params(-1.5, 3.0, 6)
    assert p.N == 63 and p.scale == np.float32(1 / 14) and p.zero_point == 21
    assert np.isclose(p.lo, -1.5, rtol=1e-6, atol=0) and np.isclose(p.hi, 3.0, rtol=1e-6, atol=0)
    # onnxruntime's own Clip -> QuantizeLinear -> DequantizeLinear with these parameters: the Clip
    # bounds are exactly the values of codes 0 and N (clipping adds no rounding of its own), 0.0
    # is exact, and out-of-range inputs land on the end codes
    x = np.array([-100.0, p.lo, -0.75, 0.0, 1.0, p.hi, 100.0], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
         helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [7]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [7])],
        [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", p.lo), ("hi", p.hi), ("s", p.scale))]
        + [numpy_helper.from_array(np.array(p.zero_point, np.uint8), "z")])
    q, y = ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]),
                       optimize=False).run(None, {"x": x})
    assert q.tolist() == [0, 0, 11, 21, 35, 63, 63]  # -0.75 * 14 = -10.5 rounds half to even: 21 - 10
    assert y[0] == p.lo and y[-1] == p.hi and y[3] == 0.0
    assert activation_params(0.5, 2.0, 4).zero_point == 0  # 0 is always inside the range
    assert activation_params(-2.0, -0.5, 4).zero_point == 15


# ---------------------------------------------------------------- numerics

def test_qdq_matches_numpy_fake_quant_exactly(tmp_path):
    abits = 6
    N = (1 << abits) - 1
    out, model, _ = _quantized(tmp_path, abits=abits)
    lin = _linear_inputs(model)
    x_dq, o_dq = lin["q_proj"][0], lin["o_proj"][0]
    chains = {name: _act_chain(model, name) for name in (x_dq, o_dq)}
    inits = _inits(model)
    q_outs = [c[1].output[0] for c in chains.values()]
    sess = ort_session(out, [x_dq, o_dq, "o", "a", "b", *q_outs], optimize=False)
    x = _feeds(1, seed=7)[0]["x"]
    x.reshape(-1)[:2] = (100.0, -100.0)  # outside the calibrated range: clipped to codes N and 0
    res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    ref_in = {x_dq: x, o_dq: res["o"]}
    for name, (clip, q, _) in chains.items():
        lo, hi, scale, z = (inits[clip.input[1]], inits[clip.input[2]], inits[q.input[1]], int(inits[q.input[2]]))
        assert inits[q.input[2]].dtype == np.uint8
        np.testing.assert_array_equal(res[name], _fake_quant(ref_in[name], lo, hi, scale, z, N))
        # the codes themselves: the Clip bounds keep round(c / scale) + z inside [0, N] with no
        # saturation left to QuantizeLinear (a bound off the grid would give N + 1 or -1 here)
        codes = np.rint(np.clip(ref_in[name], lo, hi) / np.float32(scale)) + z
        np.testing.assert_array_equal(res[q.output[0]], codes)
        assert codes.min() == 0 and codes.max() <= N
    assert res[q_outs[0]].max() == N and res[q_outs[0]].min() == 0, "clipped values reach the end codes"
    for node, x_name, out_name in (("q_proj", x_dq, "a"), ("k_proj", x_dq, "b"), ("o_proj", o_dq, "y")):
        _, w, _ = _dequantized_weight(model, lin[node][1])
        np.testing.assert_array_equal(res[out_name], res[x_name] @ w)


@pytest.mark.parametrize("abits", [4, 6, 8, 10])
def test_abits_run_in_onnxruntime(tmp_path, abits):
    N = (1 << abits) - 1
    out, model, summary = _quantized(tmp_path, abits=abits)
    inits = _inits(model)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for q in qs:
        assert q.domain == ("com.microsoft" if abits > 8 else "")
        assert inits[q.input[2]].dtype == (np.uint16 if abits > 8 else np.uint8)
    x = _feeds(1, seed=3)[0]
    extra = [q.output[0] for q in qs]
    # unoptimised against optimised as every ttfsc session opens a QDQ model (exact_options: no
    # saturating integer fusion above 128 levels): the same codes
    probed = with_outputs(model, extra)
    runs = [ort_session(probed, optimize=False).run(None, x)[2:],
            session_from_model(probed, exact_options(probed)).run(None, x)[2:]]
    for plain, optimized in zip(*runs):
        assert plain.dtype == (np.uint16 if abits > 8 else np.uint8)
        assert plain.max() <= N, "a Clip narrower than the code type keeps codes inside the n-bit range"
        np.testing.assert_array_equal(plain, optimized)
    assert np.all(np.isfinite(ort_session(out).run(["y"], x)[0]))
    # Numerics without ORT's integer fusion: its u8s8 kernels can saturate on AVX2 CPUs at
    # abits=8/wbits=8 (see the module docstring); unfused, fully optimised ORT equals the QDQ math.
    got = ort_session(out, fuse_qdq=False).run(["y"], x)[0]
    np.testing.assert_array_equal(got, ort_session(out, optimize=False).run(["y"], x)[0])
    ref = ort_session(_attention_model(), optimize=False).run(["y"], x)[0]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < {4: 0.5, 6: 0.12, 8: 0.04, 10: 0.04}[abits], err


def test_close_to_float_w8a8(tmp_path):
    out, _ = _quantize(tmp_path, abits=8, calib=_feeds(8))
    x = _feeds(3, seed=11)
    ref = ort_session(_attention_model(), optimize=False)
    got = ort_session(out, optimize=False)
    for f in x:
        r, g = ref.run(["y"], f)[0], got.run(["y"], f)[0]
        assert np.abs(g - r).max() < 0.03 * np.abs(r).max()


def test_wbits4_codes_within_7(tmp_path):
    out, model, summary = _quantized(tmp_path, wbits=4, abits=8)
    lin = _linear_inputs(model)
    for node in ("q_proj", "k_proj", "o_proj", "masked_linear"):
        codes, _, _ = _dequantized_weight(model, lin[node][1])
        assert codes.dtype == np.int8 and np.abs(codes).max() == 7
    assert {p.key: p.value for p in model.metadata_props}["ttfsc.wbits"] == "4"
    y = ort_session(out, optimize=False).run(["y"], _feeds(1, seed=5)[0])[0]
    assert np.all(np.isfinite(y))


def test_percentile_is_narrower_than_minmax_on_outliers(tmp_path):
    calib = _feeds(6, outliers=True)
    _, mm = _quantize(tmp_path, name="mm.onnx", calib=calib, method="minmax")
    _, pc = _quantize(tmp_path, name="pc.onnx", calib=calib, method="percentile", percentile=99.0)
    r_mm, r_pc = mm["ranges"]["x"], pc["ranges"]["x"]
    assert (r_mm["min"], r_mm["max"]) == (-40.0, 40.0)
    assert 1.0 < r_pc["max"] < 5.0 and -5.0 < r_pc["min"] < -1.0
    assert r_pc["scale"] < r_mm["scale"]
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "pc.onnx")).metadata_props}
    assert meta["ttfsc.method"] == "percentile 99.0"
    # deterministic subsampling: the same data gives the same ranges
    _, pc2 = _quantize(tmp_path, name="pc2.onnx", calib=calib, method="percentile", percentile=99.0)
    assert pc2["ranges"] == pc["ranges"]


def test_search_never_worse_than_minmax_and_clips_outliers(tmp_path):
    _, mm = _quantize(tmp_path, name="mm.onnx", calib=_feeds(6, outliers=True), method="minmax")
    _, sr = _quantize(tmp_path, name="sr.onnx", calib=_feeds(6, outliers=True), method="search")
    assert set(sr["search"]) == set(sr["ranges"]) == {"x", "o"}  # the masked (non-finite) input stays float
    for r in sr["search"].values():
        assert r["mse"] <= r["mse_minmax"]
    x = sr["search"]["x"]
    assert min(x["ratio_lo"], x["ratio_hi"]) < 1.0 and x["mse"] < x["mse_minmax"]
    assert sr["ranges"]["x"]["scale"] < mm["ranges"]["x"]["scale"]
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "sr.onnx")).metadata_props}
    assert meta["ttfsc.method"] == "search"


def test_search_range_scores_the_following_layer():
    from ttfsc.quantizer.ranges import SEARCH_RATIOS, output_mse, search_range
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    x[3, 5] = 60.0  # one outlier stretches the minmax range 15-fold
    w = rng.standard_normal((16, 8)).astype(np.float32)
    r = search_range(x, w, float(x.min()), float(x.max()), abits=4)
    assert r["ratio_hi"] < 1.0 and r["mse"] < r["mse_minmax"]
    assert r["mse"] == pytest.approx(output_mse(x, w, r["lo"], r["hi"], 4))
    assert r["mse_minmax"] == pytest.approx(output_mse(x, w, float(x.min()), float(x.max()), 4))
    assert r["ratio_hi"] in SEARCH_RATIOS and r["ratio_lo"] in SEARCH_RATIOS


def test_external_data_model_quantizes_like_inline(tmp_path):
    ext_dir, inl_dir = tmp_path / "ext", tmp_path / "inl"
    ext_dir.mkdir(), inl_dir.mkdir()
    out_ext, s_ext = _quantize(ext_dir, external=True)
    out_inl, s_inl = _quantize(inl_dir)
    assert s_ext["ranges"] == s_inl["ranges"]
    assert (ext_dir / "q.onnx.data").exists()
    assert not [p for p in os.listdir(ext_dir) if p.startswith(".")], "no temporaries left behind"
    assert not [p for p in os.listdir(inl_dir) if p.startswith(".")]
    x = _feeds(1, seed=9)[0]
    y_ext = ort_session(out_ext, optimize=False).run(["y"], x)[0]
    y_inl = ort_session(out_inl, optimize=False).run(["y"], x)[0]
    np.testing.assert_array_equal(y_ext, y_inl)
    # the quantized weights live in the output's data file, read back through modelio
    m = modelio.load_model(out_ext)
    inits = modelio.Initializers(m)
    codes = [inits.value(t.name) for t in m.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(codes) == 4 and all(np.abs(c).max() == 127 for c in codes)


# ---------------------------------------------------------------- errors

def _cli_error(capsys, argv, out: Path) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ttfsc: error: ")
    assert not out.exists()
    assert not [p for p in os.listdir(out.parent) if p.startswith(".")]
    return err


def test_cli_missing_file(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    err = _cli_error(capsys, ["quantize", str(tmp_path / "missing.onnx"), "-o", str(out)], out)
    assert "missing.onnx" in err and "no such file" in err


def test_cli_not_onnx(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not a model\n" * 10)
    out = tmp_path / "x.onnx"
    err = _cli_error(capsys, ["quantize", str(bad), "-o", str(out)], out)
    assert "bad.onnx" in err and "not a valid ONNX model" in err


def test_cli_bad_abits(tmp_path, capsys):
    src = _save(_attention_model(), tmp_path / "m.onnx")
    out = tmp_path / "x.onnx"
    err = _cli_error(capsys, ["quantize", str(src), "-o", str(out), "--abits", "13"], out)
    assert "--abits 13" in err


def test_no_quantizable_matmul(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    src = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "relu.onnx")
    with pytest.raises(TtfscError, match="relu.onnx: no MatMul"):
        quantize_model(src, tmp_path / "x.onnx", QuantConfig(calib=[{"x": np.ones(2, np.float32)}]), log=lambda *_: None)
    assert not (tmp_path / "x.onnx").exists()


def test_bad_wbits_api(tmp_path):
    with pytest.raises(TtfscError, match="--wbits 6"):
        quantize_model(tmp_path / "m.onnx", tmp_path / "x.onnx", QuantConfig(wbits=6))


# ---------------------------------------------------------------- end to end on a tiny LLaMA export

def _decoder_run(path: Path, ids: np.ndarray, fuse_qdq: bool = True) -> np.ndarray:
    """Logits of one whole sequence with an empty KV cache (what calibration feeds)."""
    from ttfsc.quantizer.calibration import decoder
    sess = ort_session(path, fuse_qdq=fuse_qdq)
    return sess.run(["logits"], decoder(sess, str(path)).feeds(ids))[0][0]


def test_tiny_llama_w8a6_self_generated(tiny_llama_onnx, tmp_path):
    out = tmp_path / "qdq" / "model.onnx"
    lines: list[str] = []
    config = QuantConfig(wbits=8, abits=6, method="search", calib_samples=2, calib_seqlen=24)
    summary = quantize_model(tiny_llama_onnx, out, config, log=lines.append)
    assert summary["weights"] == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    assert summary["activations"] == 2 * 4 + 1 and not summary["skipped"]
    assert summary["calibration"].startswith("self-generated: 2 x 24 tokens from BOS 1")
    assert any(line.startswith("quantized 15 weights to int8") for line in lines)
    assert summary["search"] and all(r["mse"] <= r["mse_minmax"] for r in summary["search"].values())
    assert (out.parent / "tokenizer.json").exists() and (out.parent / "config.json").exists()
    model = onnx.load(str(out), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert (meta["ttfsc.abits"], meta["ttfsc.wbits"], meta["ttfsc.method"]) == ("6", "8", "search")
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 9 and ops.count("Clip") >= 9
    assert not any(n.op_type == "Add" and n.input[0].endswith("_dequantized") for n in model.graph.node)
    ids = np.array([1, 40, 71, 72, 3, 80, 69, 76, 76, 79, 14, 3, 55, 79, 82], dtype=np.int64)
    ref = _decoder_run(tiny_llama_onnx, ids)
    for fuse in (True, False):
        got = _decoder_run(out, ids, fuse_qdq=fuse)
        assert np.all(np.isfinite(got))
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
        assert rel < 0.15 and corr > 0.99, (rel, corr)  # measured: 0.048, 0.9987


def test_tiny_llama_text_calibration_cli(tiny_llama_onnx, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a tiny model that liked to count spikes. " * 8)
    out = tmp_path / "q10.onnx"
    argv = ["quantize", str(tiny_llama_onnx), "-o", str(out), "--abits", "10", "--method", "percentile",
            "--calib", str(text), "--calib-samples", "3", "--calib-seqlen", "32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "text calib.txt: 3 x 32 tokens" in printed and "to 10 bits (percentile)" in printed
    model = onnx.load(str(out), load_external_data=False)
    assert any(o.domain == "com.microsoft" for o in model.opset_import)
    ids = np.arange(1, 20, dtype=np.int64)
    assert np.all(np.isfinite(_decoder_run(out, ids)))


@pytest.mark.parametrize("rotate,smooth", [("hadamard", 0.0), ("none", 0.5), ("hadamard", 0.5)])
def test_rotate_and_smooth_before_quantizing(tiny_llama_onnx, tmp_path, rotate, smooth):
    """The flags transform the float model first: metadata records it, the QANN runs and stays close to
    the original float model, and the temporary transformed copy is gone."""
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a tiny model that liked to count spikes. " * 8)
    out = tmp_path / "q" / "model.onnx"
    config = QuantConfig(abits=8, calib=str(text), calib_samples=2, calib_seqlen=24, rotate=rotate, smooth=smooth)
    summary = quantize_model(tiny_llama_onnx, out, config, log=lambda s: None)
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["ttfsc.rotation"] == ("none" if rotate == "none" else f"{rotate} seed=0") == summary["rotation"]
    assert meta["ttfsc.smoothing"].startswith("alpha=0.5 tensors=7" if smooth else "none")
    assert not list(out.parent.glob(".ttfsc-*"))
    ids = np.array([1, 40, 71, 72, 3, 80, 69, 76, 76, 79, 14, 3, 55, 79, 82], dtype=np.int64)
    ref, got = _decoder_run(tiny_llama_onnx, ids), _decoder_run(out, ids, fuse_qdq=False)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99


def test_rotate_and_smooth_options_are_checked(tiny_llama_onnx, tmp_path):
    with pytest.raises(TtfscError, match="--rotate"):
        quantize_model(tiny_llama_onnx, tmp_path / "x.onnx", QuantConfig(rotate="givens"))
    with pytest.raises(TtfscError, match="--smooth"):
        quantize_model(tiny_llama_onnx, tmp_path / "x.onnx", QuantConfig(smooth=1.5))


def test_default_smoothing_strength_depends_on_width():
    from ttfsc.quantizer.config import DEFAULT_SMOOTH, LOW_BIT_SMOOTH, default_smooth
    assert default_smooth(4) == LOW_BIT_SMOOTH > DEFAULT_SMOOTH == default_smooth(6) == default_smooth(8)


# ---------------------------------------------------------------- one option list

def test_cli_options_come_from_quant_config():
    """quantize's and compile's options are QuantConfig's fields: every flag round-trips to the same config."""
    import argparse
    from dataclasses import fields
    from ttfsc.compiler.pipeline import QUANT_OPTIONS
    from ttfsc.quantizer.config import add_arguments, compile_options
    quantize, compile_ = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_arguments(quantize, abits_default=6, full=True)
    add_arguments(compile_)
    assert QuantConfig.from_args(quantize.parse_args([])) == QuantConfig()
    names = {f.name for f in fields(QuantConfig)}
    assert set(vars(quantize.parse_args([]))) == names
    assert set(vars(compile_.parse_args([]))) == set(compile_options()) == names - {"abits", "full", "window"}
    assert QUANT_OPTIONS == compile_options()
    argv = ["--wbits", "4", "--abits", "5", "--method", "minmax", "--abits-for", "mlp/Mul=8", "--smooth", "0.3",
            "--full", "--window", "softmax=256", "--rotate", "none", "--calib-samples", "3"]
    config = QuantConfig.from_args(quantize.parse_args(argv))
    assert (config.wbits, config.abits, config.method, config.smooth, config.full) == (4, 5, "minmax", 0.3, True)
    assert config.overrides == {"mlp/Mul": 8} and config.kind_windows["exp"] == 8 and config.bits("x/mlp/Mul") == 8
    assert config.weight_rounding == "rtn" and config.calib_samples == 3


@pytest.mark.parametrize("options,flag", [({"wbits": 6}, "--wbits"), ({"abits": 13}, "--abits"),
                                          ({"method": "mse"}, "--method"), ({"weight_method": "x"}, "--weight-method"),
                                          ({"window": ["softmax=256"]}, "--window"), ({"prefix": "a,b"}, "--prefix"),
                                          ({"abits_for": ["x=1"]}, "--abits-for"), ({"calib_seqlen": 1}, "--calib-seqlen")])
def test_config_check_names_the_option(options, flag):
    with pytest.raises(TtfscError, match=flag):
        QuantConfig(**options).check()
