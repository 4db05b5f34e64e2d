"""Export, tokenizers and the KV-cache generation loop, checked against independent references."""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ttfsc.cli import main as cli_main
from ttfsc.errors import TtfscError
from ttfsc.compiler.export import export_model
from ttfsc.runtime.generate import Generator, pick_token, run_cli
from ttfsc.runtime.tokenizer import Llama2cTokenizer, load_tokenizer, write_llama2c_vocab

os.environ["HF_HUB_OFFLINE"] = "1"


def _generator(onnx_path: Path) -> Generator:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return Generator(sess, onnx_path.parent)


# ---------------------------------------------------------------- HF export

def test_onnx_logits_match_torch(tiny_llama_dir: Path, tiny_llama_onnx: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = np.random.default_rng(1).integers(0, 256, size=17)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    got = _generator(tiny_llama_onnx).logits(ids)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_export_layout(tiny_llama_onnx: Path) -> None:
    gen = _generator(tiny_llama_onnx)
    assert (gen.num_layers, gen.kv_heads, gen.head_dim) == (2, 2, 16)
    assert {"input_ids", "attention_mask", "position_ids", "past_key_values.1.value"} <= gen.input_names
    assert (tiny_llama_onnx.parent / "config.json").is_file()


def _greedy_without_cache(gen: Generator, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(gen.logits(ids)[-1])))
    return ids[len(prompt):]


def test_kv_cache_greedy_equals_full_recompute(tiny_llama_onnx: Path) -> None:
    gen = _generator(tiny_llama_onnx)
    prompt = [1, 40, 41, 42, 7]
    cached = gen.generate(prompt, 12, stop_at_eos=False)
    assert cached == _greedy_without_cache(gen, prompt, 12)


