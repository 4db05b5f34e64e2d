"""``ttfsc compile``: order and run the passes, check the result, report stages and latency.

Order matters: activation quantizers become emissions first (qdq_to_emit), then the matmuls
that read them become receptions (decode_matmul_to_receive), then dead weight dequantizers go
(dead_code). A float model is quantized first with A = log2(T) bits, and the user is told so.
``coding="rate"`` swaps the first pass for qdq_to_rate (the SpikeLLM-style baseline: stages of
N = T - 1 integrate-and-fire steps whose spike counts are the same QANN codes).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import networkx as nx
import onnx

from ttfsc.errors import TtfscError
from ttfsc.modelio import copy_sidecars, load_model, model_dir, save_model
from ttfsc.passes.dead_code import DeadCode
from ttfsc.passes.decode_matmul_to_receive import DecodeMatMulToReceivePass
from ttfsc.passes.qdq_to_emit import QdqToEmit, WindowMismatch
from ttfsc.passes.qdq_to_rate import QdqToRate
from ttfsc.dialect import CODING_OF_EMIT, RateEmitSpec, emit_spec, stage_steps
from ttfsc.ttfs import CODINGS, DOMAIN, DOMAIN_VERSION, NEURONS, bits_for_window

EMIT_PASSES = {"ttfs": QdqToEmit, "rate": QdqToRate}


def is_qdq(model: onnx.ModelProto) -> bool:
    inits = {t.name for t in model.graph.initializer}
    return any(n.op_type == "QuantizeLinear" and n.input[0] not in inits for n in model.graph.node)


def run_passes(model: onnx.ModelProto, T: int | None, requantize: bool = False, coding: str = "ttfs") -> list[dict]:
    """Rewrite ``model`` in place; return one report per pass."""
    if coding not in EMIT_PASSES:
        raise TtfscError(f"--coding {coding!r}: choose one of {', '.join(CODINGS)}")
    reports = []
    for p in [EMIT_PASSES[coding](T, requantize), DecodeMatMulToReceivePass()]:
        try:
            reports.append(p.run(model).as_dict())
        except WindowMismatch as exc:
            raise TtfscError(str(exc)) from None
    # nonlinear/product neurons exist only in a fully quantized twin (quantize --full): a hybrid
    # compile runs (and reports) exactly the passes it always did
    later = neuron_passes() if coding == "ttfs" and has_stage_groups(model) else []
    for p in later + [DeadCode()]:
        reports.append(p.run(model).as_dict())
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return reports


def neuron_passes() -> list:
    """The passes that turn a --full twin's nonlinear/product/residual/rotary groups into neurons."""
    from ttfsc.passes.elementwise_neurons import ElementwiseNeurons
    from ttfsc.passes.kv_relay import KvRelay
    from ttfsc.passes.linear_neurons import LinearNeurons
    from ttfsc.passes.product_neurons import ProductNeurons
    from ttfsc.passes.rmsnorm_neurons import RMSNormNeurons
    from ttfsc.passes.shape_of_spikes import ShapeOfSpikes
    from ttfsc.passes.softmax_neurons import SoftmaxNeurons
    # dead code first: the groups' original float ops must be gone before shapes are re-read
    return [ElementwiseNeurons(), RMSNormNeurons(), SoftmaxNeurons(), ProductNeurons(), KvRelay(), LinearNeurons(),
            DeadCode(), ShapeOfSpikes()]


def has_stage_groups(model: onnx.ModelProto) -> bool:
    """Whether any emission is fed by float ops on decoded spikes only (a --full twin's stage group)."""
    from ttfsc.graph import GraphIndex
    from ttfsc.passes.neuron_groups import extract_group, spike_dependent
    g = GraphIndex(model)
    dep = spike_dependent(g)
    return any(extract_group(g, e, dep) is not None for e in g.nodes if e.domain == DOMAIN and e.op_type == "TTFSEmit")


