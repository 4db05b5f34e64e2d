"""A QDQ model made by onnxruntime's own quantize_static (MatMul only) compiles and verifies."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from ttfsc.cli import main
from ttfsc.compiler.verify import verify
from ttfsc.runtime.generate import Generator
from ttfsc.runtime.session import open_session


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: list[dict]):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


@pytest.fixture(scope="module")
def ort_qdq(tiny_llama_onnx: Path, tmp_path_factory) -> Path:
    gen = Generator(open_session(tiny_llama_onnx), tiny_llama_onnx.parent)
    rng = np.random.default_rng(0)
    feeds = [gen.feeds(np.concatenate([[1], rng.integers(3, 256, 31)])) for _ in range(4)]
    out = tmp_path_factory.mktemp("ortq") / "model.ortq.onnx"
    quantize_static(str(tiny_llama_onnx), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = tiny_llama_onnx.parent / name
        if src.exists():
            (out.parent / name).write_bytes(src.read_bytes())
    return out


def test_ort_qdq_compiles_at_t256_and_verifies(ort_qdq: Path, tmp_path: Path):
    out = tmp_path / "m.snn.onnx"
    assert main(["compile", str(ort_qdq), "-T", "64", "-o", str(out)]) == 2  # uint8 QDQ means T = 256
    assert main(["compile", str(ort_qdq), "-T", "256", "-o", str(out)]) == 0
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("TTFSEmit") > 0 and ops.count("TTFSReceive") > 0
    # quantize_static also quantizes the attention matmuls (two activations): those stay MatMul on decoded spikes
    assert "TTFSDecode" in ops
    r = verify(str(ort_qdq), str(out), tokens=16)
    assert r["total"]["mismatch"] == 0 and r["max_abs_logit_diff"] == 0.0 and r["greedy"]["identical"], r["total"]
