"""Low-T quality benchmark: perplexity of QDQ models quantized with and without the outlier prefix.

Each model is evaluated as a Generator sees it, so a ``prefix.npz`` beside a quantized model is
applied (its cost is reported); ``--fp-prefix`` also evaluates the float model behind a given
prefix, to separate what the prefix does to the float model from what it does to quantization.
Perplexity uses benchmarks/foundation.py's protocol (WikiText-2 test, tokenized without BOS,
non-overlapping windows, first token of each window not scored).

  python benchmarks/lowT.py --fp /tmp/smolbench/model.onnx --windows 3 \\
      --qdq minmax=/tmp/pq/a6_minmax_none/model.qdq.onnx --fp-prefix /tmp/pq/a6_minmax_prefix/prefix.npz

``--leave-float NAME=PATTERN`` (repeatable) also evaluates every QDQ model with the activation
quantizers of the tensors whose name contains PATTERN bypassed (those linears read float inputs):
which activation groups carry the error.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx  # noqa: E402
from foundation import DATA, perplexity  # noqa: E402

from ttfsc.runtime.generate import Generator, Prefix  # noqa: E402
from ttfsc.runtime.session import default_options, open_session  # noqa: E402
from ttfsc.runtime.tokenizer import load_tokenizer  # noqa: E402


def evaluate(name: str, gen: Generator, ids: list[int], windows: int, seqlen: int) -> str:
    """One markdown table row: perplexity, scored tokens, prefix cost and wall time."""
    t0 = time.perf_counter()
    ppl, n = perplexity(gen, ids, windows, seqlen)
    cost = gen.prefix_cost()
    row = (f"| {name} | {ppl:.2f} | {n} | {cost['tokens']} | {cost['kv_bytes'] / 1024:.0f} | "
           f"{time.perf_counter() - t0:.0f} |")
    print(row, flush=True)
    return row


def leave_float(model: onnx.ModelProto, pattern: str) -> onnx.ModelProto:
    """A copy of a QDQ model whose activation Clip->Q->DQ chains on tensors matching ``pattern`` are
    bypassed: their readers get the float tensor. Weights stay quantized."""
    m = copy.deepcopy(model)
    source = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type in ("Clip", "QuantizeLinear")}
    bypass = {}
    for n in m.graph.node:
        x = source.get(source.get(n.input[0], ""), "") if n.op_type == "DequantizeLinear" else ""
        if x and pattern in x:
            bypass[n.output[0]] = x
    for n in m.graph.node:
        for i, t in enumerate(n.input):
            n.input[i] = bypass.get(t, t)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp", required=True, help="float model (.onnx)")
    ap.add_argument("--qdq", action="append", default=[], help="NAME=PATH of a QDQ model (repeatable)")
    ap.add_argument("--fp-prefix", help="also evaluate the float model behind this prefix.npz")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--skip-fp", action="store_true")
    ap.add_argument("--leave-float", action="append", default=[],
                    help="NAME=PATTERN: also evaluate each QDQ model with these activations left float (repeatable)")
    args = ap.parse_args()
    ids = load_tokenizer(args.fp).encode(DATA["smollm2"].read_text(), bos=False)
    print(f"WikiText-2 test, {args.windows} windows x {args.seqlen}\n")
    print("| model | PPL | scored tokens | prefix tokens | prefix KV KiB | s |\n|---|---|---|---|---|---|")
    fp_session = open_session(args.fp, default_options())
    if not args.skip_fp:
        evaluate("FP32", Generator(fp_session, Path(args.fp).parent, prefix=None), ids, args.windows, args.seqlen)
    if args.fp_prefix:
        gen = Generator(fp_session, Path(args.fp).parent, prefix=Prefix.load(args.fp_prefix))
        evaluate("FP32 + prefix", gen, ids, args.windows, args.seqlen)
    for spec in args.qdq:
        name, path = spec.split("=", 1)
        evaluate(name, Generator(open_session(path), Path(path).parent), ids, args.windows, args.seqlen)
        if args.leave_float:
            full = onnx.load(path)  # weights in memory, so the edited copies need no external-data folder
            for lf in args.leave_float:
                group, pattern = lf.split("=", 1)
                gen = Generator(open_session(leave_float(full, pattern)), Path(path).parent)
                evaluate(f"{name}, {group} float", gen, ids, args.windows, args.seqlen)


if __name__ == "__main__":
    main()
