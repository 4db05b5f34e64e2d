"""``ttfsc sweep`` on the tiny model: the table has every row, and QANN and SNN perplexities agree.

The SNN is bit-exact to its QANN (QC-A2S), so their perplexities on the same windows must agree
to float rounding; the continuous baseline is measured on the same windows and is not expected
to agree with anything but, at long windows, the float model.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ttfsc.cli import main

TEXT = ("Once upon a time there was a little cat. The cat liked to play in the sun with a red ball. "
        "One day the ball rolled away and the cat ran after it, all the way to the river. ") * 8


@pytest.fixture(scope="module")
def swept(tiny_llama_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    text = out / "text.txt"
    text.write_text(TEXT)
    args = ["sweep", str(tiny_llama_onnx), "--ppl", str(text), "-T", "16,64", "--wbits", "8", "--seqlen", "64",
            "--windows", "4", "--calib-samples", "2", "--calib-seqlen", "32", "--out", str(out)]
    assert main(args) == 0
    return out, json.loads((out / "sweep.json").read_text())


def test_sweep_table_has_every_row_and_snn_equals_qann(swept):
    out, data = swept
    rows = {(r["kind"], r["T"], r["wbits"]): r for r in data["rows"]}
    assert set(rows) == {("fp", None, None), ("qann", 16, 8), ("snn", 16, 8), ("qann", 64, 8), ("snn", 64, 8),
                         ("continuous", 16, None), ("continuous", 64, None)}
    assert len({r["tokens"] for r in data["rows"]}) == 1  # every model scored on the same windows
    for T in (16, 64):
        q, s = rows[("qann", T, 8)]["ppl"], rows[("snn", T, 8)]["ppl"]
        assert np.isfinite(q) and q > 1
        assert abs(q - s) <= 1e-4 * q, (T, q, s)
        assert rows[("snn", T, 8)]["latency"] % T == 0 and rows[("snn", T, 8)]["latency"] >= T
        assert rows[("continuous", T, None)]["latency"] == rows[("snn", T, 8)]["latency"]
    md = (out / "sweep.md").read_text()
    for T in (16, 64):
        assert f"| {T} ({int(np.log2(T))}) | {rows[('snn', T, 8)]['latency']} |" in md
        assert f"{rows[('qann', T, 8)]['ppl']:.3f} | {rows[('snn', T, 8)]['ppl']:.3f}" in md
    assert md.startswith("Command: `ttfsc sweep") and "sweep.png" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_reuses_models_and_rejects_bad_T(swept, tmp_path, capsys):
    out, data = swept
    snn = out / "work" / "W8_T16" / "model.snn.onnx"
    mtime = snn.stat().st_mtime_ns
    args = ["sweep", data["model"], "--ppl", data["text"], "-T", "16", "--wbits", "8", "--seqlen", "64",
            "--windows", "2", "--no-continuous", "--out", str(out), "--name", "again"]
    assert main(args) == 0
    assert snn.stat().st_mtime_ns == mtime  # reused, not rebuilt
    args = ["sweep", data["model"], "--ppl", data["text"], "-T", "16", "--seqlen", "64", "--windows", "2",
            "--no-qann", "--out", str(out), "--name", "cont"]
    assert main(args) == 0
    kinds = [r["kind"] for r in json.loads((out / "cont.json").read_text())["rows"]]
    assert kinds == ["fp", "continuous"]
    assert "W8" not in (out / "cont.md").read_text()
    capsys.readouterr()
    assert main(["sweep", data["model"], "--ppl", data["text"], "-T", "48", "--out", str(tmp_path)]) == 2
    assert "-T: -T 48 is not 2^n" in capsys.readouterr().err
