"""The ``ttfsc`` command: one table of commands (``commands()``), each a ``Command``.

A command has its help line, a function that adds its arguments to its subparser and one that
runs it. export, quantize, compile, verify and run are defined here (their work lives in the
layers below and is imported only when the command runs, so ``ttfsc --help`` stays fast);
eval, inspect, report and sweep are defined by their own modules, which hold HELP,
add_arguments(parser) and cli(args) (``module_command``).

Every user error surfaces as one line ``ttfsc: error: ...`` and exit status 2, argument errors
included (``Parser``); an unexpected failure prints one line and exit status 3 (set TTFSC_DEBUG=1
to see the traceback). This module imports nothing heavy at its top: the command modules (numpy,
onnx) are imported inside ``main``'s try, so a Ctrl-C while they load is "interrupted", not a
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from ttfsc.errors import TtfscError
from ttfsc.transaction import exit_status, interrupts_raise


@dataclass(frozen=True)
class Command:
    """One ``ttfsc`` subcommand."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command and where its help is.

    argparse's own error prints the whole usage block (6-13 lines for compile), which buries the
    one line that says what is wrong. Subparsers are made of the same class (argparse's default).
    """

    subcommands: dict[str, argparse.ArgumentParser]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.subcommands = {}

    def error(self, message: str) -> NoReturn:
        self.exit(2, argument_error(self.prog, message) + "\n")

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001 - argparse's signature
        """As argparse, but unknown options are blamed on the subcommand they were given to."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            self.subcommands.get(getattr(ns, "cmd", None), self).error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def argument_error(prog: str, message: str) -> str:
    """``ttfsc: error: compile: <message> (see ttfsc compile -h)``, on one line."""
    command = prog.partition(" ")[2]
    where = f"{command}: " if command else ""
    return f"ttfsc: error: {where}{' '.join(message.split())} (see {prog} -h)"


def module_command(module: str) -> Command:
    """A command defined by ``module``: HELP, add_arguments(parser), cli(args); its docstring describes it."""
    mod = importlib.import_module(module)
    return Command(mod.HELP, mod.add_arguments, mod.cli, mod.__doc__)


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
        raise argparse.ArgumentTypeError(f"{text!r} is not a window: give a power of two such as 64, or auto") from None


# ---------------------------------------------------------------- export

def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Hugging Face folder, .gguf file, or llama2.c .bin")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (tokenizer is saved beside it)")
    p.add_argument("--tokenizer", help="llama2.c tokenizer.bin (default: tokenizer.bin beside SRC)")


def export(args: argparse.Namespace) -> int:
    from ttfsc.compiler.export import export_cli
    return export_cli(args)


# ---------------------------------------------------------------- quantize

def quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    _add_quant_options(p, abits_default=6, full=True)


def quantize(args: argparse.Namespace) -> int:
    from ttfsc.quantizer.quantize import quantize_cli
    return quantize_cli(args)


# ---------------------------------------------------------------- compile

def compile_arguments(p: argparse.ArgumentParser) -> None:
    from ttfsc.ttfs import CODINGS, NEURONS
    p.add_argument("model", help="QDQ .onnx (from ttfsc quantize), or a float .onnx, which is quantized first "
                   "with log2(T) activation bits (a calibration of minutes on a real LLM, as ttfsc quantize)")
    p.add_argument("-T", dest="T", type=_window, required=True,
                   help="time window (spike slots) per stage, 2^abits; 'auto' keeps each stage's own width (mixed windows)")
    p.add_argument("-o", "--output", required=True,
                   help="output .onnx path of the spiking model (a float model's QANN is kept beside it as "
                        "<output>.qann.onnx; tokenizer files are copied beside it)")
    p.add_argument("--requantize", action="store_true", help="accept a QDQ model whose width differs from log2(T) by re-gridding its activations (lossy)")
    p.add_argument("--json", action="store_true", help="print the per-pass report and TTFS stages as JSON")
    p.add_argument("--coding", choices=CODINGS, default="ttfs",
                   help="ttfs: at most one spike per neuron (default); rate: the SpikeLLM-style baseline, "
                        "an integrate-and-fire neuron counting up to T-1 spikes over T-1 steps (same QANN codes)")
    p.add_argument("--neuron", choices=NEURONS, default="qc",
                   help="qc: QC-A2S neurons, bit-exact to the QANN (default); continuous: the TTFSFormer-style "
                        "baseline from a FLOAT model (Eq. 4 kernels on min/max float ranges, tau = T/(b-a), float "
                        "weights, -T 16..8192); it floors each activation onto T levels, so compare it with the FP "
                        "model (perplexity): it is not bit-exact to any QANN and `ttfsc verify` does not apply")
    _add_quant_options(p, abits_default=None)


