"""``ttfsc inspect MODEL --neurons``: check each compiled neuron's kernels against its target (Theorem 1).

A TTFSNeuron runs bit-exactly as the QANN's own float ops (or a table of them), but it also
*states* the neuron it is: input kernels eta, bias C (``c_offset``), output kernel psi and
threshold theta. Theorem 1 turns those back into a function (``ttfs.realised_function``); this
command compares it, code by code, with what the neuron is meant to compute:

* one-input elementwise neurons with a table: every input spike time, against the table (the
  QANN's own realised function, measured in onnxruntime);
* every other kind: seeded random inputs (fan-in vectors of spike times), against the float64
  target of its kind (mean of squares, log-sum-exp, product, dot product, weighted sum, ...)
  rounded to the output grid.

A code that differs where the float64 potential lies within ``BOUNDARY`` output steps of a
rounding boundary (half-way between two levels) is counted apart as a *boundary* case: the
float64 kernels and the QANN's float32 arithmetic (or an exact tie) may round either way there.
Any other difference is a real mismatch, and the command exits 1.

Known limit (measured, tests/test_inspect.py): a log-sum-exp neuron's log output kernel must
resolve ``theta - S[k] = exp(-(b - a))`` next to ``theta``; in float64 that holds for output
ranges up to ~36 e-folds (the kernels are scaled by exp(b') and stored in float64). A wider LSE
range shows up here as mismatches at its lowest codes: a property of Eq. 7's exp/log kernels
in floating point, not of the run-time neuron, which executes the QANN's own ops.
"""
from __future__ import annotations

import json

import numpy as np
import onnx

from ttfsc.errors import TtfscError
from ttfsc.modelio import Initializers, load_model
from ttfsc.neuron import NeuronSpec, is_neuron
from ttfsc.ttfs import decode_times, distance_to_tie, quantizer_codes, realised_function, times_to_codes

HELP = "check compiled TTFS neurons: the function their kernels realise (Theorem 1) vs their target"
BOUNDARY = 1e-2  # output steps from a rounding boundary within which float64 vs float32 may differ
FAN_IN_CONTEXT = 16  # keys used for a neuron whose fan-in is the (run-time) context length


def add_arguments(p) -> None:
    p.add_argument("model", help="a spiking model compiled from a fully quantized twin (quantize --full)")
    p.add_argument("--neurons", action="store_true", help="check every TTFSNeuron (the only check so far)")
    p.add_argument("--samples", type=int, default=512, help="random inputs per multi-input neuron")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def cli(args) -> int:
    if not args.neurons:
        raise TtfscError("inspect: give --neurons (the per-neuron Theorem-1 check).")
    report = inspect_neurons(load_model(args.model), args.samples, args.seed)
    if not report["neurons"]:
        raise TtfscError(f"{args.model}: no TTFSNeuron; compile a fully quantized twin (ttfsc quantize --full).")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for r in report["neurons"]:
            print(f"{r['kind']:>11} {r['target']:<15} codes {r['checked']:>6}  max code error {r['max_code_error']}  "
                  f"boundary {r['boundary']:>3}  mismatch {r['mismatch']}  {r['node']}")
        t = report["total"]
        print(f"{len(report['neurons'])} neurons, {t['checked']} codes: {t['mismatch']} real mismatches, "
              f"{t['boundary']} at rounding boundaries; max code error {t['max_code_error']}")
        print("inspect: OK" if report["ok"] else "inspect: FAILED")
    return 0 if report["ok"] else 1


def inspect_neurons(model: onnx.ModelProto, samples: int = 512, seed: int = 0) -> dict:
    inits = Initializers(model)
    rows = []
    for n in model.graph.node:
        if is_neuron(n):
            spec = NeuronSpec.from_node(n)
            rng = np.random.default_rng(seed)
            r = check_neuron(spec, n, inits, samples, rng)
            rows.append({"node": n.name, "kind": spec.kind, "target": spec.target, **r})
    total = {k: sum(r[k] for r in rows) for k in ("checked", "mismatch", "boundary")}
    total["max_code_error"] = max((r["max_code_error"] for r in rows), default=0)
    return {"neurons": rows, "total": total, "ok": total["mismatch"] == 0}


# ------------------------------------------------------------------ the check

def check_neuron(spec, node: onnx.NodeProto, inits, samples: int, rng: np.random.Generator) -> dict:
    """Realised (Theorem 1) vs intended codes for one neuron; see the module docstring."""
    if spec.kind == "elementwise":
        t_in, w, intended, v = _elementwise(spec, node, inits)
        reduce = False
    else:
        t_in, w, intended, v, reduce = _sampled(spec, samples, rng)
    e = spec.emit
    eta = [np.asarray(k, dtype=np.float64) for k in spec.eta]
    n_in = len(t_in)
    realised = realised_codes(spec, t_in, eta[:n_in] if len(eta) >= n_in else [eta[0]] * n_in,
                              list(spec.c_offset[:n_in]) if len(spec.c_offset) >= n_in else [spec.c_offset[0]] * n_in,
                              w, reduce)
    return compare_codes(realised, intended, v, e.step)


