"""The lm-eval backend: local yaml tasks over tiny jsonl files, run on the tiny seeded model.

lm-eval's own numbers (its request building, its metrics) are compared with ttfsc's scorer and
with a direct computation from the model's logits. Skipped only when lm_eval is not installed
(the ``[lmeval]`` extra; CI installs it).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from ttfsc.analysis import tasks as T  # noqa: E402
from ttfsc.analysis.evaluate import open_model  # noqa: E402

ITEMS = [{"question": "Question: what is red?\nAnswer:", "choices": ["a cherry", "the sky", "grass"], "gold": 0},
         {"question": "Question: which is big?\nAnswer:", "choices": ["an ant", "a whale"], "gold": 1},
         {"question": "Q: 1+1=", "choices": ["2", "three hundred"], "gold": 0}]
TEXTS = [{"text": "the cat sat on the mat. " * 3}, {"text": "a b c d e f g"}]


def _task_files(folder: Path) -> Path:
    """Two yaml tasks (multiple choice, rolling log-likelihood) over local jsonl files."""
    mc, ppl = folder / "mc.jsonl", folder / "ppl.jsonl"
    mc.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    ppl.write_text("".join(json.dumps(t) + "\n" for t in TEXTS))
    (folder / "tiny_mc.yaml").write_text(
        "task: ttfsc_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {mc}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "tiny_ppl.yaml").write_text(
        "task: ttfsc_tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {ppl}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
    return folder


@pytest.fixture()
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    return tmp_path


def test_lm_eval_scores_like_ttfsc(tiny_llama_onnx, offline_datasets):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import ttfsc.analysis.lmeval  # noqa: F401 - registers "ttfsc"
    folder = _task_files(_mkdir(offline_datasets / "tasks"))
    out = lm_eval.simple_evaluate(model="ttfsc", model_args=f"model={tiny_llama_onnx}",
                                  tasks=["ttfsc_tiny_mc", "ttfsc_tiny_ppl"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(folder)))
    m = open_model(tiny_llama_onnx)
    scorer = T.Scorer(m.gen, m.tok, m.bos)
    items = [T._choice_item(i["question"], i["choices"], i["gold"]) for i in ITEMS]
    ours = T.evaluate_items(scorer, items, "mc")
    res = out["results"]["ttfsc_tiny_mc"]
    assert res["acc,none"] == pytest.approx(ours["acc"]) and res["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    for sample in out["samples"]["ttfsc_tiny_mc"]:
        item = items[sample["doc_id"]]
        lls = [r[0][0] for r in sample["resps"]]
        assert lls == pytest.approx([ll for ll, _ in scorer.score_requests(item.requests)], abs=1e-5)

    # rolling log-likelihood: one window here, conditioned on BOS (the tiny model has no prefix)
    for sample in out["samples"]["ttfsc_tiny_ppl"]:
        text = TEXTS[sample["doc_id"]]["text"]
        ids = m.tok.encode(text, bos=False)
        logits = m.gen.logits([m.tok.bos_id] + ids).astype(np.float64)
        lp = logits - logits.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        direct = sum(lp[j, t] for j, t in enumerate(ids))
        assert sample["resps"][0][0] == pytest.approx(direct, abs=1e-4)
    words = sum(len(re.split(r"\s+", t["text"])) for t in TEXTS)  # lm-eval's word count
    total = sum(s["resps"][0][0] for s in out["samples"]["ttfsc_tiny_ppl"])
    assert out["results"]["ttfsc_tiny_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-6)


def test_generate_until_is_greedy_and_stops(tiny_llama_onnx):
    from ttfsc.analysis.lmeval import TtfscLM
    lm = TtfscLM(model=str(tiny_llama_onnx))
    m = lm.model
    prompt = "hello"
    greedy = m.tok.decode(m.gen.generate(m.tok.encode(prompt, bos=False), 8))
    assert lm.generate(prompt, {"until": [], "max_gen_toks": 8}) == greedy
    if len(greedy) > 2:
        stop = greedy[2]
        assert lm.generate(prompt, {"until": [stop], "max_gen_toks": 8}) == greedy[:greedy.index(stop)]


def test_command_line_wrapper_registers_the_model(tiny_llama_onnx, offline_datasets):
    folder = _task_files(_mkdir(offline_datasets / "tasks"))
    out = offline_datasets / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "ttfsc.analysis.lmeval", "--model_args", f"model={tiny_llama_onnx}",
                           "--tasks", "ttfsc_tiny_mc", "--include_path", str(folder), "--output_path", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = [p for p in out.rglob("results*.json")]
    assert "acc,none" in json.loads(result.read_text())["results"]["ttfsc_tiny_mc"]


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
