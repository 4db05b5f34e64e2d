"""ttfsc eval: perplexity windows, lm-eval-style multiple-choice scoring, metrics and input errors.

Model-based checks run the tiny seeded LLaMA (char-level tokenizer) and compare against a direct
computation from onnxruntime's logits, built here without the code under test.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ttfsc.analysis import tasks as T
from ttfsc.cli import main
from ttfsc.errors import TtfscError
from ttfsc.analysis.evaluate import open_model, perplexity, select_windows
from ttfsc.runtime.generate import Generator
from ttfsc.runtime.session import open_session

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine! "
        "Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump. ") * 6


# ---------------------------------------------------------------- direct reference

@functools.lru_cache(maxsize=2)
def _plain_session(model_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


def direct_logits(model_path: Path, ids: list[int]) -> np.ndarray:
    """Logits [seq, vocab] of ``ids`` from a plain onnxruntime session, feeds built by hand."""
    sess = _plain_session(model_path)
    feeds = {"input_ids": np.asarray([ids], dtype=np.int64)}
    names = {i.name: i for i in sess.get_inputs()}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((1, len(ids)), dtype=np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
    for name, arg in names.items():
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((1, arg.shape[1], 0, arg.shape[3]), dtype=np.float32)
    return sess.run(["logits"], feeds)[0][0].astype(np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def direct_ll(model_path: Path, ctx: list[int], cont: list[int]) -> float:
    lp = log_softmax(direct_logits(model_path, ctx + cont))
    return float(sum(lp[len(ctx) + j - 1, t] for j, t in enumerate(cont)))


@pytest.fixture(scope="module")
def model(tiny_llama_onnx):
    return open_model(tiny_llama_onnx)


@pytest.fixture(scope="module")
def scorer(model):
    return T.Scorer(model.gen, model.tok, model.bos)


# ---------------------------------------------------------------- perplexity

def test_windows_first_and_seeded_subset():
    assert select_windows(10, None) == list(range(10))
    assert select_windows(10, 3, first=True) == [0, 1, 2]
    a, b = select_windows(50, 5, seed=0), select_windows(50, 5, seed=0)
    assert a == b and len(set(a)) == 5 and a == sorted(a) and all(0 <= i < 50 for i in a)
    assert select_windows(50, 5, seed=1) != a
    assert select_windows(4, 9) == [0, 1, 2, 3]


def test_perplexity_equals_direct_computation(tiny_llama_onnx, tmp_path, model):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    seqlen = 64
    ids = model.tok.encode(TEXT, bos=False)
    total = len(ids) // seqlen
    first = perplexity(str(tiny_llama_onnx), str(path), seqlen=seqlen, windows=3, first=True)
    nll = []
    for w in range(3):
        chunk = ids[w * seqlen:(w + 1) * seqlen]
        lp = log_softmax(direct_logits(tiny_llama_onnx, chunk))
        nll += [-lp[p - 1, chunk[p]] for p in range(1, seqlen)]
    assert first["windows"] == 3 and first["total_windows"] == total and first["tokens"] == 3 * (seqlen - 1)
    assert first["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    assert first["seqlen"] == seqlen

    r1 = perplexity(str(tiny_llama_onnx), str(path), seqlen=seqlen, windows=3, seed=0)
    r2 = perplexity(str(tiny_llama_onnx), str(path), seqlen=seqlen, windows=3, seed=0)
    assert r1["ppl"] == r2["ppl"] and r1["windows"] == 3
    every = perplexity(str(tiny_llama_onnx), str(path), seqlen=seqlen)
    assert every["windows"] == total


def test_default_seqlen_is_the_models_context(tiny_llama_onnx, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text(TEXT * 2)
    r = perplexity(str(tiny_llama_onnx), str(path), windows=1, first=True)
    assert r["seqlen"] == 256  # the tiny config's max_position_embeddings, below 2048


def test_jsonl_corpus_joins_text_fields(tiny_llama_onnx, tmp_path):
    rows = [{"text": TEXT[:200]}, {"text": TEXT[200:400]}]
    path = tmp_path / "c4.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = perplexity(str(tiny_llama_onnx), str(path), seqlen=100)
    assert r["total_windows"] == 401 // 100  # 200 + " " + 200 characters, one token each


# ---------------------------------------------------------------- scoring

def test_shared_context_scoring_equals_full_sequences(tiny_llama_onnx, scorer):
    context = "Question: which is heavier?\nAnswer:"
    choices = [" a feather", " a brick of lead", " both"]
    pairs = [scorer.encode_pair(context, c) for c in choices]
    got = scorer.score(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        assert ll == pytest.approx(direct_ll(tiny_llama_onnx, ctx, cont), abs=1e-4)
        lp = direct_logits(tiny_llama_onnx, ctx + cont)
        expect_greedy = all(int(np.argmax(lp[len(ctx) + j - 1])) == t for j, t in enumerate(cont))
        assert greedy == expect_greedy


def test_shared_scoring_with_a_prefix_equals_full_runs(tiny_llama_onnx):
    """With a PrefixQuant prefix (here BOS) the shared part may be empty: rows start from its cache."""
    base = Generator(open_session(tiny_llama_onnx), tiny_llama_onnx.parent, prefix=None)
    gen = Generator(base.session, tiny_llama_onnx.parent, prefix=base.compute_prefix([1]))
    m = open_model(tiny_llama_onnx)
    sc = T.Scorer(gen, m.tok, bos=True)
    pairs = [sc.encode_pair("", c) for c in ("xyz", "abc")] + [sc.encode_pair("ab", "cd")]
    assert pairs[0][0] == []  # BOS is stripped: the prefix already holds it
    for (ctx, cont), (ll, _) in zip(pairs, sc.score(pairs)):
        lp = log_softmax(direct_logits(tiny_llama_onnx, [1] + ctx + cont))
        assert ll == pytest.approx(sum(lp[len(ctx) + j, t] for j, t in enumerate(cont)), abs=1e-4)


def test_encode_pair_moves_trailing_space_to_continuation(scorer):
    ctx, cont = scorer.encode_pair("Answer: ", "yes")
    assert scorer.tok.decode(ctx) == "Answer:" and scorer.tok.decode(cont) == " yes"


def test_acc_norm_divides_by_bytes():
    item = T._choice_item("q", ["a", "bbbb"], gold=1)
    m = T.item_metrics(item, [(-2.0, False), (-4.0, False)], "piqa")
    assert m["acc"] == 0.0 and m["acc_norm"] == 1.0  # -2/1 < -4/4
    utf8 = T._choice_item("q", ["é", "ab"], gold=0)  # 1 character but 2 bytes
    assert utf8.norm_bytes == (2, 2)
    m = T.item_metrics(utf8, [(-3.0, False), (-3.5, False)], "piqa")
    assert m["acc"] == 1.0 and m["acc_norm"] == 1.0


def test_winogrande_partial_scoring(tiny_llama_onnx, tmp_path, scorer):
    row = {"context_options": ["The trophy did not fit in the case because the trophy",
                               "The trophy did not fit in the case because the case"],
           "continuation": "was too big.", "gold": 0}
    path = tmp_path / "wino.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (item,) = T.load_task("winogrande", path)
    assert [r.context for r in item.requests] == row["context_options"]
    assert {r.continuation for r in item.requests} == {" was too big."}
    results = scorer.score_requests(item.requests)
    lls = [direct_ll(tiny_llama_onnx, *scorer.encode_pair(c, " was too big.")) for c in row["context_options"]]
    assert [ll for ll, _ in results] == pytest.approx(lls, abs=1e-4)
    m = T.item_metrics(item, results, "winogrande")
    assert m["acc"] == float(np.argmax(lls) == 0) and m["acc_norm"] == m["acc"]


def test_lambada_greedy_word_is_accurate(tiny_llama_onnx, model, scorer, tmp_path):
    """acc counts continuations that are the greedy tokens; ppl = exp(-mean log-likelihood)."""
    for context in ("the dog and the", "once upon a time", "hello world", "abc", "xyz"):
        ids = model.tok.encode(context, bos=False)
        nxt = int(np.argmax(direct_logits(tiny_llama_onnx, ids)[-1]))
        if 3 <= nxt < 98 and model.tok.encode(model.tok.decode([nxt]), bos=False) == [nxt]:
            break
    else:
        pytest.skip("the random model's greedy tokens are not printable characters")
    word = model.tok.decode([nxt])
    wrong = "q" if word != "q" else "z"
    items = [T.Item((T.Request(context, w),), 0, (1,)) for w in (word, wrong)]
    r = T.evaluate_items(scorer, items, "lambada")
    lls = [scorer.score_requests(i.requests)[0][0] for i in items]
    assert r["n"] == 2 and r["acc"] == 0.5
    assert r["ppl"] == pytest.approx(math.exp(-np.mean(lls)))
    path = tmp_path / "lambada.jsonl"
    path.write_text(json.dumps({"context": "a b", "continuation": "c"}) + "\n")
    assert T.load_task("lambada", path)[0].requests == (T.Request("a b", " c"),)


def test_stderr_formula():
    vals = [1, 0, 1, 1, 0, 1, 1, 1]
    p, n = np.mean(vals), len(vals)
    assert T.mean_stderr(vals) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert T.mean_stderr([1]) is None


# ---------------------------------------------------------------- loaders

def test_loaders_build_lm_eval_prompts(tmp_path):
    (tmp_path / "valid.jsonl").write_text(json.dumps({"goal": "Open a jar", "sol1": "twist", "sol2": "bite"}) + "\n")
    (tmp_path / "valid-labels.lst").write_text("0\n")
    (item,) = T.load_task(*T.resolve_task("piqa", tmp_path))
    assert item.requests[0] == T.Request("Question: Open a jar\nAnswer:", " twist") and item.gold == 0
    arc = tmp_path / "arc_easy.jsonl"
    arc.write_text(json.dumps({"query": "Question: Why?", "choices": ["x", "yy"], "gold": 1}) + "\n")
    (item,) = T.load_task(*T.resolve_task("arc_easy", arc))
    assert item.requests[1] == T.Request("Question: Why?\nAnswer:", " yy") and item.norm_bytes == (1, 2)
    hs = tmp_path / "hs.txt"
    hs.write_text("Cooking: A man  cuts [step] onions.\n2\na\nb\nc [title] d\nd\n")
    (item,) = T.load_task("hellaswag", hs)
    assert item.requests[0].context == "Cooking: A man cuts onions." and item.gold == 2
    assert item.requests[2].continuation == " c. d"


def test_limit_takes_the_first_items(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps({"context_options": ["a", "b"], "continuation": str(i), "gold": 0}) + "\n"
                            for i in range(5)))
    assert [i.requests[0].continuation for i in T.load_task("winogrande", path, 2)] == [" 0", " 1"]


@pytest.mark.parametrize("name,content,needle", [
    ("piqa", None, "valid-labels.lst"),
    ("arc_easy", '{"query": "Q", "choices": ["a"], "gold": 0}\nnot json\n', ":2: not valid JSON"),
    ("winogrande", '{"context_options": ["a", "b"], "gold": 0}\n', ":1: field 'continuation'"),
    ("hellaswag", "ctx\n1\na\nb\nc\n", "not a multiple of 6"),
    ("hellaswag", "ctx\nseven\na\nb\nc\nd\n", ":2: gold answer"),
])
def test_bad_task_files_name_the_file_and_line(tmp_path, name, content, needle):
    path = tmp_path / ("valid.jsonl" if name == "piqa" else "data.jsonl")
    path.write_text(content if content is not None else '{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    with pytest.raises(TtfscError) as err:
        T.load_task(*T.resolve_task(name, path))
    assert needle in str(err.value) and str(tmp_path) in str(err.value)


def test_unknown_task_and_missing_paths(tmp_path):
    with pytest.raises(TtfscError, match="unknown task 'mmlu'.*piqa"):
        T.resolve_task("mmlu", tmp_path)
    with pytest.raises(TtfscError, match="no such file"):
        T.resolve_task("piqa", tmp_path / "nope")
    assert T.task_kind("arc_easy_subset") == "arc_easy"


def test_cli_end_to_end_and_errors(tiny_llama_onnx, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    wino = tmp_path / "winogrande.jsonl"
    wino.write_text(json.dumps({"context_options": ["I like the cat", "I like the dog"],
                                "continuation": "a lot.", "gold": 1}) + "\n")
    out = tmp_path / "r.json"
    rc = main(["eval", str(tiny_llama_onnx), "--ppl", f"text={text}", "--seqlen", "64", "--windows", "2",
               "--tasks", f"winogrande={tmp_path}", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["ppl"]["text"]["windows"] == 2 and result["tasks"]["winogrande"]["n"] == 1
    assert "| winogrande | acc |" in capsys.readouterr().out
    assert main(["eval", str(tiny_llama_onnx), "--tasks", f"nope={wino}"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.onnx"), "--ppl", f"t={text}"]) == 2
    assert "missing.onnx: no such model file" in capsys.readouterr().err
    assert main(["eval", str(tiny_llama_onnx), "--ppl", f"t={tmp_path / 'none.txt'}"]) == 2
    assert "none.txt: no such text file" in capsys.readouterr().err
