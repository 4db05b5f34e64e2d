"""Bad input gets one clear line, a non-zero exit, and no output file left behind."""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto as TP, helper as h

from ttfsc.cli import main


def _expect_error(capsys, argv: list[str], out: Path, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ttfsc: error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporaries
    return err


def test_missing_file(tmp_path: Path, capsys):
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["compile", str(tmp_path / "nope.onnx"), "-T", "64", "-o", str(out)], out, "nope.onnx", "no such file")


def test_not_onnx(tmp_path: Path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_text("definitely not protobuf \x00\xff")
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["compile", str(bad), "-T", "64", "-o", str(out)], out, "bad.onnx", "not a valid ONNX")


def test_bad_window(tmp_path: Path, capsys):
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["compile", str(tmp_path / "x.onnx"), "-T", "48", "-o", str(out)], out, "-T 48")


def test_window_mismatch(tmp_path: Path, capsys):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from graphs import quantized_linear_model
    model, _ = quantized_linear_model(bits=6)
    src = tmp_path / "q.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "o.onnx"
    _expect_error(capsys, ["compile", str(src), "-T", "256", "-o", str(out)], out, "64 levels", "-T 64", "--requantize")


def test_model_without_anything_to_quantize(tmp_path: Path, capsys):
    g = h.make_graph([h.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, [2, 3])], [h.make_tensor_value_info("y", TP.FLOAT, [2, 3])])
    src = tmp_path / "relu.onnx"
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 18)]), str(src))
    out = tmp_path / "o.onnx"
    assert main(["compile", str(src), "-T", "64", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ttfsc: error:" in err and "relu.onnx" in err and "Traceback" not in err
    assert not out.exists()


def test_verify_rejects_a_non_spiking_model(tmp_path: Path, capsys):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from graphs import quantized_linear_model
    model, _ = quantized_linear_model()
    src = tmp_path / "q.onnx"
    onnx.save(model, str(src))
    assert main(["verify", str(src), str(src)]) == 2
    assert "no TTFSEmit stage" in capsys.readouterr().err
