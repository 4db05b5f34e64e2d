"""Rotation and smoothing must leave the FP model's function unchanged (to float rounding).

The checks run the tiny exported LLaMA and its transformed copy in onnxruntime on the same tokens,
with a KV-cache step, because the transform touches embeddings, every linear and the norms.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from ttfsc import modelio
from ttfsc.errors import TtfscError
from ttfsc.graph import GraphIndex
from ttfsc.quantizer.config import QuantConfig
from ttfsc.quantizer.rotate import (WeightWriter, analyse, channel_max, gamma_value, linear_inputs, rotate_model,
                                   rotate_value_heads, rotation, smooth_model)
from ttfsc.quantizer.transforms import wants_online_hadamard
from ttfsc.runtime.generate import Generator
from ttfsc.runtime.session import open_session

TOL = 1e-4


def _run(path: Path) -> list[np.ndarray]:
    """Logits of a 12-token prefill and of a 3-token step on its KV cache."""
    gen = Generator(open_session(path), path.parent)
    ids = np.random.default_rng(1).integers(3, 98, size=15)
    logits, past = gen.forward(ids[None, :12])
    step, _ = gen.forward(ids[None, 12:], past)
    return [logits, step]


def _max_diff(a: Path, b: Path) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(_run(a), _run(b)))


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = modelio.load_model(path)
    inits = modelio.Initializers(model)
    return {n: np.array(inits.value(n)) for n in inits.by_name}


def _gammas(path: Path) -> list[np.ndarray]:
    """The gain each RMSNorm of the model multiplies by, as the graph reads it now."""
    model = modelio.load_model(path)
    wr = WeightWriter(model, None)
    return [gamma_value(wr, GraphIndex.live(model), norm) for norm in analyse(model).norms]


@pytest.fixture(scope="module")
def original(tiny_llama_onnx: Path) -> Path:
    return tiny_llama_onnx


@pytest.mark.parametrize("kind", ["random", "hadamard"])
def test_rotation_preserves_logits(original: Path, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "model.rot.onnx"
    info = rotate_model(original, out, seed=3, kind=kind)
    assert info["gammas_folded"] == 5 and info["writers"] == 4 and info["readers"] == 11
    assert info["value_heads_rotated"] == 2  # v_proj/o_proj of both layers, head_dim from config.json
    assert _max_diff(original, out) < TOL
    for gamma in _gammas(out):
        np.testing.assert_array_equal(gamma, np.ones_like(gamma))
    before, after = _weights(original), _weights(out)
    assert not np.allclose(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    changed = [n for n in after if n in before and after[n].ndim == 2 and not np.allclose(before[n], after[n])]
    assert len(changed) == 1 + 11 + 4  # embedding, every reader and writer
    assert (out.parent / "config.json").exists()


def test_value_head_rotation_alone_preserves_logits(original: Path, tmp_path: Path) -> None:
    """The per-head V/O rotation must cancel through attention (incl. the KV cache step) on its own."""
    model = modelio.load_model(original)
    g = GraphIndex.live(model)
    spill = modelio.SpillFile(tmp_path, "t")
    try:
        wr = WeightWriter(model, spill)
        assert rotate_value_heads(g, wr, head_dim=16, seed=0) == 2
        modelio.save_model(model, tmp_path / "model.onnx")
    finally:
        spill.close()
    modelio.copy_sidecars(str(original.parent), str(tmp_path))
    v = [n for n in model.graph.node if "/v_proj/" in n.name and n.op_type == "MatMul"][0]
    assert not np.allclose(_weights(original)[v.input[1]], _weights(tmp_path / "model.onnx")[v.input[1]])
    assert _max_diff(original, tmp_path / "model.onnx") < TOL


def test_online_down_rotation_preserves_logits(original: Path, tmp_path: Path) -> None:
    """x H before every down_proj with W' = H^T W is the identity up to rounding; quantize skips H."""
    from ttfsc.quantizer.qdq import find_linears
    from ttfsc.quantizer.rotate import ONLINE_TRANSFORM_SUFFIX, rotate_down_inputs
    out = tmp_path / "model.onnx"
    assert rotate_down_inputs(original, out, seed=1)["rotated"] == 2
    assert _max_diff(original, out) < TOL
    model = modelio.load_model(out)
    online = [n for n in model.graph.node if ONLINE_TRANSFORM_SUFFIX in n.name and n.op_type == "MatMul"]
    assert len(online) >= 2 and not {n.name for n in online} & {n.name for n in find_linears(model)}
    assert len(find_linears(model)) == len(find_linears(modelio.load_model(original)))


