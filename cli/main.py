"""The ``ttfsc`` command: export, quantize, compile, verify, run, and the commands in COMMAND_MODULES.

Every user error surfaces as one line ``ttfsc: error: ...`` and exit status 2; an unexpected
failure prints one line and exit status 3 (set TTFSC_DEBUG=1 to see the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ttfsc.errors import TtfscError


def _add_quant_options(p: argparse.ArgumentParser, abits_default: int | None, full: bool = False) -> None:
    """The quantization options, generated from QuantConfig's fields (ttfsc.quantizer.config.add_arguments)."""
    from ttfsc.quantizer.config import add_arguments
    add_arguments(p, abits_default, full=full)


def _window(text: str) -> int | str:
    """-T takes a number, or 'auto' for per-stage windows read from the QDQ model."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-T {text!r}: give a power of two such as 64, or auto") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ttfsc", description="Compile quantized LLMs into TTFS spiking networks (QC-A2S).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("export", help="export a LLaMA-family checkpoint to ONNX (text-generation with past)")
    p.add_argument("src", help="Hugging Face folder, .gguf file, or llama2.c .bin")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (tokenizer is saved beside it)")
    p.add_argument("--tokenizer", help="llama2.c tokenizer.bin (default: tokenizer.bin beside SRC)")

    p = sub.add_parser("quantize", help="static post-training quantization to a QDQ model (the QANN)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    _add_quant_options(p, abits_default=6, full=True)

    p = sub.add_parser("compile", help="compile a QDQ (or float) model into a TTFS spiking model")
    p.add_argument("model")
    p.add_argument("-T", dest="T", type=_window, required=True,
                   help="time window (spike slots) per stage, 2^abits; 'auto' keeps each stage's own width (mixed windows)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--requantize", action="store_true", help="accept a QDQ model whose width differs from log2(T) by re-gridding its activations (lossy)")
    p.add_argument("--json", action="store_true", help="print the per-pass report and TTFS stages as JSON")
    p.add_argument("--coding", choices=("ttfs", "rate"), default="ttfs",
                   help="ttfs: at most one spike per neuron (default); rate: the SpikeLLM-style baseline, "
                        "an integrate-and-fire neuron counting up to T-1 spikes over T-1 steps (same QANN codes)")
    p.add_argument("--neuron", choices=("qc", "continuous"), default="qc",
                   help="qc: QC-A2S neurons, bit-exact to the QANN (default); continuous: the TTFSFormer-style "
                        "baseline from a FLOAT model (Eq. 4 kernels on min/max float ranges, tau = T/(b-a), float "
                        "weights, -T 16..8192); it floors each activation onto T levels, so compare it with the FP "
                        "model (perplexity): it is not bit-exact to any QANN and `ttfsc verify` does not apply")
    _add_quant_options(p, abits_default=None)

    p = sub.add_parser("verify", help="check a spiking model against its quantized twin")
    p.add_argument("qdq")
    p.add_argument("snn")
    p.add_argument("--text", help="also verify on this text file")
    p.add_argument("--tokens", type=int, default=64, help="random tokens / greedy tokens to compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("run", help="generate text with a (spiking or not) ONNX model")
    p.add_argument("model")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", action="store_true", help="print spike counts and latency per token")
    for name, module in COMMAND_MODULES.items():
        mod = importlib.import_module(module)
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.__doc__))
    return ap


# Commands that own their arguments: each module defines HELP, add_arguments(parser) and cli(args).
# Keep heavy imports inside those modules' functions so that `ttfsc --help` stays fast.
COMMAND_MODULES: dict[str, str] = {
    "eval": "ttfsc.analysis.evaluate",
    "inspect": "ttfsc.compiler.inspect",
    "report": "ttfsc.analysis.report",
    "sweep": "ttfsc.analysis.sweep",
}


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "export":
        from ttfsc.compiler.export import export_cli
        return export_cli(args)
    if args.cmd == "quantize":
        from ttfsc.quantizer.quantize import quantize_cli
        return quantize_cli(args)
    if args.cmd == "compile":
        from ttfsc.compiler.pipeline import compile_cli
        return compile_cli(args)
    if args.cmd == "verify":
        from ttfsc.compiler.verify import verify_cli
        return verify_cli(args)
    if args.cmd == "run":
        from ttfsc.runtime.generate import run_cli
        return run_cli(args)
    if args.cmd in COMMAND_MODULES:
        return importlib.import_module(COMMAND_MODULES[args.cmd]).cli(args)
    raise TtfscError(f"unknown command {args.cmd}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return int(_dispatch(args) or 0)
    except TtfscError as exc:
        print(f"ttfsc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ttfsc: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the interface never shows a traceback
        if os.environ.get("TTFSC_DEBUG"):
            raise
        print(f"ttfsc: internal error: {exc.__class__.__name__}: {exc} (set TTFSC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