def realised_codes(spec, t_in, eta, c, w, reduce) -> np.ndarray:
    e = spec.emit
    n_in = [len(k) for k in eta]
    return realised_function(t_in, eta, c, w, n_in, np.asarray(e.psi), e.theta, e.N, e.t_ref, e.tie_rule, reduce)


def compare_codes(realised: np.ndarray, intended: np.ndarray, v: np.ndarray, step: float) -> dict:
    """Count differing codes, setting apart those whose float64 potential sits on a boundary."""
    diff = np.abs(realised.astype(np.int64) - intended.astype(np.int64))
    near = distance_to_tie(v, step) <= BOUNDARY
    bad = diff != 0
    return {"checked": int(diff.size), "mismatch": int((bad & ~(near & (diff == 1))).sum()),
            "boundary": int((bad & near & (diff == 1)).sum()), "max_code_error": int(diff.max(initial=0))}


def _out_codes(v: np.ndarray, spec) -> np.ndarray:
    """The output grid's quantizer in float64: round half even, clip to 0..N (the intended codes)."""
    st = spec.emit.stage()
    return quantizer_codes(v, spec.emit.step, st.zero_point, st.N, dtype=np.float64)


def _elementwise(spec, node, inits):
    """Every input time; intended = the table (QANN) or, without one, the float64 target rounded."""
    from ttfsc.passes.neuron_groups import eval_body_f64  # imports onnxruntime: not at `ttfsc --help`
    T = spec.windows_in[0]
    t = np.arange(T)
    x = decode_times(t, spec.steps_in[0], spec.t_refs_in[0]).astype(np.float64)
    names = [vi.name for vi in spec.body.input]
    feeds = {names[0]: x}
    for name, src in zip(names[1:], node.input[1:]):
        feeds[name] = np.asarray(inits.value(src), dtype=np.float64) if src in inits.by_name else 0.0
    v = eval_body_f64(spec.body, feeds, inits.base_dir)
    intended = times_to_codes(spec.table, spec.emit.N) if spec.table else _out_codes(v, spec)
    return [t], [1.0], intended, v


def _sampled(spec, samples: int, rng: np.random.Generator):
    """Random spike times for a fan-in vector; the kind's float64 target, rounded to the output grid."""
    k = spec.fan_in if spec.fan_in > 0 else FAN_IN_CONTEXT

    def draw(j: int, shape) -> tuple[np.ndarray, np.ndarray]:
        t = rng.integers(0, spec.windows_in[j], shape)
        return t, decode_times(t, spec.steps_in[j], spec.t_refs_in[j]).astype(np.float64)

    target = spec.target
    if target in ("mean_square", "log_sum_exp", "matmul_weights"):
        t, x = draw(0, (samples, k))
        if target == "mean_square":
            return [t], [np.full(k, 1.0 / k)], _out_codes(np.mean(x * x, -1), spec), np.mean(x * x, -1), True
        if target == "log_sum_exp":
            v = np.log(np.exp(x).sum(-1))
            return [t], [np.ones(k)], _out_codes(v, spec), v, True
        w = rng.uniform(-1, 1, (samples, k))
        v = (w * x).sum(-1)
        return [t], [w], _out_codes(v, spec), v, True
    if target in ("mul", "matmul"):  # product synapses: the weight is the other operand's value
        kk = k if target == "matmul" else 1
        (t, x), (_, y) = draw(0, (samples, kk)), draw(1, (samples, kk))
        v = (x * y).sum(-1)
        return [t], [y], _out_codes(v, spec), v, True
    if target == "rotary":  # per-position weights cos/sin on x_i and its rotate-half partner
        (t0, x0), (t1, x1) = draw(0, samples), draw(0, samples)
        ang = rng.uniform(0, 2 * np.pi, samples)
        v = x0 * np.cos(ang) + x1 * np.sin(ang)
        return [t0, t1], [np.cos(ang), np.sin(ang)], _out_codes(v, spec), v, False
    draws = [draw(j, samples) for j in range(spec.n_spike)]  # add / sub / concat: fixed weights
    w = list(spec.weights) or [1.0] * spec.n_spike
    v = sum(wj * x for wj, (_, x) in zip(w, draws))
    return [t for t, _ in draws], w, _out_codes(v, spec), v, False
