"""Zero-shot tasks scored by log-likelihood, the way lm-evaluation-harness scores them.

Every item is a list of requests (context, continuation) and a gold index. The model's answer is
the request of highest log-likelihood of its continuation given its context (``acc``), or of
highest log-likelihood per byte of the choice text (``acc_norm``: lm-eval divides by the choice's
length, so long answers are not penalised for having more tokens).

The prompts are lm-eval's zero-shot templates:
- PIQA: "Question: {goal}\\nAnswer:" + " {sol}";
- HellaSwag: lm-eval's preprocess of "{activity}: {context}" + " {preprocessed ending}";
- ARC: "Question: {question}\\nAnswer:" + " {choice}";
- WinoGrande, partial scoring: the sentence up to the blank filled with each option is the
  context, and the rest of the sentence (the same for both) is the continuation;
- LAMBADA: the passage without its last word, then " {last word}"; accuracy = the word is the
  greedy continuation, perplexity = exp(-mean log-likelihood of the word).

Tokenization copies lm-eval's context/continuation split: trailing spaces of the context move to
the continuation, the pair is encoded whole and the continuation's tokens are what follows the
context's own encoding. Speed: the tokens shared by all requests of an item are run once and the
rest of every request runs as one batch on that (replicated) KV cache.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ttfsc.errors import TtfscError
from ttfsc.analysis.scoring import progress_bar, read_jsonl, token_logprobs
from ttfsc.runtime.tokenizer import read_text_file

TASK_NAMES = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "lambada")


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclass(frozen=True)
class Item:
    """One question: its requests, the gold index and the text lengths acc_norm divides by."""

    requests: tuple[Request, ...]
    gold: int
    norm_bytes: tuple[int, ...]


# ---------------------------------------------------------------- loaders

def _choice_item(context: str, choices: Sequence[str], gold: int) -> Item:
    """A multiple-choice item with one shared context; choices follow a single space (lm-eval)."""
    return Item(tuple(Request(context, " " + c) for c in choices), gold,
                tuple(len(c.encode("utf-8")) for c in choices))


def _gold(path: Path, lineno: int, value: Any, n: int) -> int:
    try:
        gold = int(str(value).strip())
    except ValueError:
        gold = -1
    if not 0 <= gold < n:
        raise TtfscError(f"{path}:{lineno}: gold answer {value!r} is not an index 0..{n - 1}; fix that line.")
    return gold


def load_piqa(path: Path) -> list[Item]:
    """``valid.jsonl`` ({"goal", "sol1", "sol2"}) with answers line by line in ``valid-labels.lst`` beside it."""
    labels_path = path.with_name("valid-labels.lst") if path.name == "valid.jsonl" else path.with_suffix(".lst")
    if not labels_path.is_file():
        alt = path.parent / "valid-labels.lst"
        labels_path = alt if alt.is_file() else labels_path
    if not labels_path.is_file():
        raise TtfscError(f"{labels_path}: missing PIQA answers; put valid-labels.lst (one 0/1 per line) "
                         f"beside {path.name}.")
    labels = [line for line in read_text_file(labels_path, "task file").splitlines() if line.strip()]
    ex = '{"goal": "...", "sol1": "...", "sol2": "..."}'
    rows = list(read_jsonl(path, {"goal": str, "sol1": str, "sol2": str}, ex))
    if len(labels) != len(rows):
        raise TtfscError(f"{labels_path}: {len(labels)} answers for {len(rows)} questions in {path}; "
                         "the two files must have one line per item each.")
    return [_choice_item(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], _gold(labels_path, k + 1, lab, 2))
            for k, ((_, r), lab) in enumerate(zip(rows, labels))]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: strip, WikiHow "[title]" to ". ", drop [markers], single spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[Item]:
    """6 lines per item: "activity: context", gold index 0-3, four endings."""
    lines = read_text_file(path, "task file").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TtfscError(f"{path}: {len(lines)} lines is not a multiple of 6; a HellaSwag item is 6 lines "
                         "(context, gold index 0-3, four endings). Check the end of the file.")
    items = []
    for s in range(0, len(lines), 6):
        gold = _gold(path, s + 2, lines[s + 1], 4)
        items.append(_choice_item(hellaswag_preprocess(lines[s]),
                                  [hellaswag_preprocess(e) for e in lines[s + 2:s + 6]], gold))
    return items


def load_arc(path: Path) -> list[Item]:
    """{"query": "Question: ...", "choices": [...], "gold": i}; lm-eval's prompt ends in "\\nAnswer:"."""
    items = []
    ex = '{"query": "Question: ...", "choices": ["...", "..."], "gold": 0}'
    for lineno, r in read_jsonl(path, {"query": str, "choices": list, "gold": int}, ex):
        query = r["query"].rstrip()
        if not query.startswith("Question:"):
            query = "Question: " + query
        context = query if query.endswith("Answer:") else query + "\nAnswer:"
        items.append(_choice_item(context, [str(c) for c in r["choices"]], _gold(path, lineno, r["gold"], len(r["choices"]))))
    return items


