"""Bits x T study: weight width x activation width (T = 2^abits) for one model.

For each cell it quantizes the FP32 export with ttfsc's default method (plus any extra
quantize flags given), compiles the QANN at T = 2^abits, verifies the spiking model against it,
and measures perplexity of the spiking model on the same windows as benchmarks/foundation.py.
It answers the reviewers' "how are n and T chosen": the table shows what each extra bit (a
doubled window, so doubled latency) buys in accuracy.

  python benchmarks/bits_study.py --fp /tmp/smolbench/model.onnx --data ../shared/data/wikitext-2-raw/wiki.test.hf_joined.txt --windows 3 --seqlen 2048
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import perplexity, ttfsc  # noqa: E402  (benchmarks are scripts, not a package)

from ttfsc.runtime.generate import Generator  # noqa: E402
from ttfsc.runtime.session import open_session  # noqa: E402
from ttfsc.runtime.tokenizer import load_tokenizer  # noqa: E402


def cell(fp: Path, work: Path, wbits: int, abits: int, extra: list[str], ids: list[int], windows: int,
         seqlen: int) -> dict:
    T = 1 << abits
    qdq, snn = work / f"w{wbits}a{abits}.qdq.onnx", work / f"w{wbits}a{abits}.snn.onnx"
    t0 = time.perf_counter()
    ttfsc("quantize", str(fp), "--wbits", str(wbits), "--abits", str(abits), "-o", str(qdq), *extra)
    mixed = "--abits-for" in extra  # per-stage widths: keep each stage's window
    latency = json.loads(ttfsc("compile", str(qdq), "-T", "auto" if mixed else str(T), "-o", str(snn),
                               "--json")[2])["latency_steps_per_token"]
    _, _, out = ttfsc("verify", str(qdq), str(snn), "--tokens", "16", "--json")
    ver = json.loads(out)
    ppl, _ = perplexity(Generator(open_session(snn), work), ids, windows, seqlen)
    return {"wbits": wbits, "abits": abits, "T": f"{T} (mixed)" if mixed else T, "ppl": ppl, "verify_ok": ver["ok"],
            "mismatch": ver["total"]["mismatch"], "latency": latency,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp", required=True, help="FP32 export (ttfsc export), tokenizer beside it")
    ap.add_argument("--data", required=True)
    ap.add_argument("--bos", action="store_true", help="tokenize the data with a leading BOS")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--wbits", default="8,4")
    ap.add_argument("--abits", default="4,6,8")
    ap.add_argument("--work", default=None)
    ap.add_argument("--extra", default="", help="extra quantize flags, e.g. '--calib FILE'")
    args = ap.parse_args()
    fp = Path(args.fp)
    work = Path(args.work or fp.parent / "bits")
    work.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.bin"):
        if (fp.parent / name).exists() and not (work / name).exists():
            (work / name).write_bytes((fp.parent / name).read_bytes())
    ids = load_tokenizer(fp).encode(Path(args.data).read_text(), bos=args.bos)
    fp_ppl, _ = perplexity(Generator(open_session(fp), fp.parent), ids, args.windows, args.seqlen)
    rows = [cell(fp, work, int(w), int(a), args.extra.split(), ids, args.windows, args.seqlen)
            for w in args.wbits.split(",") for a in args.abits.split(",")]
    print(f"Command: `python benchmarks/bits_study.py {' '.join(sys.argv[1:])}`\n")
    print(f"FP32 perplexity: {fp_ppl:.3f} ({args.windows} windows x {args.seqlen} tokens)\n")
    print("| W | A | T | SNN PPL | × FP32 | verify (real mismatches) | latency steps/token |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['wbits']} | {r['abits']} | {r['T']} | {r['ppl']:.3f} | {r['ppl'] / fp_ppl:.3f} | "
              f"{'OK' if r['verify_ok'] else 'FAIL'} ({r['mismatch']}) | {r['latency']} |")


if __name__ == "__main__":
    main()
