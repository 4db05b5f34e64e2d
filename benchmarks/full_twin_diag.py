"""Diagnosis of a --full twin without re-quantizing: which width classes cost perplexity.

  python benchmarks/full_twin_diag.py bypass  TWIN.onnx TEXT SEQLEN WINDOWS none rmsnorm_ms+rsqrt residual ...
  python benchmarks/full_twin_diag.py rewidth TWIN.onnx TEXT SEQLEN WINDOWS rmsnorm_ms=4096+rsqrt=4096 ...

``bypass K1+K2``: the quantizers of those kinds are skipped (their readers read the float tensor).
``rewidth C=LEVELS+...``: those width classes are re-gridded to LEVELS over the same clip range
(no new calibration, so no new search / tail clipping: a quick estimate of a width change).
Each spec writes a graph beside the twin (same external data), scores it on the first WINDOWS
windows with exact QDQ numerics, prints one row, and deletes the graph. kv quantizers are
never touched (they share the k/v parameters).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_twin import open_exact  # noqa: E402

from ttfsc.analysis.evaluate import corpus_perplexity, read_corpus  # noqa: E402
from ttfsc.graph import GraphIndex  # noqa: E402
from ttfsc.quantizer.full import GROUPS_META  # noqa: E402
from ttfsc.quantizer.ranges import activation_params  # noqa: E402


def width_class(q: str, kind: str) -> str:
    """The QK^T product's class is 'scores' (its Q is named after self_attn/MatMul's output)."""
    return "scores" if kind == "product" and "self_attn_MatMul_output" in q else kind


def bypass(m: onnx.ModelProto, kinds: dict[str, str], spec: str) -> None:
    drop = set(spec.split("+")) - {"none"}
    g, by_name = GraphIndex.live(m), {n.name: n for n in m.graph.node}
    for q, k in kinds.items():
        if k in drop and k != "kv":
            qn = by_name[q]
            x = g.producer[qn.input[0]].input[0]
            for dq in g.consumers[qn.output[0]]:
                for r in g.consumers.get(dq.output[0], []):
                    r.input[:] = [x if i == dq.output[0] else i for i in r.input]


def rewidth(m: onnx.ModelProto, kinds: dict[str, str], spec: str) -> None:
    want = {k: int(v).bit_length() - 1 for k, v in (x.split("=") for x in spec.split("+"))}
    g, by_name = GraphIndex.live(m), {n.name: n for n in m.graph.node}
    inits = {t.name: t for t in m.graph.initializer}
    for q, k in kinds.items():
        klass = width_class(q, k)
        if klass not in want or k == "kv":
            continue
        qn = by_name[q]
        clip = g.producer[qn.input[0]]
        lo, hi = (float(numpy_helper.to_array(inits[clip.input[i]])) for i in (1, 2))
        p = activation_params(lo, hi, want[klass])
        wide = p.N > 255
        for name, value in ((clip.input[1], np.array(p.lo, np.float32)), (clip.input[2], np.array(p.hi, np.float32)),
                            (qn.input[1], np.array(p.scale, np.float32)),
                            (qn.input[2], np.array(p.zero_point, np.uint16 if wide else np.uint8))):
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
        for n in [qn] + g.consumers[qn.output[0]]:
            n.domain = "com.microsoft" if wide else ""
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def main() -> None:
    mode, src, text, seqlen, windows, *specs = sys.argv[1:]
    src, text = Path(src), read_corpus(text)
    base = onnx.load(str(src), load_external_data=False)
    kinds = json.loads({p.key: p.value for p in base.metadata_props}[GROUPS_META])
    for spec in specs:
        m = copy.deepcopy(base)
        (bypass if mode == "bypass" else rewidth)(m, kinds, spec)
        out = src.parent / f"diag_{mode}.onnx"
        onnx.save(m, str(out))
        try:
            r = corpus_perplexity(open_exact(out), text, int(seqlen), int(windows), first=True)
        finally:
            out.unlink()
        print(f"| {mode} {spec} | {r['ppl']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
