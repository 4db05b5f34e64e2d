"""lm-evaluation-harness backend: run any ttfsc model (float, QDQ, spiking) under ``lm_eval``.

Install the extra (``pip install -e ".[lmeval]"``), then either

  python -m ttfsc.analysis.lmeval --model ttfsc --model_args model=/path/model.snn.onnx --tasks piqa

which registers the model class and hands the command line to lm_eval's own CLI (lm-eval finds
models only through its in-process registry: it has no plugin entry point for them), or, from
Python, ``import ttfsc.analysis.lmeval`` and then ``lm_eval.simple_evaluate(model="ttfsc", ...)``.

Model arguments: ``model`` (path of the .onnx), ``bos`` (auto/yes/no, see ``ttfsc eval --bos``),
``threads`` (onnxruntime intra-op threads), ``batch_size`` (requests per run, default 16).
Scoring goes through compiler/tasks.Scorer, so requests sharing a context (the choices of one
question) run the context once and the continuations as one batch on its KV cache, and the
PrefixQuant prefix of a quantized model is applied.
"""
from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ttfsc.analysis.evaluate import open_model
from ttfsc.analysis.scoring import progress_bar
from ttfsc.analysis.tasks import Scorer

NAME = "ttfsc"


@register_model(NAME)
class TtfscLM(LM):
    """lm-eval's LM interface over a ttfsc ONNX model (greedy generation only)."""

    def __init__(self, model: str, bos: str = "auto", threads: int | str = 0, batch_size: int | str = 16,
                 max_gen_toks: int | str = 256, **_ignored: Any) -> None:
        super().__init__()
        self.model = open_model(model, bos, int(threads))
        self.scorer = Scorer(self.model.gen, self.model.tok, self.model.bos)
        self.batch = max(1, int(batch_size)) if str(batch_size).isdigit() else 16  # "auto" -> 16
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------ log-likelihood

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per request, in order.

        Requests are grouped by context so that the choices of a question share one context run.
        """
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.args[0], []).append(i)
        out: list[Any] = [None] * len(requests)
        for context, idx in progress_bar(list(groups.items()), not disable_tqdm, "ttfsc loglikelihood"):
            for s in range(0, len(idx), self.batch):
                part = idx[s:s + self.batch]
                pairs = [self.scorer.encode_pair(context, requests[i].args[1]) for i in part]
                for i, res in zip(part, self.scorer.score(pairs)):
                    out[i] = res
                    self.cache_hook.add_partial("loglikelihood", requests[i].args, res)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows, each conditioned on the token before it
        (the first on BOS/EOS or the model's prefix), as lm-eval's own rolling windows are."""
        out = []
        for req in progress_bar(requests, not disable_tqdm, "ttfsc loglikelihood_rolling"):
            out.append(self.rolling(req.args[0]))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
        return out

    def rolling(self, text: str) -> float:
        ids = [int(t) for t in self.model.tok.encode(text, bos=False)]
        width = (self.scorer.limit or 2048) - 1  # one slot for the conditioning token
        total = 0.0
        for s in range(0, len(ids), width):
            ctx = [ids[s - 1]] if s else []
            total += self.scorer.score([(ctx, ids[s:s + width])])[0][0]
        return total

    # ------------------------------------------------------------ generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first ``until`` string."""
        out = []
        for req in progress_bar(requests, not disable_tqdm, "ttfsc generate_until"):
            context, kwargs = req.args
            out.append(self.generate(context, dict(kwargs or {})))
            self.cache_hook.add_partial("generate_until", req.args, out[-1])
        return out

    def generate(self, context: str, kwargs: dict) -> str:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        ids = self.scorer.encode(context)
        if self.scorer.limit is not None:
            ids = ids[-max(1, self.scorer.limit - budget):]
        if not ids and self.model.gen.prefix is None:
            ids = [self.scorer.start_token]
        gen = self.model.gen
        new = gen.generate(ids, budget, stop_ids=set(self.model.tok.stop_ids) | gen.stop_ids)
        text = self.model.tok.decode(new)
        cuts = [text.index(u) for u in until if u and u in text]
        return text[:min(cuts)] if cuts else text


def main(argv: list[str] | None = None) -> None:
    """lm_eval's CLI with the ttfsc model registered; ``--model ttfsc`` is added if absent."""
    from lm_eval.__main__ import cli_evaluate
    args = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in args and not any(a.startswith("--model=") for a in args):
        args = ["--model", NAME] + args
    sys.argv = ["lm_eval"] + args
    cli_evaluate()


if __name__ == "__main__":
    main()
