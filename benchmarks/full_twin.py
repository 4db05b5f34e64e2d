"""Perplexity of the fully quantized twin (`ttfsc quantize --full`) against FP32 and the hybrid QANN.

Each variant is quantized with the library API (same defaults as `ttfsc quantize`, plus the
variant's options), then scored with analysis/evaluate.py's GPTQ-protocol perplexity on the first
K windows. QDQ models run with ``session.disable_quant_qdq=1``: exact QDQ numerics, no fused
integer kernels (which can saturate at 8-bit activations on CPUs without VNNI).

  python benchmarks/full_twin.py --fp /tmp/s260bench/model.onnx \
      --data ../shared/data/tinystories/tinystories_val_head.txt --seqlen 256 --windows 100 \
      --work /tmp/fullbench/s260 --variant fp32 --variant hybrid --variant full --variant full:softmax=256

A variant is NAME[:OPTIONS]: NAME fp32 scores the float model, hybrid quantizes without --full,
full with it. OPTIONS are comma-separated KIND=LEVELS (--window) or abits=, method=, calib=,
smooth=, rotate=, prefix=, calib_samples=,
calib_seqlen=, and fullmethod=minmax|mse, tails=0|1 (ttfsc.quantizer.full.FULL_METHOD / SOFTMAX_TAILS). Prints one markdown row per variant.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ttfsc.analysis.evaluate import Model, corpus_perplexity, read_corpus


def open_exact(path: Path, bos: str = "auto") -> Model:
    """evaluate.open_model, but with QDQ fusion off so the QDQ math is what onnxruntime computes."""
    import onnxruntime as ort
    from ttfsc.runtime.generate import Generator
    from ttfsc.runtime.tokenizer import Llama2cTokenizer, load_tokenizer
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    tok = load_tokenizer(path)
    return Model(path, Generator(sess, path.parent), tok, isinstance(tok, Llama2cTokenizer) if bos == "auto" else bos == "yes")


def parse_variant(spec: str) -> tuple[str, dict]:
    """``full:softmax=256,abits=8`` -> ("full", {"full": True, "window": ["softmax=256"], "abits": 8})."""
    name, _, opts = spec.partition(":")
    kw: dict = {"full": name.startswith("full"), "window": []}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key in ("abits", "calib_samples", "calib_seqlen"):
            kw[key] = int(value)
        elif key in ("method", "calib", "rotate", "prefix"):
            kw[key] = value
        elif key in ("fullmethod", "tails"):
            kw[key] = value
        elif key == "smooth":
            kw[key] = float(value)
        else:
            kw["window"].append(item)
    return name, kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seqlen", type=int, required=True)
    ap.add_argument("--windows", type=int, required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--calib", default=None, help="calibration text for every quantized variant")
    ap.add_argument("--variant", action="append", required=True)
    args = ap.parse_args()
    from ttfsc.quantizer import full
    from ttfsc.quantizer.config import QuantConfig
    from ttfsc.quantizer.quantize import quantize_model
    default_full_method, default_tails = full.FULL_METHOD, full.SOFTMAX_TAILS
    text = read_corpus(args.data)
    for spec in args.variant:
        name, kw = parse_variant(spec)
        t0 = time.perf_counter()
        if name == "fp32":
            path = Path(args.fp)
        else:
            path = Path(args.work) / spec.replace("/", "_").replace(",", "+").replace(":", "_") / "model.onnx"
            if not path.exists():
                kw.setdefault("calib", args.calib)
                full.FULL_METHOD = kw.pop("fullmethod", default_full_method)
                full.SOFTMAX_TAILS = kw.pop("tails", "1" if default_tails else "0") == "1"
                quantize_model(args.fp, path, QuantConfig(**kw), log=lambda *_: None)
        tq = time.perf_counter() - t0
        r = corpus_perplexity(open_exact(path), text, args.seqlen, args.windows, first=True)
        print(f"| {spec} | {r['ppl']:.4f} | {r['tokens']} | {tq:.0f} s | {r['seconds']:.0f} s |", flush=True)
        with open(Path(args.work) / "results.jsonl", "a") as f:
            f.write(json.dumps({"variant": spec, **r, "quantize_seconds": tq}) + "\n")


if __name__ == "__main__":
    main()
