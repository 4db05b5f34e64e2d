"""``ttfsc compile``: one skeleton for every kind of spiking model, and the QC-A2S plan.

The skeleton (``compile_model``): load -> the plan prepares the model (a float model is
quantized first with A = log2(T) bits, and the user is told so) -> the plan's pipeline of passes
(ttfsc.passes.registry, where the order of the passes is declared and explained) -> checks ->
stages, latency and coverage for the report -> metadata -> save, onnx.checker, sidecars.

A plan says what one kind of neuron adds to it: ``QcCompile`` here (QC-A2S neurons, TTFS or
rate coding: ``coding="rate"`` swaps the emissions for qdq_to_rate's, the SpikeLLM-style
baseline of N = T - 1 integrate-and-fire steps whose spike counts are the same QANN codes), and
``ContinuousCompile`` (compiler/continuous.py, the TTFSFormer-style baseline).
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import networkx as nx
import onnx

from ttfsc.compiler.continuous import ContinuousCompile
from ttfsc.compiler.coverage import coverage, stages_per_block
from ttfsc.dialect import CODING_OF_EMIT, RateEmitSpec, attrs, emissions, stage_steps
from ttfsc.errors import TtfscError
from ttfsc.graph import drop_metadata, set_metadata
from ttfsc.modelio import copy_sidecars, data_file_name, load_model, model_dir, save_model
from ttfsc.neuron import NeuronSpec, is_neuron
from ttfsc.passes.qdq_to_emit import WindowMismatch
from ttfsc.passes.registry import PassOptions, run_pipeline
from ttfsc.quantizer.config import QuantConfig, compile_options
from ttfsc.quantizer.prefix import declares_prefix, input_files
from ttfsc.runtime.generate import PREFIX_FILE
from ttfsc.transaction import guard, staged, transaction
from ttfsc.ttfs import CODINGS, NEURONS, bits_for_window


def is_qdq(model: onnx.ModelProto) -> bool:
    """Whether the model quantizes activations (a QANN): a float model must be quantized first."""
    inits = {t.name for t in model.graph.initializer}
    return any(n.op_type == "QuantizeLinear" and n.input[0] not in inits for n in model.graph.node)


def run_passes(model: onnx.ModelProto, T: int | None, requantize: bool = False, coding: str = "ttfs") -> list[dict]:
    """Rewrite the QDQ ``model`` in place with the pipeline of ``coding``; return one report per pass.

    A --full twin's nonlinear/product neurons come only where the emissions reveal stage groups
    (the registry's ttfs -> ttfs_full): a hybrid compile runs exactly the passes it always did.
    """
    if coding not in CODINGS:
        raise TtfscError(f"--coding {coding!r}: choose one of {', '.join(CODINGS)}")
    return run_checked(model, coding, PassOptions(T, requantize))


def run_checked(model: onnx.ModelProto, pipeline: str, options: PassOptions) -> list[dict]:
    """A registry pipeline whose window mismatch (-T vs the QANN's width) is a user error."""
    try:
        return run_pipeline(model, pipeline, options)
    except WindowMismatch as exc:
        raise TtfscError(str(exc)) from None


def spiking_coverage(model: onnx.ModelProto, src_dir: str | None) -> tuple[dict, dict]:
    """Stages per decoder block, and which block ops are TTFS neurons (compiler/coverage.py).

    The op counts need one probe forward of the compiled model; if it cannot run (a graph that
    is not an exported LLM and has dynamic inputs), the report says why instead.
    """
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
    for n, e in emissions(model):
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


def check_rewritten(model: onnx.ModelProto, path: str) -> None:
    """Every activation quantizer must have become a stage: a QANN half converted is no SNN."""
    left = leftover_activation_qdq(model)
    if left:
        raise TtfscError(f"{path}: {len(left)} activation quantizers could not become TTFS stages "
                         f"(first: {left[0]}); see --json for the reason each was skipped.")


def check_saved(out_path: str | Path, src: str) -> None:
    """onnx.checker on the written file (by path, so external data is checked where it lives).

    Give it the staged file (``ttfsc.transaction.staged``): failing, the command's transaction
    drops the model and its data, and an older output at ``out_path`` stays as it was.
    """
    try:
        onnx.checker.check_model(str(out_path))
    except onnx.checker.ValidationError as exc:
        raise TtfscError(f"{src}: compiled graph fails onnx.checker: {str(exc).splitlines()[0]}") from None


class CompilePlan(Protocol):
    """What one kind of neuron adds to the compile skeleton; built with (T, coding, requantize,
    quant_options, log), it rejects options it cannot honour before anything is loaded."""

    pipeline: str  # a name in ttfsc.passes.registry.PIPELINES

    def prepare(self, model: onnx.ModelProto, model_path: str, out_path: str,
                qdq: bool) -> tuple[onnx.ModelProto, dict, PassOptions]:
        """The model the passes rewrite, the report's first entries, and the passes' options."""

    def check(self, model: onnx.ModelProto, model_path: str) -> None:
        """Raise TtfscError when the passes left a model that is not what this plan promises."""

    def stages(self, model: onnx.ModelProto) -> list[dict]:
        """One report entry per stage."""

    def coverage(self, model: onnx.ModelProto, src_dir: str | None) -> dict:
        """More report entries (spiking coverage), or none."""

    def metadata(self) -> tuple[tuple[str, ...], dict[str, str]]:
        """Metadata keys to drop from the source, then the entries to set."""


class QcCompile:
    """QC-A2S neurons in TTFS or rate coding: bit-exact to the QANN, which a float model gets first.

    ``T="auto"`` keeps each stage's own width from a QDQ model (mixed windows).
    """

    def __init__(self, T: int | str, coding: str, requantize: bool, quant_options: dict | None,
                 log: Callable[..., Any]):
        self.bits = _window_bits(T)
        if coding not in CODINGS:
            raise TtfscError(f"--coding {coding!r}: choose one of {', '.join(CODINGS)}")
        self.T, self.coding, self.requantize, self.log = T, coding, requantize, log
        self.quant_options = quant_options or {}
        self.pipeline = coding

    def prepare(self, model: onnx.ModelProto, model_path: str, out_path: str,
                qdq: bool) -> tuple[onnx.ModelProto, dict, PassOptions]:
        """A float model is quantized first; its QANN is kept beside the output for ``ttfsc verify``."""
        report: dict = {"input": str(model_path), "T": self.T, "coding": self.coding}
        if not qdq:
            if self.bits is None:
                raise TtfscError(f"{model_path} is a float model: -T auto needs a QDQ model whose widths it keeps. "
                                 "Give -T 2^abits (e.g. 64), or quantize first (ttfsc quantize --abits-for ...).")
            qann_path = qann_path_for(out_path)
            model, report["quantized"] = _quantize_first(model_path, qann_path, self.bits, self.quant_options,
                                                         self.log)
            report["qann"] = qann_path
        return model, report, PassOptions(None if self.bits is None else self.T, self.requantize)

    def check(self, model: onnx.ModelProto, model_path: str) -> None:
        check_rewritten(model, model_path)

    def stages(self, model: onnx.ModelProto) -> list[dict]:
        return stages(model)

    def coverage(self, model: onnx.ModelProto, src_dir: str | None) -> dict:
        per_block, cov = spiking_coverage(model, src_dir)
        return {"stages_per_block": per_block, "coverage": cov}

    def metadata(self) -> tuple[tuple[str, ...], dict[str, str]]:
        return (), {"ttfsc.T": str(self.T), "ttfsc.coding": self.coding}


#: the plan of each ``--neuron``
PLANS: dict[str, type] = {"qc": QcCompile, "continuous": ContinuousCompile}


def compile_model(model_path: str, out_path: str, T: int | str, requantize: bool = False,
                  quant_options: dict | None = None, log=print, coding: str = "ttfs", neuron: str = "qc") -> dict:
    """Compile ``model_path`` (QDQ or float) into a spiking model at ``out_path``; return the report.

    A float model is first quantized with A = log2(T) bits; that QANN is kept beside the output
    (``<out>.qann.onnx``) because it is the reference ``ttfsc verify`` needs. ``neuron="continuous"``
    builds the TTFSFormer-style baseline from a float model instead (compiler/continuous.py).
    """
    if neuron not in PLANS:
        raise TtfscError(f"--neuron {neuron!r}: choose one of {', '.join(NEURONS)}")
    plan: CompilePlan = PLANS[neuron](T, coding, requantize, quant_options, log)
    t0 = time.perf_counter()
    model = load_model(model_path)
    src_dir = model_dir(model)
    qdq = is_qdq(model)
    with transaction():  # the SNN, its data, a float model's QANN twin and the sidecars: all or nothing
        guard(compile_outputs(out_path, twin=not qdq and isinstance(plan, QcCompile), model=model),
              input_files(model, model_path))
        model, report, options = plan.prepare(model, model_path, out_path, qdq)
        report["passes"] = run_checked(model, plan.pipeline, options)
        plan.check(model, model_path)
        report["stages"] = plan.stages(model)
        report["latency_steps_per_token"] = latency_per_token(model)
        report.update(plan.coverage(model, src_dir))
        drop, entries = plan.metadata()
        if drop:
            drop_metadata(model, drop)
        set_metadata(model, entries)
        save_model(model, out_path)
        check_saved(staged(out_path), model_path)
        copy_sidecars(src_dir, str(Path(out_path).resolve().parent))
    report["compile_seconds"] = round(time.perf_counter() - t0, 2)
    return report


def compile_outputs(out_path: str, twin: bool, model: onnx.ModelProto) -> dict[Path, str]:
    """The files compile writes (``{path: what it is}``): the model, its data and, for a float model, the
    QANN twin with its data and the prefix.npz quantization may add (when the input has one of its own)."""
    out = Path(out_path)
    files = {out: "the output", out.with_name(data_file_name(out)): "the output's data file"}
    if twin:
        qann = Path(qann_path_for(out_path))
        files |= {qann: "the QANN twin", qann.with_name(data_file_name(qann)): "the QANN twin's data file"}
        if declares_prefix(model):
            files[out.with_name(PREFIX_FILE)] = "the QANN twin's prefix.npz"
    return files


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

    config = QuantConfig(**{**opts, "abits": bits})
    log(f"ttfsc: {model_path} has no activation QuantizeLinear/DequantizeLinear: quantizing it first "
        f"with A{bits} (= log2 T) activations and W{config.wbits} weights; the QANN is kept at {qpath}.")
    summary = quantize_model(model_path, qpath, config, log=log)
    return load_model(staged(qpath)), summary  # read where the transaction staged it


# quantize's options that compile forwards when it has to quantize a float model first (QuantConfig's fields)
QUANT_OPTIONS = compile_options()


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
