"""``ttfsc verify``: run the QANN and its spiking model on the same inputs and compare.

For every TTFS stage, the spike times are turned back into codes (q = N - t) and compared with
the integer codes the QANN's QuantizeLinear produced for the same tensor. A difference at an
exact tie of the quantizer (x/scale = k + 1/2) is counted apart: it is a rounding-rule choice,
not an error. Any other difference is a real mismatch and makes the command fail. Both models
run under onnxruntime's default optimisation level, so the claim is "bit-exact against the
QANN as onnxruntime executes it" (integer kernels where it fuses them).

Rate-coded models (``compile --coding rate``) are verified the same way: a RateEmit's output
*is* the code (its spike count). Spikes per token are the model's own coding's count (TTFS: one
per neuron with t < N; rate: the sum of the counts); ``spikes_by_coding`` gives both definitions
on the same codes, so one run shows what the other coding would spend at equal accuracy.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from ttfsc.dialect import CODING_OF_EMIT, emissions
from ttfsc.errors import TtfscError
from ttfsc.graph import with_outputs
from ttfsc.modelio import Initializers, load_model, model_dir
from ttfsc.neuron import is_neuron
from ttfsc.runtime.generate import Generator
from ttfsc.runtime.session import exact_options, open_session, session_from_model
from ttfsc.runtime.tokenizer import read_text_file
from ttfsc.ttfs import codes_to_times, is_exact_tie, rate_spike_count, spike_count, times_to_codes


@dataclass
class Probe:
    """One spiking stage (TTFS or rate) and the QANN tensors it must reproduce."""

    stage: str
    spikes: str          # SNN spike-time (TTFS) or spike-count (rate) tensor
    codes: str           # QANN QuantizeLinear output
    value: str           # QANN QuantizeLinear input (for tie detection)
    scale: float
    code_min: int
    T: int
    coding: str = "ttfs"
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))

    def snn_codes(self, out: np.ndarray) -> np.ndarray:
        """The codes the stage emitted: q = N - t for spike times, the count itself for rate."""
        out = out.astype(np.int64)
        return out if self.coding == "rate" else times_to_codes(out, self.T - 1)


COUNT_KEYS = ("codes", "mismatch", "ties", "ties_seen", "spikes", "ttfs_spikes", "rate_spikes")


def find_probes(qann: onnx.ModelProto, snn: onnx.ModelProto) -> list[Probe]:
    if any(n.op_type == "ContinuousEmit" for n in snn.graph.node):
        raise TtfscError("the spiking model was compiled with --neuron continuous: its floor neurons on float ranges "
                         "are not the twin of any QANN, so there is nothing to verify; compare it with the float "
                         "model by perplexity (`ttfsc eval`, `ttfsc sweep`).")
    producers = {o: n for n in qann.graph.node for o in n.output}
    inits = Initializers(qann)
    probes = []
    for n, e in emissions(snn):
        if _attr(n, "role") == b"kv_past":
            continue  # a KV-cache past encoder: part of a cache tensor, checked through its readers
        q = producers.get(e.qann_tensor)
        if q is None or q.op_type != "QuantizeLinear":
            raise TtfscError(f"stage {n.name}: the QDQ model has no QuantizeLinear producing {e.qann_tensor!r}; "
                             "was the spiking model compiled from this QDQ model?")
        scale = float(np.asarray(inits.value(q.input[1])).reshape(()))
        probes.append(Probe(n.name, n.output[0], e.qann_tensor, q.input[0], scale, e.qann_code_min, e.T,
                            CODING_OF_EMIT[n.op_type]))
    if not probes:
        raise TtfscError("the spiking model has no TTFSEmit stage (nor RateEmit); compile it with `ttfsc compile`.")
    return probes


def _attr(node: onnx.NodeProto, name: str):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def reference_options(snn: onnx.ModelProto):
    """Session options for both sides of the comparison.

    A fully spiking model (TTFSNeuron stages, from a quantize --full twin) is compared with
    onnxruntime's QDQ fusions off on both sides: every matmul then runs in float on exact
    integer codes. Measured on SmolLM2's full twin: onnxruntime fuses the twin's linears
    (DQ -> MatMul -> Clip -> Q) into integer MatMulIntegerToFloat only when the Clip outputs are
    fetched (as probes are), and into float MatMul otherwise, so the "same" QANN rounds a few
    near-tie codes differently with and without probes (greedy diverged at token 5). With the
    fusions off the QANN is one function, and the spiking model equals it.
    """
    so = exact_options(snn)
    if any(is_neuron(n) for n in snn.graph.node):
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def _tokens(rng: np.random.Generator, n: int, vocab: int, bos: int) -> list[int]:
    return [bos] + [int(x) for x in rng.integers(3, vocab, n)]


def compare(probes: list[Probe], qann_out: dict, snn_out: dict) -> None:
    for p in probes:
        mine = p.snn_codes(snn_out[p.spikes])
        q = qann_out[p.codes].astype(np.int64) - p.code_min
        diff = mine != q
        exact = is_exact_tie(qann_out[p.value], p.scale)
        ties = diff & exact
        p.counts["ties_seen"] += int(exact.sum())
        p.counts["codes"] += int(q.size)
        p.counts["mismatch"] += int((diff & ~ties).sum())
        p.counts["ties"] += int(ties.sum())
        by_coding = {"ttfs": spike_count(codes_to_times(mine, p.T - 1), p.T), "rate": rate_spike_count(mine)}
        p.counts["ttfs_spikes"] += by_coding["ttfs"]
        p.counts["rate_spikes"] += by_coding["rate"]
        p.counts["spikes"] += by_coding[p.coding]


def _run(gen: Generator, ids: list[int], extra: list[str]) -> dict:
    """One full-sequence forward with the probe tensors fetched as well."""
    names = ["logits"] + extra
    feeds = gen.feeds(np.asarray([ids], dtype=np.int64), None)
    return dict(zip(names, gen.session.run(names, feeds)))


def verify(qdq_path: str, snn_path: str, text: str | None = None, tokens: int = 64, seed: int = 0) -> dict:
    if tokens < 1:
        raise TtfscError(f"--tokens {tokens}: give a positive number of tokens to compare, e.g. 64.")
    body = read_text_file(text, "--text") if text else None  # before the models load: a bad file fails at once
    qann, snn = load_model(qdq_path), load_model(snn_path)
    probes = find_probes(qann, snn)
    q_probes = [n for p in probes for n in (p.codes, p.value)]
    s_probes = [p.spikes for p in probes]
    q_sess = session_from_model(with_outputs(qann, q_probes), reference_options(snn))
    s_sess = open_session(with_outputs(snn, s_probes), reference_options(snn))
    q_gen, s_gen = Generator(q_sess, model_dir(qann)), Generator(s_sess, model_dir(snn))
    _check_tokens(q_gen, tokens)
    tok = _tokenizer(snn_path)
    bos = getattr(tok, "bos_id", None) or 1
    rng = np.random.default_rng(seed)
    dim = q_sess.get_outputs()[0].shape[-1]
    vocab = dim if isinstance(dim, int) and dim > 0 else _vocab(q_gen, bos)  # symbolic dims are strings
    seqs = {"random": _tokens(rng, tokens, vocab, bos)}
    if body is not None:
        if tok is None:
            raise TtfscError(f"{snn_path}: no tokenizer beside the model, so --text cannot be used; copy the "
                             "tokenizer files next to it.")
        seqs["text"] = tok.encode(body[:20000], bos=True)[:256]
    max_dlogit = 0.0
    for ids in seqs.values():
        qo = _run(q_gen, ids, q_probes)
        so = _run(s_gen, ids, s_probes)
        compare(probes, qo, so)
        max_dlogit = max(max_dlogit, float(np.abs(qo["logits"] - so["logits"]).max()))
    greedy = _greedy(qann, snn, seqs, tokens, bos)
    return _summary(probes, seqs, max_dlogit, greedy)


def _check_tokens(gen: Generator, tokens: int) -> None:
    """The random sequence (BOS + ``tokens``) must fit the context: past it the model runs on positions
    it never saw, and a huge --tokens ran onnxruntime out of memory."""
    room = gen.prompt_room()
    if room is not None and tokens > room:
        raise TtfscError(f"--tokens {tokens}: BOS + {tokens} tokens do not fit the model's context of "
                         f"{gen.max_positions} tokens (config.json, prefix included); give --tokens {room} or fewer.")


def _tokenizer(path: str):
    try:
        from ttfsc.runtime.tokenizer import load_tokenizer
        return load_tokenizer(path)
    except TtfscError:
        return None


def _vocab(gen: Generator, bos: int) -> int:
    return int(gen.logits([bos]).shape[-1])


def _greedy(qann, snn, seqs: dict, tokens: int, bos: int) -> dict:
    """Greedy generation with the production sessions (no probes) and the KV cache."""
    prompt = (seqs.get("text") or [bos])[:16]
    a = Generator(session_from_model(qann, reference_options(snn)), model_dir(qann)).generate(
        prompt, tokens, stop_at_eos=False)
    b = Generator(open_session(snn, reference_options(snn)), model_dir(snn)).generate(prompt, tokens, stop_at_eos=False)
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {"prompt_tokens": len(prompt), "tokens": len(a), "identical": a == b, "first_divergence": first}


def _summary(probes: list[Probe], seqs: dict, max_dlogit: float, greedy: dict) -> dict:
    total = {k: sum(p.counts[k] for p in probes) for k in COUNT_KEYS}
    n_tokens = sum(len(s) for s in seqs.values())
    return {
        "coding": probes[0].coding,
        "stages": [{"stage": p.stage, "T": p.T, **p.counts,
                    "mismatch_share": p.counts["mismatch"] / max(p.counts["codes"], 1),
                    "tie_share": p.counts["ties"] / max(p.counts["codes"], 1)} for p in probes],
        "total": total,
        "tokens_compared": n_tokens,
        "spikes_per_token": total["spikes"] / max(n_tokens, 1),
        "neurons_per_token": total["codes"] / max(n_tokens, 1),
        "spikes_by_coding": {c: total[f"{c}_spikes"] / max(n_tokens, 1) for c in ("ttfs", "rate")},
        "max_spikes_per_neuron": max(1 if p.coding == "ttfs" else p.T - 1 for p in probes),
        "max_abs_logit_diff": max_dlogit,
        "greedy": greedy,
        "ok": total["mismatch"] == 0 and greedy["identical"],
    }


def verify_cli(args) -> int:
    r = verify(args.qdq, args.snn, args.text, args.tokens, args.seed)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        t = r["total"]
        print(f"stages: {len(r['stages'])}; codes compared: {t['codes']} over {r['tokens_compared']} tokens")
        differing = [s for s in r["stages"] if s["mismatch"] or s["ties"]]
        for s in differing:
            print(f"  {s['stage']}: {s['mismatch_share']:.2e} of codes differ, {s['tie_share']:.2e} exact ties")
        if not differing:
            print("  every stage: 0 differing codes")
        print(f"real mismatches: {t['mismatch']}; differing exact ties counted apart: {t['ties']} "
              f"(exact ties met: {t['ties_seen']}, resolved as the QANN does)")
        print(f"max |logit diff|: {r['max_abs_logit_diff']:.3g}")
        g = r["greedy"]
        print(f"greedy {g['tokens']} tokens identical: {g['identical']}"
              + ("" if g["identical"] else f" (first divergence at token {g['first_divergence']})"))
        print(f"spikes per token ({r['coding']}): {r['spikes_per_token']:.0f} of {r['neurons_per_token']:.0f} "
              f"neurons (at most {r['max_spikes_per_neuron']} spike{'s' if r['max_spikes_per_neuron'] > 1 else ''} "
              f"each); same codes: TTFS {r['spikes_by_coding']['ttfs']:.0f}, rate {r['spikes_by_coding']['rate']:.0f}")
        print("verify: OK" if r["ok"] else "verify: FAILED")
    if not r["ok"]:
        print("ttfsc: verify found real mismatches between the spiking model and its QANN", file=sys.stderr)
    return 0 if r["ok"] else 1
