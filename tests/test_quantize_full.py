"""``ttfsc quantize --full`` (quantizer/full.py) on the tiny seeded LLaMA, checked in onnxruntime.

What the fully spiking graph relies on: every decoder compute op sits in a stage group whose
activation inputs are per-tensor DQs and whose result goes through exactly one per-tensor Q; the
groups have the kinds of the contract; masked attention probabilities are exactly 0; KV-cache
values round-trip through their quantizer; the twin tracks the float model, closer with wider
windows; --window changes one kind's width; bad specs fail with one clear error.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphs import ort_session
from ttfsc.cli import main
from ttfsc.graph import VALUE_CARRIERS, GraphIndex
from ttfsc.quantizer.config import QuantConfig
from ttfsc.quantizer.full import GROUPS_META, KV_META, activations, stage_groups
from ttfsc.quantizer.quantize import quantize_model
from ttfsc.runtime.generate import Generator

LAYERS = 2  # conftest TINY_CONFIG
PER_BLOCK = {"residual": 2, "rmsnorm_ms": 2, "rsqrt": 2, "product": 5, "linear_out": 7, "rotary": 2, "silu": 1,
             "lse": 1, "sub": 1, "exp": 1, "kv": 2}
FAST = dict(calib_samples=2, calib_seqlen=32)
PLAIN = dict(rotate="none", smooth=0.0, method="minmax", prefix="none")  # no transform: gamma stays in the graph


def _quantize(src: Path, out: Path, **kw) -> tuple[Path, dict]:
    summary = quantize_model(src, out, QuantConfig(full=True, **{**FAST, **kw}), log=lambda *_: None)
    return out, summary


@pytest.fixture(scope="module")
def full_default(tiny_llama_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The --full twin with the default transforms (rotation folds gamma, smoothing, search)."""
    return _quantize(tiny_llama_onnx, tmp_path_factory.mktemp("full") / "model.onnx")