def test_sampling_is_seeded(tiny_llama_onnx: Path) -> None:
    gen = _generator(tiny_llama_onnx)
    a = gen.generate([1, 5], 8, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    b = gen.generate([1, 5], 8, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    assert a == b and len(a) == 8


def test_top_p_keeps_the_nucleus() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    rng = np.random.default_rng(0)
    assert {pick_token(logits, 1.0, 0.5, rng) for _ in range(50)} == {0}
    assert pick_token(logits, 0.0, 1.0, rng) == 0


def test_hf_tokenizer_beside_model(tiny_llama_onnx: Path) -> None:
    tok = load_tokenizer(tiny_llama_onnx)
    ids = tok.encode("Hi there", bos=True)
    assert ids[0] == tok.bos_id == 1 and tok.decode(ids) == "Hi there"


def test_run_cli_prints_text(tiny_llama_onnx: Path, capsys: pytest.CaptureFixture) -> None:
    args = Namespace(model=str(tiny_llama_onnx), prompt="ab", max_new_tokens=4, temperature=0.0,
                     top_p=1.0, seed=0, stats=False)
    assert run_cli(args) == 0
    assert capsys.readouterr().out.startswith("ab")


# ---------------------------------------------------------------- llama2.c

def _tiny_vocab() -> tuple[list[bytes], list[float]]:
    """llama2.c-style vocab: specials, 256 byte pieces, characters, then scored merges."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % b for b in range(256)]
    scores = [0.0] * len(pieces)
    for ch in " abdehlortw":
        pieces.append(ch.encode())
        scores.append(-1.0)
    merges = {b"he": 5.0, b"ll": 4.0, b"llo": 3.0, b"hello": 2.0, b" hello": 1.0, b"th": 4.0,
              b" t": 3.5, b" th": 1.5, b"the": 0.5, b" the": 0.7, b"or": 4.0, b"wor": 0.2}
    for piece, score in merges.items():
        pieces.append(piece)
        scores.append(score)
    return pieces, scores


@pytest.fixture
def tokenizer_bin(tmp_path: Path) -> Path:
    path = tmp_path / "tokenizer.bin"
    write_llama2c_vocab(path, *_tiny_vocab())
    return path


def _run_c_encode(tok: Llama2cTokenizer, text: str) -> list[int]:
    """run.c's quadratic merge loop, as an independent reference for the heap version."""
    ids = tok.initial_ids(text)
    while True:
        best, best_i, best_id = -1e10, -1, -1
        for i in range(len(ids) - 1):
            m = tok.lookup.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if m is not None and tok.scores[m] > best:
                best, best_i, best_id = tok.scores[m], i, m
        if best_i < 0:
            return [1] + ids
        ids[best_i:best_i + 2] = [best_id]


def test_llama2c_tokenizer_merges(tokenizer_bin: Path) -> None:
    tok = Llama2cTokenizer(tokenizer_bin)
    assert tok.encode("hello") == [1, tok.lookup[b" hello"]]
    assert tok.encode("", bos=True) == [1]
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("helo twrdab") for _ in range(rng.randint(1, 30)))
        assert tok.encode(text) == _run_c_encode(tok, text), text


@pytest.mark.parametrize("text", ["hello the world", "hello", "Ünïcode ✓ and\nnewline", "a"])
def test_llama2c_tokenizer_round_trip(tokenizer_bin: Path, text: str) -> None:
    tok = Llama2cTokenizer(tokenizer_bin)
    ids = tok.encode(text, bos=True)
    assert tok.decode(ids) == text
    assert all(3 <= i < 259 for i in tok.encode("✓", bos=False)[1:])  # byte fallback


LLAMA2C_DIMS = dict(dim=32, hidden=48, n_layers=2, n_heads=4, n_kv=2, seq_len=32)


def _write_llama2c(path: Path, vocab: int, shared: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A random llama2.c v0 checkpoint; returns its tensors for the reference forward."""
    d = LLAMA2C_DIMS
    dim, hid, L, hs = d["dim"], d["hidden"], d["n_layers"], d["dim"] // d["n_heads"]
    kv = d["n_kv"] * hs
    rng = np.random.default_rng(seed)
    shapes = [("tok", (vocab, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kv, dim)),
              ("wv", (L, kv, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)), ("w1", (L, hid, dim)),
              ("w2", (L, dim, hid)), ("w3", (L, hid, dim)), ("rms_final", (dim,)),
              ("freq_real", (d["seq_len"], hs // 2)), ("freq_imag", (d["seq_len"], hs // 2))]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    t = {n: (rng.standard_normal(s) * 0.3 + (1.0 if n.startswith("rms") else 0.0)).astype(np.float32) for n, s in shapes}
    header = (dim, hid, L, d["n_heads"], d["n_kv"], vocab if shared else -vocab, d["seq_len"])
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *header))
        for n, _ in shapes:
            f.write(t[n].tobytes())
    t.setdefault("wcls", t["tok"])
    return t


def _rmsnorm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x) + 1e-5) * w


def _rope_interleaved(v: np.ndarray, pos: int, hs: int) -> np.ndarray:
    """run.c's rotary: rotate pairs (2i, 2i+1) of each head by pos * 10000^(-2i/hs)."""
    out = v.astype(np.float64).copy()
    for i in range(0, len(v), 2):
        ang = pos * 10000.0 ** (-(i % hs) / hs)
        c, s = np.cos(ang), np.sin(ang)
        out[i], out[i + 1] = v[i] * c - v[i + 1] * s, v[i] * s + v[i + 1] * c
    return out


def _llama2c_forward(t: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """llama2.c run.c forward in float64 numpy: logits for every position."""
    d = LLAMA2C_DIMS
    hs, group = d["dim"] // d["n_heads"], d["n_heads"] // d["n_kv"]
    keys, vals, out = [[] for _ in range(d["n_layers"])], [[] for _ in range(d["n_layers"])], []
    for pos, tok in enumerate(tokens):
        x = t["tok"][tok].astype(np.float64)
        for layer in range(d["n_layers"]):
            xb = _rmsnorm(x, t["rms_att"][layer])
            q = _rope_interleaved(t["wq"][layer] @ xb, pos, hs)
            keys[layer].append(_rope_interleaved(t["wk"][layer] @ xb, pos, hs))
            vals[layer].append(t["wv"][layer] @ xb)
            K, V = np.stack(keys[layer]), np.stack(vals[layer])
            att = np.zeros(d["dim"])
            for h in range(d["n_heads"]):
                kvh = slice((h // group) * hs, (h // group + 1) * hs)
                sc = K[:, kvh] @ q[h * hs:(h + 1) * hs] / np.sqrt(hs)
                p = np.exp(sc - sc.max())
                att[h * hs:(h + 1) * hs] = (p / p.sum()) @ V[:, kvh]
            x = x + t["wo"][layer] @ att
            xb = _rmsnorm(x, t["rms_ffn"][layer])
            h1, h3 = t["w1"][layer] @ xb, t["w3"][layer] @ xb
            x = x + t["w2"][layer] @ (h1 / (1 + np.exp(-h1)) * h3)
        out.append(t["wcls"] @ _rmsnorm(x, t["rms_final"]))
    return np.stack(out)


@pytest.mark.parametrize("shared", [True, False])
def test_llama2c_export_matches_run_c(tmp_path: Path, tokenizer_bin: Path, shared: bool) -> None:
    vocab = len(_tiny_vocab()[0])
    tensors = _write_llama2c(tmp_path / "model.bin", vocab, shared)
    out = export_model(tmp_path / "model.bin", tmp_path / "out" / "model.onnx")
    tokens = [1, 270, 5, 77, 281, 12, 3]
    got = _generator(out).logits(tokens)
    np.testing.assert_allclose(got, _llama2c_forward(tensors, tokens), atol=1e-4, rtol=1e-4)
    tok = load_tokenizer(out)
    assert isinstance(tok, Llama2cTokenizer) and tok.decode(tok.encode("hello the world")) == "hello the world"


# ---------------------------------------------------------------- errors

def test_cli_missing_source_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ttfsc.cli", "export", "missing_dir", "-o", "x.onnx"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ttfsc: error: missing_dir")
    assert not (tmp_path / "x.onnx").exists()


def _error_of(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_cli_rejects_bad_sources(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01" * 100)
    out = tmp_path / "o" / "m.onnx"
    assert "unknown checkpoint format" in _error_of(["export", str(junk), "-o", str(out)], capsys)
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error_of(["export", str(tmp_path / "empty"), "-o", str(out)], capsys)
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text('{"model_type": "gpt2"}')
    assert "not supported" in _error_of(["export", str(gpt), "-o", str(out)], capsys)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_llama2c_without_tokenizer(tmp_path: Path) -> None:
    _write_llama2c(tmp_path / "model.bin", 300, True)
    with pytest.raises(TtfscError, match="--tokenizer"):
        export_model(tmp_path / "model.bin", tmp_path / "out.onnx")


def test_no_tokenizer_found(tmp_path: Path) -> None:
    with pytest.raises(TtfscError, match="no tokenizer"):
        load_tokenizer(tmp_path / "model.onnx")


def test_gguf_unsupported_architecture_fails_fast(tmp_path: Path) -> None:
    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + s("general.alignment") + struct.pack("<II", 4, 32)
                     + s("general.architecture") + struct.pack("<I", 8) + s("gpt2"))
    with pytest.raises(TtfscError, match="'gpt2' is not supported"):
        export_model(gguf, tmp_path / "out" / "model.onnx")
    assert not (tmp_path / "out" / "model.onnx").exists()
