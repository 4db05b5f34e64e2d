"""Ordinary faults are one line ``ttfsc: error: ...`` naming the file or argument, exit 2 (issue 12, item 3).

Each case runs the real command in a subprocess (``python -m ttfsc.cli``), as a user would, on the
tiny seeded LLaMA of conftest.py, and asserts the exit status, exactly one stderr line starting
``ttfsc: error:``, no traceback, and the file or argument named in it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ttfsc.cli import main

LATIN1 = "caf\xe9 au lait\n".encode("latin-1")  # \xe9 is not UTF-8
BINARY = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4


def ttfsc(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The ``ttfsc`` command in a fresh interpreter: what a user sees, stderr included."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("TTFSC_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ttfsc.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one stderr line starting ``ttfsc: error:``, no traceback, every needle in it."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ttfsc: error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- models

@pytest.fixture(scope="module")
def mixed(tiny_llama_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(QDQ model with 6-bit stages and 8-bit mlp stages, its spiking model compiled with -T auto)."""
    folder = tmp_path_factory.mktemp("mixed")
    qdq, snn = folder / "q" / "model.onnx", folder / "s" / "model.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(qdq), "--abits", "6", "--abits-for", "mlp=8",
                 "--rotate", "none", "--method", "minmax", "--prefix", "none", "--calib-samples", "2",
                 "--calib-seqlen", "32"]) == 0
    assert main(["compile", str(qdq), "-T", "auto", "-o", str(snn)]) == 0
    return qdq, snn