def load_winogrande(path: Path) -> list[Item]:
    """{"context_options": [2 contexts], "continuation": str, "gold": i}: partial scoring.

    The continuation is the same for every option, so acc_norm (divided by its length) equals acc.
    """
    items = []
    ex = '{"context_options": ["... Sarah", "... Maria"], "continuation": "always ...", "gold": 0}'
    for lineno, r in read_jsonl(path, {"context_options": list, "continuation": str, "gold": int}, ex):
        cont = " " + r["continuation"].strip()
        reqs = tuple(Request(str(c), cont) for c in r["context_options"])
        items.append(Item(reqs, _gold(path, lineno, r["gold"], len(reqs)), tuple(len(cont.strip().encode()) for _ in reqs)))
    return items


def load_lambada(path: Path) -> list[Item]:
    """{"context", "continuation"}: one request; a space joins them unless one side has it."""
    items = []
    for _, r in read_jsonl(path, {"context": str, "continuation": str}, '{"context": "...", "continuation": "word"}'):
        ctx, cont = r["context"], r["continuation"]
        if not ctx.endswith((" ", "\n")) and not cont.startswith((" ", "\n")):
            cont = " " + cont
        items.append(Item((Request(ctx, cont),), 0, (len(cont.encode()),)))
    return items


LOADERS: dict[str, tuple[Callable[[Path], list[Item]], tuple[str, ...]]] = {
    # name: (loader, file names tried inside a folder)
    "piqa": (load_piqa, ("valid.jsonl",)),
    "hellaswag": (load_hellaswag, ("hellaswag_val_full.txt",)),
    "arc_easy": (load_arc, ("arc_easy.jsonl",)),
    "arc_challenge": (load_arc, ("arc_challenge.jsonl",)),
    "winogrande": (load_winogrande, ("winogrande.jsonl",)),
    "lambada": (load_lambada, ("lambada_openai.jsonl", "lambada.jsonl")),
}


def task_kind(name: str) -> str:
    """The scorer a --tasks NAME selects: NAME itself or its prefix before "_"/"-" (e.g. arc_easy_dev)."""
    if name in LOADERS:
        return name
    for kind in sorted(LOADERS, key=len, reverse=True):
        if name.startswith(kind + "_") or name.startswith(kind + "-"):
            return kind
    raise TtfscError(f"unknown task {name!r}; NAME in --tasks NAME=PATH picks the format: "
                     f"{', '.join(TASK_NAMES)}.")


def resolve_task(name: str, path: str | Path) -> tuple[str, Path]:
    """(kind, data file) for --tasks NAME=PATH; PATH may be the file or the folder holding it."""
    kind = task_kind(name)
    p = Path(path)
    if p.is_dir():
        for candidate in LOADERS[kind][1]:
            if (p / candidate).is_file():
                return kind, p / candidate
        data = sorted(q for q in p.iterdir() if q.suffix in (".jsonl", ".txt") and q.is_file())
        if len(data) == 1:
            return kind, data[0]
        raise TtfscError(f"{p}: no {kind} data file found (looked for {', '.join(LOADERS[kind][1])}); "
                         f"give the file itself: --tasks {name}=FILE.")
    if not p.is_file():
        raise TtfscError(f"{p}: no such file or folder for task {name}; check the path in --tasks {name}=PATH.")
    return kind, p


def load_task(kind: str, path: Path, limit: int | None = None) -> list[Item]:
    """The items of a task file, or its first ``limit`` items (lm-eval's --limit)."""
    items = LOADERS[kind][0](Path(path))
    if not items:
        raise TtfscError(f"{path}: no items found for {kind}; check the file's format.")
    return items[:limit] if limit is not None else items


# ---------------------------------------------------------------- scoring