def compile_(args: argparse.Namespace) -> int:
    from ttfsc.compiler.pipeline import compile_cli
    return compile_cli(args)


# ---------------------------------------------------------------- verify

def verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("qdq", help="the QDQ model (QANN) the spiking model was compiled from")
    p.add_argument("snn", help="the spiking model made by ttfsc compile")
    p.add_argument("--text", help="also verify on this text file")
    p.add_argument("--tokens", type=int, default=64, help="random tokens / greedy tokens to compare (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (every stage's codes, logits, greedy tokens, spikes)")


def verify(args: argparse.Namespace) -> int:
    from ttfsc.compiler.verify import verify_cli
    return verify_cli(args)


# ---------------------------------------------------------------- run

def run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="float, QDQ or spiking .onnx model (tokenizer beside it)")
    p.add_argument("--prompt", default="", help="text to continue, after BOS (default: empty, BOS only); a prompt "
                   "that does not fit the model's context (config.json's max_position_embeddings, less the prefix, "
                   "less one token to generate) is an error, never truncated")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens to generate at most, 0 or more; generation also stops where the context ends "
                        "(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, else > 0")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="with --temperature > 0: sample from the smallest set of tokens whose probabilities sum "
                        "to P, 0 < P <= 1; 1 = all tokens (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", action="store_true", help="print spike counts and latency per token")


def run(args: argparse.Namespace) -> int:
    from ttfsc.runtime.generate import run_cli
    return run_cli(args)


# ---------------------------------------------------------------- the table

def commands() -> dict[str, Command]:
    """Every ``ttfsc`` command, in the order ``ttfsc --help`` lists them."""
    return {
        "export": Command("export a LLaMA-family checkpoint to ONNX (text-generation with past)",
                          export_arguments, export),
        "quantize": Command("static post-training quantization to a QDQ model (the QANN)", quantize_arguments,
                            quantize),
        "compile": Command("compile a QDQ (or float) model into a TTFS spiking model", compile_arguments, compile_),
        "verify": Command("check a spiking model against its quantized twin", verify_arguments, verify),
        "run": Command("generate text with a (spiking or not) ONNX model", run_arguments, run),
        "eval": module_command("ttfsc.analysis.evaluate"),
        "inspect": module_command("ttfsc.compiler.inspect"),
        "report": module_command("ttfsc.analysis.report"),
        "sweep": module_command("ttfsc.analysis.sweep"),
    }


EXAMPLES = """examples (a float model to a verified spiking model, then text from it):
  ttfsc export ckpt/ -o out/model.onnx                     HF folder, .gguf or llama2.c .bin
  ttfsc quantize out/model.onnx -o out/q/model.qdq.onnx    W8A6 QANN; minutes on a real LLM (calibration)
  ttfsc compile out/q/model.qdq.onnx -T 64 -o out/s/model.snn.onnx
  ttfsc verify out/q/model.qdq.onnx out/s/model.snn.onnx   every spike against the QANN's codes
  ttfsc run out/s/model.snn.onnx --prompt "Once upon a time"
`ttfsc compile out/model.onnx -T 64 -o ...` does quantize and compile in one step.
`ttfsc COMMAND -h` shows each command's options."""


def build_parser(table: dict[str, Command] | None = None) -> argparse.ArgumentParser:
    ap = Parser(prog="ttfsc", description="Compile quantized LLMs into TTFS spiking networks (QC-A2S).",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, cmd in (table or commands()).items():
        ap.subcommands[name] = sub.add_parser(name, help=cmd.help, description=cmd.description)
        cmd.add_arguments(ap.subcommands[name])
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; SIGINT and SIGTERM unwind it like Ctrl-C (its outputs roll back, ttfsc.transaction)
    and end it with one line and the shell's status for the signal: 130 (SIGINT), 143 (SIGTERM)."""
    with interrupts_raise():
        try:
            return _run(argv)
        except KeyboardInterrupt as exc:  # also when it comes while an error line is being printed
            print("ttfsc: interrupted", file=sys.stderr)
            return exit_status(exc)


def _run(argv: list[str] | None) -> int:
    try:
        table = commands()  # imports the command modules: inside the try, so Ctrl-C here is "interrupted"
        args = build_parser(table).parse_args(argv)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        return int(table[args.cmd].run(args) or 0)
    except TtfscError as exc:
        print(f"ttfsc: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the interface never shows a traceback
        if os.environ.get("TTFSC_DEBUG"):
            raise
        print(f"ttfsc: internal error: {exc.__class__.__name__}: {exc} (set TTFSC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3