@pytest.fixture(scope="module")
def full_plain(tiny_llama_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The --full twin without transforms: RMSNorm gamma stays a Mul inside the product group."""
    return _quantize(tiny_llama_onnx, tmp_path_factory.mktemp("full_plain") / "model.onnx", **PLAIN)


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    return Generator(ort_session(path, fuse_qdq=False), path.parent, prefix=None).logits(ids)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _block(name: str) -> str:
    m = re.search(r"(?:layers[._]|present\.)(\d+)", name)
    return m.group(1) if m else "outside"


# ---------------------------------------------------------------- structure

@pytest.mark.parametrize("which", ["full_default", "full_plain"])
def test_quantizer_count_per_block(which, request):
    path, summary = request.getfixturevalue(which)
    kinds = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[GROUPS_META])
    per_block: dict[str, Counter] = {}
    for q, kind in kinds.items():
        assert q.endswith(f"[{kind}]"), "the Q node name carries its kind"
        per_block.setdefault(_block(q), Counter())[kind] += 1
    for layer in range(LAYERS):
        assert per_block[str(layer)] == Counter(PER_BLOCK), f"block {layer}"
    # outside the blocks: the embedding starts the residual stream, the final RMSNorm feeds lm_head
    assert per_block["outside"] == Counter({"residual": 1, "rmsnorm_ms": 1, "rsqrt": 1, "product": 1})
    assert summary["activations"] == len(kinds)


@pytest.mark.parametrize("which", ["full_default", "full_plain"])
def test_every_block_op_is_in_a_group_with_per_tensor_boundaries(which, request):
    model = onnx.load(str(request.getfixturevalue(which)[0]))
    inits, g, groups = _inits(model), GraphIndex.live(model), stage_groups(model)
    covered = {id(n) for grp in groups for n in grp.nodes}
    boundary = VALUE_CARRIERS | {"Shape", "QuantizeLinear", "DequantizeLinear", "Clip"}
    active = activations(g)
    left = [n.name for n in model.graph.node if n.output[0] in active and id(n) not in covered
            and n.op_type not in boundary]
    assert left == ["/lm_head/MatMul"], "only lm_head (float logits) may stay outside a group"
    for grp in groups:
        s, z = inits[grp.q.input[1]], inits[grp.q.input[2]]
        assert s.shape == () and z.shape == () and z.dtype in (np.uint8, np.uint16), grp.q.name
        assert {u.op_type for u in g.consumers[grp.q.output[0]]} == {"DequantizeLinear"}
        assert g.producer[grp.q.input[0]].op_type == "Clip"
        for dq in grp.inputs:
            shape = inits[dq.input[1]].shape if dq.input[1] in inits else None
            per_channel_weight = dq.input[0] in inits  # int8 weights of a linear
            assert per_channel_weight or shape == (), f"{grp.q.name}: activation input {dq.name} is not per tensor"
        assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in grp.nodes)
        if grp.kind not in ("residual",) or _block(grp.q.name) != "outside":
            assert grp.inputs, f"{grp.q.name} has no quantized input"


def test_group_contents(full_plain):
    groups = stage_groups(onnx.load(str(full_plain[0])))
    ops = {}
    for grp in groups:
        if _block(grp.q.name) == "0":
            ops.setdefault(grp.kind, []).append(sorted(n.op_type for n in grp.nodes if n.op_type not in VALUE_CARRIERS))
    assert ops["silu"] == [["Mul", "Sigmoid"]], "SiLU is one unary group"
    assert ops["rmsnorm_ms"] == [["Pow", "ReduceMean"]] * 2
    assert ops["rsqrt"] == [["Add", "Div", "Sqrt"]] * 2
    assert ops["lse"] == [["Add", "ReduceLogSumExp"]] and ops["sub"] == [["Sub"]] and ops["exp"] == [["Add", "Exp"]]
    assert ops["rotary"] == [["Add", "Mul", "Mul", "Neg"]] * 2
    assert ["Mul", "Mul"] in ops["product"], "RMSNorm x * r then gamma (not folded without rotation)"
    assert ["MatMul", "Mul", "Mul"] in ops["product"], "QK^T with its 1/d^(1/4) constants"
    assert ["MatMul"] in ops["product"] and ["Mul"] in ops["product"], "PV and gate*up"
    assert not any(n.op_type in ("Softmax", "IsNaN") for n in onnx.load(str(full_plain[0])).graph.node)


# ---------------------------------------------------------------- numerics

def _dq_outputs(model: onnx.ModelProto, kind: str) -> list[str]:
    kinds = json.loads({p.key: p.value for p in model.metadata_props}[GROUPS_META])
    g = GraphIndex.live(model)
    by_name = {n.name: n for n in model.graph.node}
    return [g.consumers[by_name[q].output[0]][0].output[0] for q, k in kinds.items() if k == kind]


def test_masked_probabilities_are_exactly_zero(full_default):
    path = full_default[0]
    model = onnx.load(str(path))
    probs = _dq_outputs(model, "exp")
    sess = ort_session(path, probs, fuse_qdq=False)
    gen = Generator(sess, path.parent, prefix=None)
    ids = np.arange(5, 5 + 12)
    values = sess.run(probs, gen.feeds(ids, gen.empty_past()))
    future = np.triu(np.ones((12, 12), bool), k=1)
    inits, made_by = _inits(model), {o: n for n in model.graph.node for o in n.output}
    for name, p in zip(probs, values):
        assert p.shape[-2:] == (12, 12)
        assert np.all(p[..., future] == 0.0), "a masked position got probability mass"
        dq = made_by[name]
        codes = p / inits[dq.input[1]] + inits[dq.input[2]]
        assert inits[dq.input[2]] == 0, "probabilities start at exactly 0: zero point 0"
        assert np.abs(codes - np.round(codes)).max() < 1e-3, "off the quantizer's grid"
        # 8-bit codes (A6 default + 2 extra bits for exp), both ends of [0, 2^8 - 1] used: 0 where
        # masked, 255 at the calibrated top; the first query sees only itself, so its probability
        # exp(s - lse) is about 1 (251..255 here: lse and the difference are quantized too)
        assert np.round(codes).min() == 0 and np.round(codes).max() == 255
        assert np.all(codes[..., 0, 0] >= 0.95 * 255)
        assert np.abs(p.sum(-1) - 1).max() < 0.3  # quantized probabilities still sum to about one
        assert np.any(p[..., ~future] > 0)


def test_kv_quantizer_is_shared_and_past_round_trips(full_default):
    path = full_default[0]
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    inits, by_name = _inits(model), {n.name: n for n in model.graph.node}
    kv = json.loads(meta[KV_META])
    assert len(kv) == 2 * LAYERS
    for kv_q, src_q in kv.items():
        a, b = by_name[kv_q], by_name[src_q]
        assert inits[a.input[1]] == inits[b.input[1]] and inits[a.input[2]] == inits[b.input[2]]
    gen = Generator(ort_session(path, fuse_qdq=False), path.parent, prefix=None)
    _, present = gen.forward(np.arange(5, 13)[None], gen.empty_past())
    for (k, v), (kv_q, _) in zip(present, zip(list(kv)[::2], list(kv)[1::2])):
        q = by_name[kv_q]
        s, z = float(inits[q.input[1]]), int(inits[q.input[2]])
        codes = np.rint(k / np.float32(s)) + z
        assert np.array_equal(((codes - z) * np.float32(s)).astype(np.float32), k), "present.key is on its grid"
    # feeding the past back: the next token's logits match the one-shot forward up to float reordering
    one_shot = gen.logits(np.arange(5, 14))[-1]
    step, _ = gen.forward(np.array([[13]]), present)
    assert np.abs(step[0, -1] - one_shot).max() < 0.05


def test_twin_tracks_float_and_wider_windows_track_closer(tiny_llama_onnx, tmp_path):
    rng = np.random.default_rng(0)
    gen = Generator(ort_session(tiny_llama_onnx, fuse_qdq=False), tiny_llama_onnx.parent, prefix=None)
    calib = [gen.feeds(rng.integers(3, 98, 48), gen.empty_past()) for _ in range(4)]  # covers the test text
    ids = rng.integers(3, 98, 48)
    ref = _logits(tiny_llama_onnx, ids)
    err = {}
    for abits in (4, 8):
        out, _ = _quantize(tiny_llama_onnx, tmp_path / f"a{abits}" / "model.onnx", abits=abits,
                           **{**PLAIN, "calib": calib})
        err[abits] = float(np.sqrt(np.mean((_logits(out, ids) - ref) ** 2)))
    spread = float(ref.std())
    assert err[4] < 0.5 * spread, f"4-bit twin error {err[4]:.4f} vs logit spread {spread:.4f}"
    assert err[8] < 0.25 * err[4], err


def test_window_softmax_changes_only_softmax_width(tiny_llama_onnx, full_plain, tmp_path):
    _, summary = _quantize(tiny_llama_onnx, tmp_path / "w" / "model.onnx", window=["softmax=1024"], **PLAIN)
    base = full_plain[1]["ranges"]
    softmax = [t for t, r in summary["ranges"].items() if r["width"] in ("scores", "lse", "sub", "exp")]
    assert len(softmax) == 4 * LAYERS and all(summary["ranges"][t]["kind"] in ("product", "lse", "sub", "exp")
                                              for t in softmax), "QK^T scores are products sized with the softmax"
    for t, r in summary["ranges"].items():
        assert r["levels"] == (1024 if t in softmax else base[t]["levels"]), t
        assert t not in softmax or base[t]["levels"] < 1024
    assert summary["windows"]["exp"] == 1024 and summary["windows"]["silu"] == full_plain[1]["windows"]["silu"]
    model = onnx.load(str(tmp_path / "w" / "model.onnx"))
    g = GraphIndex.live(model)
    q_of = {g.producer[n.input[0]].input[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert all(q_of[t].domain == "com.microsoft" for t in softmax), "10-bit codes travel as uint16 (contrib Q/DQ)"


@pytest.mark.parametrize("spec", ["softmax", "soft=64", "softmax=100", "softmax=2", "exp=8192", "kv=64", "=64"])
def test_bad_window_spec_is_one_clear_error(tiny_llama_onnx, tmp_path, capsys, spec):
    rc = main(["quantize", str(tiny_llama_onnx), "-o", str(tmp_path / "x.onnx"), "--full", "--window", spec])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("ttfsc: error: --window") and "KIND=LEVELS" in err[0]
    assert not (tmp_path / "x.onnx").exists()


def test_window_without_full_is_an_error(tiny_llama_onnx, tmp_path, capsys):
    rc = main(["quantize", str(tiny_llama_onnx), "-o", str(tmp_path / "x.onnx"), "--window", "softmax=256"])
    assert rc == 2 and "--full" in capsys.readouterr().err


# ---------------------------------------------------------------- range choices

def test_softmax_tail_clipping_keeps_dropped_differences_at_code_zero():
    from ttfsc.quantizer.ranges import activation_params, fake_quant
    from ttfsc.quantizer.full import clip_softmax_tails
    rng = np.random.default_rng(0)
    for bits in (4, 6, 8):
        ranges = {"s": (-107.0, 22.6), "lse": (-4.8, 22.5), "d": (-110.0, 0.0), "p": (0.0, 1.0)}
        sm = {"s": "s", "lse": "lse", "d": "d", "p": "p"}
        clip_softmax_tails(ranges, [sm], {"p": bits, "d": bits, "s": bits, "lse": bits})
        assert -110.0 < ranges["d"][0] < 0 and -107.0 < ranges["s"][0] < -4.8
        pd, pp = activation_params(*ranges["d"], bits), activation_params(*ranges["p"], bits)
        d = np.concatenate([-rng.exponential(20.0, 4000), [-110.0, ranges["d"][0]]]).astype(np.float32)
        below = d <= ranges["d"][0]
        codes = np.rint(np.exp(fake_quant(d, pd)) / pp.scale) + pp.zero_point
        assert pp.zero_point == 0 and np.all(codes[below] == 0), "a clipped difference must still give p code 0"
        # the tails of a row of 8192 clipped scores add less than a quarter of p's step to its sum
        assert 8192 * np.exp(ranges["s"][0] - ranges["lse"][0]) <= 0.25 * float(pp.scale) * 1.0001


def test_mse_range_is_never_worse_than_minmax_on_its_sample():
    from ttfsc.quantizer.ranges import activation_params, fake_quant
    from ttfsc.quantizer.full import mse_range
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    x[:2] = (30.0, -20.0)
    lo, hi = mse_range(x, float(x.min()), float(x.max()), 6, lo_zero=False)
    err = lambda a, b: float(np.mean((fake_quant(x, activation_params(a, b, 6)) - x) ** 2))
    assert err(lo, hi) < err(float(x.min()), float(x.max()))
    assert mse_range(np.abs(x), 0.0, 30.0, 6, lo_zero=True)[0] == 0.0, "a range starting at 0 keeps its exact zero"
