"""Evaluate a float, QDQ or spiking ONNX model: perplexity (GPTQ protocol) and zero-shot tasks.

One command scores all three forms of a model the same way, so that the cost of quantization and
of the spiking conversion can be read off one table (the paper's Tables 1 and 2):

  ttfsc eval model.snn.onnx --ppl wikitext2=wiki.test.hf_joined.txt --windows 10 --first \
      --tasks piqa=data/piqa arc_easy=data/arc --json out.json

Perplexity follows GPTQ: tokenize the whole text, cut it into non-overlapping windows of
``--seqlen`` tokens, PPL = exp(mean NLL over every window token but the first). Large files can be
sampled: ``--windows K`` takes a seeded random subset of K windows, ``--windows K --first`` the
first K (what the earlier benchmarks in benchmarks/ used). Multiple-choice tasks are scored by
log-likelihood as lm-evaluation-harness does (see analysis/tasks.py).

Models run through onnxruntime via runtime.generate.Generator, which adds the PrefixQuant prefix
(prefix.npz beside a quantized model) so every sequence sees what the model was calibrated with.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ttfsc.analysis import tasks
from ttfsc.analysis.scoring import progress_bar, read_jsonl, token_logprobs
from ttfsc.errors import TtfscError

HELP = "perplexity and zero-shot accuracy of a float, QDQ or spiking ONNX model"
DEFAULT_SEQLEN = 2048
BOS_CHOICES = ("auto", "yes", "no")


@dataclass
class Model:
    """An opened model: its decoding loop, tokenizer and path (what every scorer needs)."""

    path: Path
    gen: Any  # runtime.generate.Generator
    tok: Any  # runtime.tokenizer.Tokenizer
    bos: bool  # whether texts start with the BOS token

    @property
    def context(self) -> int | None:
        """Tokens a sequence may hold after the prefix (None: the model does not say)."""
        if not self.gen.max_positions:
            return None
        return int(self.gen.max_positions) - self.gen.prefix_cost()["tokens"]


def open_model(model_path: str | Path, bos: str = "auto", threads: int = 0) -> Model:
    """Open ``model_path`` (float, QDQ or spiking) with the tokenizer and prefix beside it.

    ``bos``: "auto" follows each tokenizer family's convention, which is also what our earlier
    benchmarks did: llama2.c models always start with BOS; Hugging Face tokenizers are used as
    lm-evaluation-harness uses them (no special tokens added). "yes"/"no" force it.
    ``threads``: onnxruntime intra-op threads (0 = its default, one per core). Threads never spin
    while waiting: on a shared machine spinning threads made every forward 2-3x slower.
    """
    from ttfsc.runtime.generate import Generator
    from ttfsc.runtime.session import default_options, open_session
    from ttfsc.runtime.tokenizer import Llama2cTokenizer, load_tokenizer
    if bos not in BOS_CHOICES:
        raise TtfscError(f"--bos {bos!r}: give one of {', '.join(BOS_CHOICES)}.")
    path = Path(model_path)
    if not path.is_file():
        raise TtfscError(f"{path}: no such model file. Give the path of an .onnx model (float, QDQ or spiking).")
    so = default_options()
    so.intra_op_num_threads = max(0, int(threads))
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = open_session(path, so)
    tok = load_tokenizer(path)
    use_bos = isinstance(tok, Llama2cTokenizer) if bos == "auto" else bos == "yes"
    return Model(path, Generator(session, path.parent), tok, use_bos)


# ---------------------------------------------------------------- perplexity

def read_corpus(path: str | Path, name: str = "") -> str:
    """The text of a perplexity corpus: plain text as is, jsonl as its "text" fields joined by " ".

    Joining with " " is what GPTQ does for C4 and for Penn Treebank's sentences; a PTB file of
    one sentence per line (name starting with "ptb") is joined the same way.
    """
    p = Path(path)
    if not p.is_file():
        raise TtfscError(f"{p}: no such text file. Give a plain-text file (WikiText raw, PTB lines) "
                         "or a jsonl file with a \"text\" field per line (C4).")
    if p.suffix == ".jsonl":
        return " ".join(_jsonl_texts(p))
    from ttfsc.runtime.tokenizer import read_text_file
    text = read_text_file(p, f"--ppl {name}=" if name else "--ppl")
    if name.lower().startswith("ptb"):
        return " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text


def _jsonl_texts(path: Path) -> list[str]:
    """The "text" field of every line of a C4-style jsonl file (the checked jsonl reader of scoring.py)."""
    return [row["text"] for _, row in read_jsonl(path, {"text": str}, '{"text": "..."}')]


def select_windows(total: int, windows: int | None, seed: int = 0, first: bool = False) -> list[int]:
    """Indices of the windows to score: all, the first K, or K drawn without replacement (sorted).

    The random draw depends only on (total, K, seed), so a run is repeatable and the FP, QDQ and
    spiking models of one tokenizer see the same windows.
    """
    if windows is None or windows >= total:
        return list(range(total))
    if windows < 1:
        raise TtfscError(f"--windows {windows}: give a positive number of windows.")
    if first:
        return list(range(windows))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(total, size=windows, replace=False))


def window_nll(model: Model, chunks: np.ndarray) -> float:
    """Summed NLL of every token but the first of each row of ``chunks`` [batch, seqlen]."""
    logits = model.gen.logits(chunks)
    total = 0.0
    for row, ids in zip(logits, chunks):
        total -= float(token_logprobs(row[:-1], ids[1:]).sum())
    return total


def default_seqlen(model: Model) -> int:
    """The smaller of 2048 and the model's context (what is left of it after the prefix)."""
    return min(DEFAULT_SEQLEN, model.context) if model.context else DEFAULT_SEQLEN