def spiking_coverage(model: onnx.ModelProto, src_dir: str | None) -> tuple[dict, dict]:
    """Stages per decoder block, and which block ops are TTFS neurons (compiler/coverage.py).

    The op counts need one probe forward of the compiled model; if it cannot run (a graph that
    is not an exported LLM and has dynamic inputs), the report says why instead.
    """
    from ttfsc.compiler.coverage import coverage, stages_per_block
    try:
        cov = coverage(model, src_dir)
    except Exception as exc:  # noqa: BLE001 - a report field, never a reason to fail the compile
        cov = {"unavailable": f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return stages_per_block(model), cov


def leftover_activation_qdq(model: onnx.ModelProto) -> list[str]:
    """Activation Q/DQ the passes could not turn into spikes (must be none)."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name or n.output[0] for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in inits]


def stages(model: onnx.ModelProto) -> list[dict]:
    """One entry per emission, either coding, with the time steps it costs (``steps``)."""
    out = []
    for n in model.graph.node:
        e = emit_spec(n)
        if e is None:
            continue
        entry = {"stage": n.name, "coding": CODING_OF_EMIT[n.op_type], "steps": stage_steps(n),
                 "bits": bits_for_window(e.T), "qann_tensor": e.qann_tensor}
        if isinstance(e, RateEmitSpec):
            entry.update(threshold=e.threshold, zero_point=e.zero_point)
        else:
            entry.update(window=e.T, t_ref=e.t_ref, step=e.step)
        entry.update(_neuron_entry(n))
        out.append(entry)
    return out


def _neuron_entry(n: onnx.NodeProto) -> dict:
    """What kind of neuron a stage is (TTFSNeuron) or what an emission is for (a KV past encoder)."""
    from ttfsc.runtime.neuron import NeuronSpec, is_neuron
    from ttfsc.dialect import attrs
    if is_neuron(n):
        spec = NeuronSpec.from_node(n)
        return {"neuron": spec.kind, "target": spec.target, "fan_in": spec.fan_in}
    role = attrs(n).get("role")
    return {"role": role.decode() if isinstance(role, bytes) else role} if role else {}


def latency_per_token(model: onnx.ModelProto) -> int:
    """Time steps a token needs: the heaviest chain of stages, each costing its steps.

    A TTFS stage costs its window T, a rate stage its N steps (ttfsc.dialect.stage_steps).

    Stages on one path run in sequence (a stage receives during its predecessor's window), so
    the delay is the sum of windows along the longest path; parallel branches (q/k/v) overlap.
    Standard (not yet spiking) ops are counted as 0 steps.
    """
    g = nx.DiGraph()
    for i, n in enumerate(model.graph.node):
        w = stage_steps(n)
        g.add_node(("n", i), w=w)
        for t in n.input:
            if t:
                g.add_edge(("t", t), ("n", i))
        for t in n.output:
            g.add_edge(("n", i), ("t", t))
    for v in g.nodes:
        g.nodes[v].setdefault("w", 0)
    best: dict = {}
    for v in nx.topological_sort(g):
        preds = [best[p] for p in g.predecessors(v)]
        best[v] = (max(preds) if preds else 0) + g.nodes[v]["w"]
    return max(best.values(), default=0)


def _check_rewritten(model: onnx.ModelProto, path: str) -> None:
    left = leftover_activation_qdq(model)
    if left:
        raise TtfscError(f"{path}: {len(left)} activation quantizers could not become TTFS stages "
                         f"(first: {left[0]}); see --json for the reason each was skipped.")


def _check_saved(out_path: str, src: str) -> None:
    """onnx.checker on the written file (by path, so external data is checked where it lives)."""
    try:
        onnx.checker.check_model(str(out_path))
    except onnx.checker.ValidationError as exc:
        for p in (Path(out_path), Path(str(out_path) + ".data")):
            p.unlink(missing_ok=True)
        raise TtfscError(f"{src}: compiled graph fails onnx.checker: {str(exc).splitlines()[0]}") from None


def compile_model(model_path: str, out_path: str, T: int | str, requantize: bool = False,
                  quant_options: dict | None = None, log=print, coding: str = "ttfs", neuron: str = "qc") -> dict:
    """Compile ``model_path`` (QDQ or float) into a spiking model at ``out_path``.

    A float model is first quantized with A = log2(T) bits; that QANN is kept beside the output
    (``<out>.qann.onnx``) because it is the reference ``ttfsc verify`` needs. ``T="auto"`` keeps
    each stage's own width from a QDQ model (mixed windows). ``neuron="continuous"`` builds the
    TTFSFormer-style baseline from a float model instead (compiler/continuous.py).
    """
    if neuron != "qc":
        return _compile_other_neuron(model_path, out_path, T, requantize, quant_options, log, coding, neuron)
    bits = _window_bits(T)
    t0 = time.perf_counter()
    model = load_model(model_path)
    src_dir = model_dir(model)
    report: dict = {"input": str(model_path), "T": T, "coding": coding}
    if not is_qdq(model):
        if bits is None:
            raise TtfscError(f"{model_path} is a float model: -T auto needs a QDQ model whose widths it keeps. "
                             "Give -T 2^abits (e.g. 64), or quantize first (ttfsc quantize --abits-for ...).")
        qann_path = qann_path_for(out_path)
        model, report["quantized"] = _quantize_first(model_path, qann_path, bits, quant_options or {}, log)
        report["qann"] = qann_path
    report["passes"] = run_passes(model, None if bits is None else T, requantize, coding)
    _check_rewritten(model, model_path)
    report["stages"] = stages(model)
    report["latency_steps_per_token"] = latency_per_token(model)
    report["stages_per_block"], report["coverage"] = spiking_coverage(model, src_dir)
    _set_meta(model, T, coding)
    save_model(model, out_path)
    _check_saved(out_path, model_path)
    copy_sidecars(src_dir, str(Path(out_path).resolve().parent))
    report["compile_seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _compile_other_neuron(model_path: str, out_path: str, T: int | str, requantize: bool, quant_options: dict | None,
                          log, coding: str, neuron: str) -> dict:
    """--neuron continuous (the only other neuron): TTFS coding, no QANN, so no --requantize."""
    if neuron != "continuous":
        raise TtfscError(f"--neuron {neuron!r}: choose one of {', '.join(NEURONS)}")
    if coding != "ttfs" or requantize:
        raise TtfscError("--neuron continuous is a TTFS baseline built from the float model: "
                         "drop --coding rate / --requantize.")
    from ttfsc.compiler.continuous import compile_continuous
    return compile_continuous(model_path, out_path, T, quant_options, log)


def _window_bits(T: int | str) -> int | None:
    """Bits of a fixed window, None for 'auto'; a bad -T is a clear error."""
    if T == "auto":
        return None
    try:
        return bits_for_window(int(T))
    except ValueError as exc:
        raise TtfscError(str(exc)) from None


def qann_path_for(out_path: str) -> str:
    p = Path(out_path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return str(p.with_name(stem + ".qann.onnx"))


def _quantize_first(model_path: str, qpath: str, bits: int, opts: dict, log) -> tuple[onnx.ModelProto, dict]:
    from ttfsc.quantizer.quantize import quantize_model

    log(f"ttfsc: {model_path} has no activation QuantizeLinear/DequantizeLinear: quantizing it first "
        f"with A{bits} (= log2 T) activations and W{opts.get('wbits', 8)} weights; the QANN is kept at {qpath}.")
    summary = quantize_model(model_path, qpath, abits=bits, log=log, **opts)
    return load_model(qpath), summary


def _set_meta(model: onnx.ModelProto, T: int, coding: str = "ttfs") -> None:
    meta = {p.key: p for p in model.metadata_props}
    for key, value in (("ttfsc.T", str(T)), ("ttfsc.coding", coding)):
        entry = meta.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value


# quantize's options that compile forwards when it has to quantize a float model first
QUANT_OPTIONS = ("wbits", "method", "percentile", "calib", "calib_samples", "calib_seqlen", "prefix",
                 "rotate", "rotate_seed", "smooth", "abits_for", "online_hadamard", "weight_method")


def compile_cli(args) -> int:
    opts = {k: getattr(args, k) for k in QUANT_OPTIONS if hasattr(args, k)}
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    coding = getattr(args, "coding", "ttfs")
    neuron = getattr(args, "neuron", "qc")
    report = compile_model(args.model, args.output, args.T, args.requantize, opts, log=log, coding=coding,
                           neuron=neuron)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    rewritten = {k: v for p in report["passes"] for k, v in p["rewritten"].items()}
    steps = "/".join(map(str, sorted({s["steps"] for s in report["stages"]})))
    kind = f"TTFS stages of T={steps}" if coding == "ttfs" else f"rate-coded stages of N={steps} steps"
    kind = f"continuous-kernel {kind}" if neuron == "continuous" else kind
    print(f"compiled {args.model} -> {args.output}: {len(report['stages'])} {kind}, "
          f"latency {report['latency_steps_per_token']} time steps per token; rewrites {rewritten}; "
          f"{report['compile_seconds']} s")
    cov = report.get("coverage", {})
    if "ttfs_share_of_ops" in cov:
        print(f"spiking coverage of the decoder blocks: {cov['ttfs_share_of_ops']:.1%} of operations in TTFS "
              f"neurons; standard ops left on activations: {cov['standard_ops_on_activations'] or 'none'}")
    return 0
