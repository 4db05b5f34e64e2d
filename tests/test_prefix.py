"""Prefixed outliers (PrefixQuant): prefix.npz is written by quantize, carried by compile, and
applied by every Generator, so the quantized model never sees the prefix's activations.

The tiny random LLaMA has no attention sink, so ``--prefix auto`` finds nothing there; the
prefix is given explicitly (BOS + one token) to exercise the whole path.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from ttfsc.cli import main
from ttfsc.errors import TtfscError
from ttfsc.quantizer.prefix import OUTLIER_RATIO, outlier_hits
from ttfsc.runtime.generate import PREFIX_FILE, Generator, Prefix
from ttfsc.runtime.session import open_session

PREFIX = [1, 40]
TOKENS = [5, 71, 72, 3, 80, 69, 76, 76, 79, 14]


@pytest.fixture(scope="module")
def prefixed(tiny_llama_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A W8A6 QDQ model quantized behind PREFIX, and its T=64 spiking model in another folder."""
    root = tmp_path_factory.mktemp("prefixed")
    qdq, snn = root / "qdq" / "model.qdq.onnx", root / "snn" / "model.snn.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(qdq), "--abits", "6", "--prefix", "1,40",
                 "--calib-samples", "2", "--calib-seqlen", "24", "--rotate", "none"]) == 0
    assert main(["compile", str(qdq), "-T", "64", "-o", str(snn)]) == 0
    return {"fp": tiny_llama_onnx, "qdq": qdq, "snn": snn}


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_prefix_npz_written_and_carried_by_compile(prefixed):
    for model in ("qdq", "snn"):
        npz = prefixed[model].parent / PREFIX_FILE
        assert npz.is_file()
        p = Prefix.load(npz)
        assert list(p.ids) == PREFIX and len(p.past) == 2
        assert all(k.dtype == np.float32 and k.shape == (1, 2, 2, 16) for kv in p.past for k in kv)
        assert _meta(prefixed[model])["ttfsc.prefix"] == "1,40"


def test_generator_with_prefix_equals_float_model_on_prefix_plus_tokens(prefixed):
    # The prefix KV cache belongs to the float model the QANN was quantized from; with --rotate none
    # that is the export itself (a value-head rotation would rotate the cached values).
    sess = open_session(prefixed["fp"])
    plain = Generator(sess, prefixed["fp"].parent, prefix=None)
    with_prefix = Generator(sess, prefix=Prefix.load(prefixed["qdq"].parent / PREFIX_FILE))
    ref = plain.logits(PREFIX + TOKENS)[len(PREFIX):]
    got = with_prefix.logits(TOKENS)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # KV-cache generation behind the prefix continues exactly like the plain model on prefix + prompt
    assert with_prefix.generate(TOKENS, 8, stop_at_eos=False) == plain.generate(PREFIX + TOKENS, 8, stop_at_eos=False)
    # a leading BOS is already in the prefix; an empty prompt starts from the prefix's last logits
    assert with_prefix.generate([1] + TOKENS, 4, stop_at_eos=False) == with_prefix.generate(TOKENS, 4, stop_at_eos=False)
    assert with_prefix.generate([], 4, stop_at_eos=False) == plain.generate(PREFIX, 4, stop_at_eos=False)


def test_generator_loads_prefix_beside_model_and_reports_cost(prefixed):
    gen = Generator(open_session(prefixed["snn"]), prefixed["snn"].parent)
    assert gen.prefix_cost() == {"tokens": 2, "kv_bytes": 2 * 2 * (1 * 2 * 2 * 16) * 4}
    assert gen.feeds(np.asarray(TOKENS))["position_ids"][0, 0] == len(PREFIX)
    assert gen.feeds(np.asarray(TOKENS))["attention_mask"].shape == (1, len(PREFIX) + len(TOKENS))


def test_verify_prefixed_qdq_against_its_snn(prefixed, capsys):
    assert main(["verify", str(prefixed["qdq"]), str(prefixed["snn"]), "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "real mismatches: 0" in out and "verify: OK" in out


def test_stale_or_foreign_prefix_npz(prefixed, tiny_llama_onnx, tmp_path):
    # quantized without a prefix: metadata says so, a prefix.npz left in the folder is ignored
    out = tmp_path / "plain.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(out), "--prefix", "none",
                 "--calib-samples", "1", "--calib-seqlen", "16"]) == 0
    assert _meta(out)["ttfsc.prefix"] == "" and not (tmp_path / PREFIX_FILE).exists()
    shutil.copy(prefixed["qdq"].parent / PREFIX_FILE, tmp_path / PREFIX_FILE)
    assert Generator(open_session(out), tmp_path).prefix is None
    # a model quantized behind another prefix refuses the wrong cache
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(prefixed["qdq"].parent / PREFIX_FILE, other / PREFIX_FILE)
    q2 = other / "q.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(q2), "--prefix", "bos",
                 "--calib-samples", "1", "--calib-seqlen", "16"]) == 0
    assert _meta(q2)["ttfsc.prefix"] == "1" and list(Prefix.load(other / PREFIX_FILE).ids) == [1]
    shutil.copy(prefixed["qdq"].parent / PREFIX_FILE, other / PREFIX_FILE)
    with pytest.raises(TtfscError, match="quantized with"):
        Generator(open_session(q2), other)


def test_auto_finds_no_prefix_on_a_model_without_sinks(tiny_llama_onnx, tmp_path, capsys):
    out = tmp_path / "auto.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(out), "--calib-samples", "2", "--calib-seqlen", "16"]) == 0
    assert "no outlier tokens" in capsys.readouterr().out
    assert not (tmp_path / PREFIX_FILE).exists() and _meta(out)["ttfsc.prefix"] == ""


def test_outlier_hits_counts_position_zero_as_bos():
    seqs = [np.array([7, 30, 9, 30]), np.array([8, 9, 30, 9])]
    big = OUTLIER_RATIO * 3
    ratios = [np.array([big, big, 1.0, 2.0]), np.array([big, 1.0, 1.0, 1.0])]
    assert outlier_hits(seqs, ratios, bos=1) == {1: 2, 30: 1}


def test_bad_prefix_option(tiny_llama_onnx, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(tmp_path / "x.onnx"), "--prefix", "first"]) == 2
    assert "--prefix first" in capsys.readouterr().err


def test_float_model_never_carries_a_siblings_prefix(prefixed, tmp_path):
    """A float baseline beside a quantized model's prefix.npz runs without it (it was never quantized
    with it), and a model that declares a prefix refuses to run without its prefix.npz."""
    fp = tmp_path / "fp" / "model.onnx"
    fp.parent.mkdir()
    for f in prefixed["fp"].parent.iterdir():
        shutil.copy(f, fp.parent / f.name)
    shutil.copy(prefixed["qdq"].parent / PREFIX_FILE, fp.parent / PREFIX_FILE)
    gen = Generator(open_session(fp), fp.parent)
    assert gen.prefix is None
    plain = Generator(open_session(prefixed["fp"]), prefixed["fp"].parent, prefix=None)
    np.testing.assert_array_equal(gen.logits(TOKENS), plain.logits(TOKENS))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    for f in prefixed["snn"].parent.iterdir():
        if f.name != PREFIX_FILE:
            shutil.copy(f, lonely / f.name)
    with pytest.raises(TtfscError, match=r"quantized with prefix tokens \[1,40\] but prefix.npz is not beside it"):
        Generator(open_session(lonely / prefixed["snn"].name), lonely)