def _copy_model(src: Path, dst: Path, edit=None) -> Path:
    """The model at ``src`` with its side files in ``dst``; ``edit(model)`` changes it (weights loaded)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        if f.suffix in (".json", ".model", ".txt") or f.name.startswith("tokenizer"):
            shutil.copy(f, dst / f.name)
    model = onnx.load(str(src))
    if edit is not None:
        edit(model)
    onnx.save(model, str(dst / src.name), save_as_external_data=True, location=src.name + ".data")
    return dst / src.name


# ---------------------------------------------------------------- text files

def test_verify_text_missing(mixed, tmp_path):
    qdq, snn = mixed
    one_error(ttfsc("verify", qdq, snn, "--text", tmp_path / "story.txt"), "--text", "story.txt", "no such file")


@pytest.mark.parametrize("content,needle", [(LATIN1, "not UTF-8"), (BINARY, "binary")])
def test_verify_text_not_utf8_or_binary(mixed, tmp_path, content, needle):
    qdq, snn = mixed
    text = tmp_path / "story.txt"
    text.write_bytes(content)
    one_error(ttfsc("verify", qdq, snn, "--text", text), "--text", "story.txt", needle)


def test_report_text_not_utf8(mixed, tmp_path):
    qdq, snn = mixed
    text = tmp_path / "story.txt"
    text.write_bytes(LATIN1)
    one_error(ttfsc("report", snn, "--qann", qdq, "--text", text, "--out", tmp_path / "r"), "--text", "not UTF-8")
    assert not (tmp_path / "r").exists()


def test_eval_task_files_not_utf8(tiny_llama_onnx, tmp_path):
    hellaswag = tmp_path / "hellaswag.txt"
    hellaswag.write_bytes(b"ctx\n0\n" + LATIN1 * 4)
    one_error(ttfsc("eval", tiny_llama_onnx, "--tasks", f"hellaswag={hellaswag}"), "hellaswag.txt", "not UTF-8")
    arc = tmp_path / "arc.jsonl"
    arc.write_bytes(b'{"query": "Q", "choices": ["' + LATIN1.strip() + b'", "b"], "gold": 0}\n')
    one_error(ttfsc("eval", tiny_llama_onnx, "--tasks", f"arc_easy={arc}"), "arc.jsonl", "not UTF-8")


@pytest.mark.parametrize("content,needle", [(LATIN1 * 100, "not UTF-8"), (BINARY, "binary"),
                                            (b"\x01\x02\x03 text" * 50, "looks binary")])
def test_eval_ppl_file_not_text(tiny_llama_onnx, tmp_path, content, needle):
    corpus = tmp_path / "wiki.txt"
    corpus.write_bytes(content)
    one_error(ttfsc("eval", tiny_llama_onnx, "--ppl", f"wiki={corpus}"), f"--ppl wiki={corpus}", needle)


def test_quantize_calib_binary(tiny_llama_onnx, tmp_path):
    calib = tmp_path / "calib.bin"
    calib.write_bytes(BINARY)
    out = tmp_path / "q" / "model.onnx"
    one_error(ttfsc("quantize", tiny_llama_onnx, "-o", out, "--calib", calib), "--calib", "calib.bin", "binary")
    assert not out.parent.exists()


# ---------------------------------------------------------------- a broken float model

@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_non_finite_weight_is_named(tiny_llama_onnx, tmp_path, value):
    """Was: `internal error: ValueError: probabilities contain NaN` from the self-generated calibration."""
    def poison(model: onnx.ModelProto) -> None:
        t = next(t for t in model.graph.initializer if len(t.dims) == 2 and t.name.startswith("onnx::MatMul"))
        w = numpy_helper.to_array(t).copy()
        w[1, 2] = value
        t.CopyFrom(numpy_helper.from_array(w, t.name))
        poison.name = t.name

    bad = _copy_model(tiny_llama_onnx, tmp_path / "bad", poison)
    out = tmp_path / "q" / "model.onnx"
    one_error(ttfsc("quantize", bad, "-o", out), str(bad), repr(poison.name), "non-finite")
    assert not out.parent.exists()
    snn = tmp_path / "c" / "model.onnx"  # the continuous baseline calibrates the float model too
    one_error(ttfsc("compile", bad, "-T", "64", "--neuron", "continuous", "-o", snn), repr(poison.name), "non-finite")
    assert not snn.parent.exists()


# ---------------------------------------------------------------- generation and its arguments

def test_prompt_longer_than_the_context(tiny_llama_onnx):
    """100k characters: was onnxruntime out of memory; a prompt just past the context generated nothing, exit 0."""
    err = one_error(ttfsc("run", tiny_llama_onnx, "--prompt", "a" * 100_000), "--prompt", "context is 256 tokens")
    assert "max_position_embeddings" in err
    one_error(ttfsc("run", tiny_llama_onnx, "--prompt", "a" * 300), "--prompt", "300 characters")


@pytest.mark.parametrize("flag,value", [("--max-new-tokens", "-1"), ("--temperature", "-0.5"),
                                        ("--temperature", "nan"), ("--top-p", "0"), ("--top-p", "1.5")])
def test_bad_sampling_arguments(tiny_llama_onnx, flag, value):
    one_error(ttfsc("run", tiny_llama_onnx, flag, value), f"{flag} {float(value) if flag != '--max-new-tokens' else value}")


def test_verify_tokens_checked(mixed):
    qdq, snn = mixed
    one_error(ttfsc("verify", qdq, snn, "--tokens", "-1"), "--tokens -1")
    one_error(ttfsc("verify", qdq, snn, "--tokens", "100000"), "--tokens 100000", "context")


# ---------------------------------------------------------------- windows

def test_fixed_window_on_a_mixed_width_model_says_auto(mixed, tmp_path):
    """Was: -T 64 suggested -T 256, which then suggested -T 64."""
    qdq, _ = mixed
    for T in ("64", "256", "1024"):
        out = tmp_path / f"s{T}.onnx"
        one_error(ttfsc("compile", qdq, "-T", T, "-o", out), "several widths", "-T auto", "--requantize")
        assert not out.exists()


# ---------------------------------------------------------------- argument errors

@pytest.mark.parametrize("args,needles", [
    (["compile", "m.onnx", "-o", "o.onnx"], ["compile: the following arguments are required: -T",
                                              "(see ttfsc compile -h)"]),
    (["compile", "m.onnx", "-T", "64", "-o", "o.onnx", "--coding", "morse"], ["--coding", "invalid choice: 'morse'"]),
    (["verify", "q.onnx", "s.onnx", "--tokens", "many"], ["verify: argument --tokens: invalid int value: 'many'",
                                                         "(see ttfsc verify -h)"]),
    (["run", "m.onnx", "--no-such-option"], ["run: unrecognized arguments: --no-such-option", "(see ttfsc run -h)"]),
    (["compile", "m.onnx", "-T", "sixty", "-o", "o.onnx"], ["-T", "'sixty'", "power of two"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'", "(see ttfsc -h)"]),
    ([], ["required: COMMAND", "(see ttfsc -h)"]),
])
def test_argument_errors_are_one_line(tmp_path, args, needles):
    proc = ttfsc(*args, cwd=tmp_path)
    one_error(proc, *needles)
    assert proc.stderr.count("\n") == 1 and "usage:" not in proc.stderr, proc.stderr


def test_help_still_prints_usage():
    proc = ttfsc("compile", "-h")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ttfsc compile") and "-T T" in proc.stdout


# ---------------------------------------------------------------- Ctrl-C while the command modules load

def test_ctrl_c_while_importing_is_not_a_traceback(tmp_path):
    """A KeyboardInterrupt raised by the first import of numpy (what a Ctrl-C in the first second hits)
    ends as one line and exit 130: the command modules are imported inside main's try."""
    script = textwrap.dedent("""
        import sys

        class CtrlC:
            def find_spec(self, name, path=None, target=None):
                if name == "numpy":
                    raise KeyboardInterrupt
                return None

        sys.meta_path.insert(0, CtrlC())
        from ttfsc.cli import main
        sys.exit(main(["compile", "m.onnx", "-T", "64", "-o", "o.onnx"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("ttfsc:")


# ---------------------------------------------------------------- options that would be ignored

def test_abits_for_pattern_that_matches_nothing(tiny_llama_onnx, tmp_path):
    """`--abits-for down_proj=8` used to be ignored without a word (no tensor is named down_proj)."""
    out = tmp_path / "q" / "model.onnx"
    one_error(ttfsc("quantize", tiny_llama_onnx, "-o", out, "--abits-for", "down_proj=8", "--rotate", "none",
                    "--method", "minmax", "--prefix", "none", "--calib-samples", "2", "--calib-seqlen", "32"),
              "--abits-for down_proj=8", "mlp/Mul")
    assert not out.parent.exists()