def test_fold_only_keeps_weights_aligned(original: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.fold.onnx"
    info = rotate_model(original, out, fold_only=True)
    assert info["kind"] is None and info["gammas_folded"] == 5
    assert _max_diff(original, out) < TOL
    np.testing.assert_array_equal(_weights(original)["model.embed_tokens.weight"],
                                  _weights(out)["model.embed_tokens.weight"])


def test_rotation_matrices_are_orthogonal() -> None:
    for n, kind in ((64, "hadamard"), (576, "hadamard"), (48, "random")):
        q = rotation(n, seed=0, kind=kind)
        np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-10)
    h = rotation(64, kind="hadamard")
    np.testing.assert_allclose(np.abs(h), 1 / 8)  # a Walsh-Hadamard spreads every channel evenly
    with pytest.raises(TtfscError, match="unknown"):
        rotation(8, kind="givens")


def _tie_lm_head(src: Path, dst: Path) -> None:
    """Rewire lm_head to Transpose(embedding): the tied-weights form some exports use."""
    model = modelio.load_model(src)
    head = next(n for n in model.graph.node if n.name == "/lm_head/MatMul")
    model.graph.node.insert(0, helper.make_node("Transpose", ["model.embed_tokens.weight"], ["tied_head"],
                                                name="/lm_head/Transpose", perm=[1, 0]))
    head.input[1] = "tied_head"
    modelio.save_model(model, dst)
    modelio.copy_sidecars(str(src.parent), str(dst.parent))


def test_tied_lm_head_is_untied(original: Path, tmp_path: Path) -> None:
    tied = tmp_path / "tied" / "model.onnx"
    _tie_lm_head(original, tied)
    out = tmp_path / "rot" / "model.onnx"
    info = rotate_model(tied, out, seed=0)
    assert info["untied"] and _max_diff(tied, out) < TOL
    model = modelio.load_model(out)
    assert not any(n.op_type == "Transpose" and n.input[0] == "model.embed_tokens.weight" for n in model.graph.node)


def _calib_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    gen = Generator(open_session(path), path.parent)
    rng = np.random.default_rng(7)
    return [gen.feeds(rng.integers(3, 98, size=(1, 16))) for _ in range(2)]


@pytest.mark.parametrize("rotate_first", [False, True])
def test_smoothing_preserves_logits(original: Path, tmp_path: Path, rotate_first: bool) -> None:
    src = original
    if rotate_first:
        src = tmp_path / "rot" / "model.onnx"
        rotate_model(original, src)
    amax = channel_max(src, _calib_feeds(src))
    s = analyse(modelio.load_model(src))
    wanted = {n.output for n in s.norms} | {k for k in amax if "down_proj" in k or "mlp/Mul" in k}
    act = {k: v for k, v in amax.items() if k in wanted}
    assert len(act) == 5 + 2
    out = tmp_path / "smooth" / "model.onnx"
    info = smooth_model(src, out, act, alpha=0.5)
    assert len(info["smoothed"]) == 7
    assert _max_diff(original, out) < TOL
    assert not np.allclose(_gammas(out)[-1], 1.0)


def test_smoothing_rejects_unknown_tensor(original: Path, tmp_path: Path) -> None:
    model = modelio.load_model(original)
    o_proj_in = next(n for n in linear_inputs(model) if "Reshape" in n)  # attention output: no preceding op
    with pytest.raises(TtfscError, match="SwiGLU"):
        smooth_model(original, tmp_path / "x.onnx", {o_proj_in: np.ones(64)})
    with pytest.raises(TtfscError, match="not the input of a linear"):
        smooth_model(original, tmp_path / "x.onnx", {"nope": np.ones(64)})
    assert not (tmp_path / "x.onnx").exists()


def _break_graph(src: Path, dst: Path) -> None:
    """Put a Relu on the residual stream: a consumer rotation cannot account for."""
    model = modelio.load_model(src)
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight")
    relu = helper.make_node("Relu", [gather.output[0]], ["relu_out"], name="/model/strange/Relu")
    model.graph.node.append(relu)
    model.graph.output.append(onnx.ValueInfoProto(name="relu_out"))
    modelio.save_model(model, dst)


def test_unrecognised_graph_raises(original: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken" / "model.onnx"
    _break_graph(original, broken)
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(TtfscError, match="/model/strange/Relu"):
        rotate_model(broken, out)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir()] if out.parent.exists() else True


def test_online_hadamard_resolution() -> None:
    """auto follows the Hadamard rotation and stays out of --full twins; on + --full is refused."""
    assert wants_online_hadamard("auto", "hadamard", full=False)
    assert not wants_online_hadamard("auto", "none", full=False)
    assert not wants_online_hadamard("auto", "hadamard", full=True)
    assert wants_online_hadamard("on", "none", full=False) and not wants_online_hadamard("off", "hadamard", full=False)
    with pytest.raises(TtfscError, match="--full"):
        QuantConfig(online_hadamard="on", full=True).check()
    with pytest.raises(TtfscError, match="online-hadamard"):
        QuantConfig(online_hadamard="sometimes").check()