class Scorer:
    """Log-likelihoods of continuations under a Generator, with shared-prefix KV-cache reuse."""

    def __init__(self, gen: Any, tok: Any, bos: bool = False):
        self.gen, self.tok, self.bos = gen, tok, bos
        prefix = gen.prefix
        self.prefix_len = prefix.length if prefix is not None else 0
        self.limit = int(gen.max_positions) - self.prefix_len if gen.max_positions else None
        # conditions an empty context when the model has no prefix: lm-eval uses the EOT token
        self.start_token = tok.bos_id if tok.bos_id is not None else tok.eos_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: the context's trailing spaces go to the continuation, whose tokens are
        what the whole text's encoding has after the context's own encoding."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, bos=self.bos) if text else ([self.tok.bos_id] if self.bos else [])
        ids = self.gen.strip_bos(ids)
        return [int(t) for t in ids]

    def fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int]:
        """(tokens, index of the first scored token) after left-truncation to the context window."""
        if not ctx and self.prefix_len == 0:
            if self.start_token is None:
                raise TtfscError("empty context, no prefix and no BOS/EOS token to condition on.")
            ctx = [self.start_token]
        seq = ctx + cont
        start = len(ctx)
        if self.limit is not None and len(seq) > self.limit:
            cut = len(seq) - self.limit
            seq, start = seq[cut:], max(start - cut, 1 if self.prefix_len == 0 else 0)
        return seq, start

    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, continuation is greedy) per (context ids, continuation ids) pair.

        The tokens all sequences share (up to the shortest scored start) run once; the rest of
        every sequence runs as one right-padded batch on copies of that cache. Causal attention
        makes padding after a sequence invisible to it, so each row equals its own full run.
        """
        fitted = [self.fit(list(c), list(t)) for c, t in pairs]
        seqs = [s for s, _ in fitted]
        shared = min(_common_prefix(seqs), min(start for _, start in fitted))
        last, past = self._run_shared(seqs[0][:shared])
        rests = [s[shared:] for s in seqs]
        width = max(len(r) for r in rests)
        if width == 0:
            return [(0.0, True) for _ in pairs]
        batch = np.zeros((len(rests), width), dtype=np.int64)
        for i, r in enumerate(rests):
            batch[i, :len(r)] = r
            batch[i, len(r):] = r[-1] if r else 0
        reps = None if past is None else [(np.repeat(k, len(rests), 0), np.repeat(v, len(rests), 0)) for k, v in past]
        logits, _ = self.gen.forward(batch, reps)
        return [self._pick(last, logits[i], seqs[i], start, shared) for i, (_, start) in enumerate(fitted)]

    def _run_shared(self, ids: list[int]) -> tuple[np.ndarray | None, Any]:
        """(logits predicting the token after ``ids``, KV cache after them); the prefix's if empty."""
        if ids:
            logits, past = self.gen.forward(np.asarray([ids], dtype=np.int64), None)
            return logits[0, -1], past
        if self.gen.prefix is not None:
            return self.gen.prefix.last_logits, self.gen.start_past(1)
        return None, None

    @staticmethod
    def _pick(last: np.ndarray | None, rest_logits: np.ndarray, seq: list[int], start: int,
              shared: int) -> tuple[float, bool]:
        """Sum of log p(seq[p] | seq[:p]) for p >= start, and whether each was the argmax."""
        rows = []
        for p in range(start, len(seq)):
            rows.append(last if p == shared else rest_logits[p - shared - 1])
        if not rows:
            return 0.0, True
        rows_a = np.stack(rows)
        targets = np.asarray(seq[start:], dtype=np.int64)
        ll = float(token_logprobs(rows_a, targets).sum())
        return ll, bool(np.all(rows_a.argmax(-1) == targets))

    def score_requests(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        return self.score([self.encode_pair(r.context, r.continuation) for r in requests])


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


# ---------------------------------------------------------------- metrics

def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of a mean: sample standard deviation (n - 1) over sqrt(n), as lm-eval reports.

    For 0/1 accuracies this is sqrt(p (1 - p) / (n - 1)).
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return None
    return float(x.std(ddof=1) / math.sqrt(len(x)))


def item_metrics(item: Item, results: Sequence[tuple[float, bool]], kind: str) -> dict[str, float]:
    """acc and acc_norm of a multiple-choice item (first index wins ties), or LAMBADA's acc and ll."""
    lls = np.asarray([ll for ll, _ in results], dtype=np.float64)
    if kind == "lambada":
        return {"acc": float(results[0][1]), "ll": float(lls[0])}
    norm = lls / np.maximum(np.asarray(item.norm_bytes, dtype=np.float64), 1.0)
    return {"acc": float(np.argmax(lls) == item.gold), "acc_norm": float(np.argmax(norm) == item.gold),
            "pred": int(np.argmax(lls)), "pred_norm": int(np.argmax(norm))}


def aggregate(per_item: Sequence[dict[str, float]], kind: str) -> dict[str, Any]:
    """Means with standard errors; LAMBADA adds perplexity = exp(-mean log-likelihood)."""
    out: dict[str, Any] = {"n": len(per_item)}
    for metric in ("acc", "acc_norm"):
        if per_item and metric in per_item[0]:
            vals = [m[metric] for m in per_item]
            out[metric], out[f"{metric}_stderr"] = float(np.mean(vals)), mean_stderr(vals)
    if kind == "lambada":
        out["ppl"] = math.exp(-float(np.mean([m["ll"] for m in per_item])))
    else:  # per-item answers, so that two models (a QANN and its SNN) can be compared item by item
        out["preds"] = [m["pred"] for m in per_item]
        out["preds_norm"] = [m["pred_norm"] for m in per_item]
    return out


def evaluate_items(scorer: Scorer, items: Sequence[Item], kind: str, progress: bool = False,
                   desc: str = "") -> dict[str, Any]:
    """Score every item; the aggregate metrics plus seconds and items per second."""
    t0 = time.perf_counter()
    per_item = [item_metrics(item, scorer.score_requests(item.requests), kind)
                for item in progress_bar(items, progress, desc)]
    seconds = time.perf_counter() - t0
    out = aggregate(per_item, kind)
    out.update(seconds=seconds, items_per_s=len(items) / seconds if seconds > 0 else None)
    return out