def corpus_perplexity(model: Model, text: str, seqlen: int | None = None, windows: int | None = None,
                      seed: int = 0, first: bool = False, progress: bool = False, label: str = "") -> dict:
    """Perplexity of an opened model on ``text`` (see :func:`perplexity`)."""
    seqlen = seqlen or default_seqlen(model)
    if model.context and seqlen > model.context:
        raise TtfscError(f"--seqlen {seqlen} exceeds the model's context of {model.context} tokens "
                         f"(after its prefix); give --seqlen {model.context} or less.")
    if seqlen < 2:
        raise TtfscError(f"--seqlen {seqlen}: a window needs at least 2 tokens.")
    ids = model.tok.encode(text, bos=model.bos)
    total = len(ids) // seqlen
    if total == 0:
        raise TtfscError(f"{label or 'text'}: {len(ids)} tokens, fewer than one window of {seqlen}; "
                         "give a longer text or a smaller --seqlen.")
    chosen = select_windows(total, windows, seed, first)
    batch = max(1, DEFAULT_SEQLEN // seqlen)  # a few short windows per run; long ones one at a time
    nll, t0 = 0.0, time.perf_counter()
    for s in progress_bar(range(0, len(chosen), batch), progress, f"ppl {label}"):
        rows = np.asarray([ids[w * seqlen:(w + 1) * seqlen] for w in chosen[s:s + batch]], dtype=np.int64)
        nll += window_nll(model, rows)
    scored = len(chosen) * (seqlen - 1)
    return {"ppl": math.exp(nll / scored), "nll": nll / scored, "tokens": scored, "windows": len(chosen),
            "total_windows": total, "seqlen": seqlen, "first": bool(first), "seed": seed,
            "seconds": time.perf_counter() - t0}


def perplexity(model_path: str, text_path: str, seqlen: int | None = None, windows: int | None = None,
               seed: int = 0, first: bool = False, bos: str = "auto") -> dict:
    """GPTQ-protocol perplexity of the ONNX model at ``model_path`` on the corpus at ``text_path``.

    The text is tokenized whole and cut into non-overlapping windows of ``seqlen`` tokens (default:
    the smaller of 2048 and the model's context); ``windows`` picks K of them (a seeded random
    subset, or the first K with ``first``). Returns {"ppl", "nll" (mean per scored token),
    "tokens" (scored), "windows", "total_windows", "seqlen", "first", "seed", "seconds"}.
    """
    model = open_model(model_path, bos)
    return corpus_perplexity(model, read_corpus(text_path), seqlen, windows, seed, first, label=str(text_path))


# ---------------------------------------------------------------- command line

def _spec(text: str) -> tuple[str, str]:
    """NAME=PATH."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=PATH, e.g. piqa=/data/piqa")
    return name, path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="float, QDQ or spiking .onnx model (tokenizer, config.json, prefix.npz beside it)")
    p.add_argument("--ppl", type=_spec, nargs="+", action="extend", default=[], metavar="NAME=PATH",
                   help="perplexity corpus: plain text (WikiText raw, PTB lines if NAME starts with ptb) "
                        "or jsonl with a \"text\" field (C4)")
    p.add_argument("--tasks", type=_spec, nargs="+", action="extend", default=[], metavar="NAME=PATH",
                   help="zero-shot task; NAME picks the format and scorer: piqa, hellaswag, arc_easy, "
                        "arc_challenge, winogrande, lambada; PATH is its file or folder")
    p.add_argument("--seqlen", type=int, default=None, help="perplexity window (default: min(2048, context))")
    p.add_argument("--windows", type=int, default=None, help="score K windows (default: all)")
    p.add_argument("--first", action="store_true", help="with --windows: the first K windows, not a random subset")
    p.add_argument("--seed", type=int, default=0, help="seed of the random window subset")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--bos", default="auto", choices=BOS_CHOICES,
                   help="start texts with BOS: auto = llama2.c models yes, Hugging Face tokenizers no (lm-eval)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")


def cli(args: argparse.Namespace) -> int:
    if not args.ppl and not args.tasks:
        raise TtfscError("nothing to evaluate: give --ppl NAME=PATH and/or --tasks NAME=PATH.")
    if args.limit is not None and args.limit < 1:
        raise TtfscError(f"--limit {args.limit}: give a positive number of items.")
    specs = [(name, tasks.resolve_task(name, path)) for name, path in args.tasks]  # fail fast on bad names
    corpora = [(name, read_corpus(path, name)) for name, path in args.ppl]
    loaded = [(name, kind, tasks.load_task(kind, path, args.limit)) for name, (kind, path) in specs]  # bad files too
    model = open_model(args.model, args.bos, args.threads)
    if args.json:  # before the long part: a --json that cannot be written, or is an input, fails now
        check_json_output(args.json, args.model, [p for _, p in args.ppl] + [p for _, p in args.tasks])
    result: dict[str, Any] = {"model": str(args.model), "bos": model.bos, "ppl": {}, "tasks": {}}
    for name, text in corpora:
        result["ppl"][name] = corpus_perplexity(model, text, args.seqlen, args.windows, args.seed, args.first,
                                                progress=True, label=name)
    for name, kind, items in loaded:
        result["tasks"][name] = tasks.evaluate_items(tasks.Scorer(model.gen, model.tok, model.bos), items, kind,
                                                 progress=True, desc=name)
    print(render_markdown(result))
    if args.json:
        write_json(args.json, result)
    return 0


def check_json_output(path: str | Path, model_path: str | Path, data: list[str | Path]) -> None:
    """--json must land in a writable folder and must not be the model, its files or a data file."""
    from ttfsc.modelio import load_model, model_files
    from ttfsc.transaction import guard
    inputs: dict[Path, str] = {Path(p): "the data file" for p in data}
    inputs |= model_files(load_model(model_path), model_path)
    guard({Path(path): "the --json output"}, inputs, flag="--json")


def write_json(path: str | Path, result: dict) -> None:
    from ttfsc.modelio import atomic_outputs
    with atomic_outputs(path) as (tmp,):
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")


def render_markdown(result: dict) -> str:
    """One table row per perplexity corpus and per task metric, with its standard error."""
    lines = [f"Model: `{result['model']}`", "", "| data | metric | value | ± stderr | n |", "|---|---|---|---|---|"]
    for name, r in result["ppl"].items():
        how = "all" if r["windows"] == r["total_windows"] else "first" if r["first"] else f"seed {r['seed']}"
        lines.append(f"| {name} | ppl ({r['windows']}/{r['total_windows']} windows x {r['seqlen']}, {how}) | "
                     f"{r['ppl']:.3f} | | {r['tokens']} tokens |")
    for name, r in result["tasks"].items():
        for metric in ("acc", "acc_norm", "ppl"):
            if metric in r:
                err = r.get(f"{metric}_stderr")
                value = f"{r[metric]:.4f}" if metric != "ppl" else f"{r[metric]:.3f}"
                lines.append(f"| {name} | {metric} | {value} | {'' if err is None else f'{err:.4f}'} | {r['n']} |")
    return "\n".join(lines)
