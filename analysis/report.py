"""``ttfsc report``: latency, spikes, operations, energy and error of a spiking model, from a real run.

The spiking model runs once on the given text with every stage's potential and spike output
fetched (as ``ttfsc verify``'s probes do); the float reference (the QANN with its activation
Clip -> QuantizeLinear -> DequantizeLinear chains bypassed: float activations, same weights)
runs on the same tokens. Shapes of the float ops still in the graph come from further runs of
the spiking model (and of the QANN, for the QANN's own float ops), so attention's cost grows
with the text's real length. TTFSNeuron stages (fully spiking compiles of ``quantize --full``
twins) are counted by their synapses: see ``ttfsc.analysis.energy``. The counting rules
and energy constants live in ``ttfsc.analysis.energy``; the raster and membrane traces are
stepped by the reference simulator (``ttfsc.simulator``) on one stage's real weights and
input spikes, and the report states whether they reproduce the runtime's numbers.

Output: ``DIR/report.md``, ``DIR/report.json`` and ``DIR/*.png``, written into a staged folder
beside DIR that replaces it at the end (ttfsc.transaction), so a failure leaves no half-written
report. DIR must be new or an earlier report: it is replaced whole.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ttfsc.analysis.energy import (
    Counts, EnergyConstants, INT_PRICES, E_AC_PJ, E_BIT_PJ, E_MAC_PJ, E_MUL_PJ, E_STATIC_PJ, REDUCE_OPS,
    FLOAT_OP_COST, bits_per_spike, dense_macs, float_op_macs, neuron_fan_in,
    neuron_synaptic, neuron_updates, qann_energy, receive_acs, silent_of, snn_energy, spikes_of)
from ttfsc.dialect import (CODING_OF_EMIT, RATE_RECEIVE, RECEIVE, RateEmitSpec, RateReceiveSpec, ReceiveSpec,
                           emissions, stage_steps)
from ttfsc.errors import TtfscError
from ttfsc.graph import with_outputs
from ttfsc.modelio import Initializers, load_model, model_dir, model_files
from ttfsc.neuron import NeuronSpec, is_neuron
from ttfsc.transaction import check_writable, refuse_replacing_folder, transaction, writing
from ttfsc.ttfs import DOMAIN, clipping_term, decode_counts, decode_times, emit_ramp, grid_terms, receive_bias

HELP = "markdown report with plots: latency, spikes, AC/MAC counts, energy vs the QANN, error vs Theorem 3"
CONTINUOUS_T = (4096, 8192)   # TTFSFormer-style continuous-time conversion, for comparison
SHAPE_BATCH = 300             # tensors fetched per shape run (bounds the memory one run holds)


def add_arguments(p) -> None:
    p.add_argument("model", help="spiking model (.snn.onnx) compiled by `ttfsc compile`")
    p.add_argument("--text", required=True, help="plain-text file to run on")
    p.add_argument("--out", help="output folder (default: <model>.report beside the model)")
    p.add_argument("--qann", help="the QDQ model it was compiled from (default: a sibling *.qdq.onnx or *.qann.onnx)")
    p.add_argument("--tokens", type=int, default=256, help="tokens of the text to run (default 256)")
    p.add_argument("--e-ac", type=float, default=E_AC_PJ, help=f"pJ per accumulate (default {E_AC_PJ}, 45 nm fp32 add)")
    p.add_argument("--e-mac", type=float, default=E_MAC_PJ, help=f"pJ per multiply-accumulate (default {E_MAC_PJ}, 45 nm)")
    p.add_argument("--e-mul", type=float, default=E_MUL_PJ,
                   help=f"pJ per multiplication of a product synapse (TTFSNeuron; default {E_MUL_PJ}, 45 nm fp32 mult)")
    p.add_argument("--e-mac-dense", type=float, default=None,
                   help="pJ per MAC of the QANN's integer weight MatMuls (default: --e-mac)")
    p.add_argument("--e-bit", type=float, default=E_BIT_PJ,
                   help=f"pJ per bit of spike-time / activation storage and routing (default {E_BIT_PJ}, 45 nm SRAM)")
    p.add_argument("--e-static", type=float, default=E_STATIC_PJ,
                   help=f"pJ of leakage per neuron per time step (default {E_STATIC_PJ}: not modelled, line still shown)")
    p.add_argument("--trace-stage", help="stage (name substring) for the raster and membrane traces (default: the first)")
    p.add_argument("--neurons", type=int, default=6, help="neurons shown in the membrane traces")


# ---------------------------------------------------------------- inputs

def find_qann(snn_path: Path) -> Path:
    """The QDQ model beside ``snn_path``: <stem>.qdq.onnx / .qann.onnx, else the only such sibling."""
    name = snn_path.name
    stems = [name[: -len(s)] for s in (".snn.onnx", ".onnx") if name.endswith(s)]
    for stem in stems:
        for suffix in (".qdq.onnx", ".qann.onnx", ".snn.qann.onnx"):
            cand = snn_path.with_name(stem + suffix)
            if cand.is_file():
                return cand
    found = sorted(set(snn_path.parent.glob("*.qdq.onnx")) | set(snn_path.parent.glob("*.qann.onnx")))
    if len(found) == 1:
        return found[0]
    what = "none" if not found else f"{len(found)} ({', '.join(f.name for f in found[:4])})"
    raise TtfscError(f"{snn_path}: cannot tell which QDQ model it was compiled from: *.qdq.onnx / *.qann.onnx "
                     f"beside it: {what}. Give it with --qann PATH.")


def read_text(path: str) -> str:
    from ttfsc.runtime.tokenizer import read_text_file
    p = Path(path)
    text = read_text_file(p, "--text")[:400_000]  # missing, binary or non-UTF-8: one clear line
    if not text.strip():
        raise TtfscError(f"{p}: the text file is empty. Give --text a file with some text.")
    return text


@dataclass
class Stage:
    """One emission node, the tensors that carry it, and the QANN/float tensor it stands for."""

    name: str
    kind: str
    coding: str
    T: int            # code levels (TTFS window; rate: steps + 1)
    steps: int        # time steps it costs (latency)
    v: str | None     # potential (emit input); None for a TTFSNeuron (its potential stays inside the node)
    out: str          # spike times / counts
    x: str | None     # the un-quantized tensor in the float reference; None: none (a KV past encoder)
    step: float       # value of one code step
    t_ref: int        # TTFS: value 0 sits at t_ref; rate: unused
    zero_point: int
    a: float
    b: float
    spec: object


def _kind(name: str) -> str:
    """Stage family: the name without its layer number (one row per family in the summary)."""
    return re.sub(r"layers[._]\d+", "layers.*", name).replace("_QuantizeLinear/emit", "").replace("/emit", "")


def find_stages(snn: onnx.ModelProto, qann: onnx.ModelProto | None, snn_path: str) -> list[Stage]:
    """Every emission of ``snn``; with ``qann``, also the float tensor each stands for (else its potential)."""
    producers = {o: n for n in qann.graph.node for o in n.output} if qann is not None else None
    out = []
    for n, e in emissions(snn):
        if CODING_OF_EMIT[n.op_type] not in ("ttfs", "rate"):
            raise TtfscError(f"{snn_path}: stage {n.name} is {CODING_OF_EMIT[n.op_type]}-coded; `ttfsc report` covers "
                             "TTFS and rate models (compile --coding ttfs or rate from a QDQ model).")
        v = None if is_neuron(n) else n.input[0]
        if producers is None:
            x = v
        else:  # a KV-cache past encoder (kv_relay) stands for no QANN tensor of its own
            x = _float_tensor(n.name, e.qann_tensor, producers) if e.qann_tensor else None
        rs = e.stage()
        if isinstance(e, RateEmitSpec):
            step, t_ref = e.threshold, 0
        else:
            step, t_ref = e.step, e.t_ref
        a, b = rs.clip_bounds()
        out.append(Stage(n.name, _kind(n.name), CODING_OF_EMIT[n.op_type], e.T, stage_steps(n), v,
                         n.output[0], x, float(step), t_ref, rs.zero_point, float(a), float(b), e))
    if not out:
        raise TtfscError(f"{snn_path}: not a spiking model (no TTFSEmit or RateEmit stage). "
                         "Compile it first: ttfsc compile MODEL.qdq.onnx -T 64 -o MODEL.snn.onnx")
    return out


def _float_tensor(stage: str, qann_tensor: str, producers: dict) -> str:
    """The quantizer's input before its own Clip to [a, b]: the float value the stage stands for."""
    q = producers.get(qann_tensor)
    if q is None or q.op_type != "QuantizeLinear":
        raise TtfscError(f"stage {stage}: the QDQ model has no QuantizeLinear producing {qann_tensor!r}; "
                         "give the QDQ model this spiking model was compiled from with --qann.")
    p = producers.get(q.input[0])
    return p.input[0] if p is not None and p.op_type == "Clip" else q.input[0]


def float_reference(qann: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """The QANN with every activation [Clip ->] QuantizeLinear -> DequantizeLinear bypassed.

    Weight DequantizeLinear nodes (initializer inputs) stay: same weights, float activations.
    A Clip goes with its pair only when the QuantizeLinear is its sole consumer (it is then the
    quantizer's range clip, part of the pair). Returns (model, number of pairs removed).
    """
    out = onnx.ModelProto()
    out.CopyFrom(qann)
    g = out.graph
    inits = {t.name for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producers = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}
    drop, rename, pairs = set(), {}, 0
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits:
            continue
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q.output[0] in graph_outputs:
            continue
        src = q.input[0]
        clip = producers.get(src)
        if clip is not None and clip.op_type == "Clip" and len(consumers.get(src, [])) == 1 and src not in graph_outputs:
            drop.add(id(clip))
            src = clip.input[0]
        drop.add(id(q))
        pairs += 1
        for d in dqs:
            drop.add(id(d))
            rename[d.output[0]] = src
    kept = [n for n in g.node if id(n) not in drop]
    for n in kept:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    for name in graph_outputs & set(rename):
        kept.append(helper.make_node("Identity", [rename[name]], [name], name=f"{name}/float_reference"))
    del g.node[:]
    g.node.extend(kept)
    return out, pairs


# ---------------------------------------------------------------- runs

def _generator(model: onnx.ModelProto, extra: list[str], float_only: bool = False):
    """A Generator over ``model`` (spiking or plain) with ``extra`` tensors declared as outputs.

    ``float_only``: keep onnxruntime from fusing a float activation times dequantized int8 weights
    into a dynamically quantized MatMul (it does at ORT_ENABLE_ALL), which would quantize the
    float reference's activations after all.
    """
    from ttfsc.runtime.generate import Generator
    from ttfsc.runtime.session import default_options, open_session
    so = default_options()
    if float_only:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return Generator(open_session(with_outputs(model, extra), so), model_dir(model))


def _run(gen, ids: list[int], names: list[str]) -> dict[str, np.ndarray]:
    """One full-sequence forward (after the prefix, if any), fetching logits and ``names``."""
    names = ["logits"] + [n for n in dict.fromkeys(names) if n != "logits"]
    feeds = gen.feeds(np.asarray([ids], dtype=np.int64), None)
    return dict(zip(names, gen.session.run(names, feeds)))


def _keys(gen, ids: list[int]) -> int:
    """Attention keys of a full-sequence run: the attention mask's length (prefix + tokens)."""
    feeds = gen.feeds(np.asarray([ids], dtype=np.int64), None)
    return int(feeds["attention_mask"].shape[1]) if "attention_mask" in feeds else len(ids)


def _counted_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Float-op nodes of the graph, less MatMuls by dequantized int8 weights (counted as dense MACs)."""
    inits = {t.name for t in model.graph.initializer}
    weights = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return [n for n in model.graph.node if n.domain in ("", "ai.onnx")
            and (n.op_type == "MatMul" or n.op_type in FLOAT_OP_COST or n.op_type in REDUCE_OPS)
            and not (n.op_type == "MatMul" and n.input[1] in weights)]


def float_op_counts(snn: onnx.ModelProto, ids: list[int]) -> tuple[float, dict[str, float], dict[str, float]]:
    """MAC-equivalents of the float ops left in a graph (spiking model or QANN), from real runs' shapes.

    Returns (total, by kind, by op type). Runs the model once per SHAPE_BATCH tensors so that
    no run holds every intermediate tensor at once; integer (shape arithmetic) nodes are skipped,
    and so are MatMuls by dequantized int8 weights (a QANN's weight layers: dense MACs).
    """
    nodes = _counted_nodes(snn)
    inits = {t.name: tuple(t.dims) for t in snn.graph.initializer}
    inputs = {i.name for i in snn.graph.input}
    wanted = [n.output[0] for n in nodes]
    wanted += [n.input[0] for n in nodes if n.op_type == "MatMul" or n.op_type in REDUCE_OPS]
    wanted = [w for w in dict.fromkeys(wanted) if w not in inits and w not in inputs]
    gen = _generator(snn, wanted)
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    for k in range(0, len(wanted), SHAPE_BATCH):
        for name, arr in _run(gen, ids, wanted[k:k + SHAPE_BATCH]).items():
            seen[name] = (tuple(arr.shape), arr.dtype.kind)
    del gen
    total, by_kind, by_op = 0.0, {}, {}
    for n in nodes:
        shape, kind = seen.get(n.output[0], ((), "i"))
        if kind != "f":
            continue
        in0 = inits.get(n.input[0]) or seen.get(n.input[0], ((),))[0]
        macs = float_op_macs(n.op_type, [tuple(in0)], shape)
        total += macs
        by_kind[_op_kind(n)] = by_kind.get(_op_kind(n), 0.0) + macs
        by_op[n.op_type] = by_op.get(n.op_type, 0.0) + macs
    return total, by_kind, by_op


def _op_kind(n: onnx.NodeProto) -> str:
    """What a float op is for, from its node name (a heuristic for LLaMA-style exports)."""
    name = n.name
    if n.op_type == "MatMul":
        if "hadamard" in name.lower():
            return "online Hadamard before down_proj (constant blocks)"
        if "rotary" in name:
            return "rotary tables"
        return "attention QK^T and PV (activation x activation)" if "self_attn" in name else "other MatMul"
    if n.op_type == "Softmax":
        return "softmax"
    if "norm" in name:
        return "RMSNorm"
    if "act_fn" in name or "/mlp/" in name:
        return "SiLU and gate*up"
    if "rotary" in name:
        return "rotary tables"
    if "self_attn" in name:
        return "rotary, scaling, mask"
    if re.search(r"layers\.\d+/Add", name):
        return "residual adds"
    return "other"


# ---------------------------------------------------------------- per-stage measurements

def decode(s: Stage, out: np.ndarray) -> np.ndarray:
    """Values the stage's spikes stand for: (t_ref - t) * step, or (count - z) * threshold."""
    if s.coding == "rate":
        return decode_counts(out, s.step, s.zero_point)
    return decode_times(out, s.step, s.t_ref)


def stage_rows(stages: list[Stage], snn_out: dict, ref_out: dict, n_tokens: int) -> list[dict]:
    """Spikes, silence and error of every stage on the run."""
    rows = []
    for s in stages:
        out = snn_out[s.out]
        xs = decode(s, out).astype(np.float64)
        v = snn_out[s.v].astype(np.float64) if s.v is not None else None
        xf = ref_out[s.x].astype(np.float64) if s.x is not None else v if v is not None else xs
        err = _errors(xs, xf, v)
        clip_mean, clip_share = clipping_term(xf, s.a, s.b)
        grid_max, grid_rms = grid_terms(s.step)
        rows.append({
            "stage": s.name, "kind": s.kind, "coding": s.coding, "T": s.T, "steps": s.steps,
            "neurons_per_token": out.size / n_tokens, "spikes_per_token": spikes_of(out, s.coding, s.T) / n_tokens,
            "spikes_per_neuron": spikes_of(out, s.coding, s.T) / max(out.size, 1),
            "silent_fraction": silent_of(out, s.coding, s.T) / max(out.size, 1),
            **err,
            "clip_mean": clip_mean, "clip_share": clip_share, "grid_max": grid_max, "grid_rms": grid_rms,
            "a": s.a, "b": s.b, "step": s.step,
        })
    return rows


def _errors(xs: np.ndarray, xf: np.ndarray, v: np.ndarray | None) -> dict[str, float]:
    """Mean/max/RMS |x_snn - x_float|, and the parts carried in (|V - x_float|) and own (|x_snn - V|).

    NaN where undefined: an empty tensor (a KV past encoder before any cache), or the parts of a
    TTFSNeuron, whose potential V is internal to the node.
    """
    nan = float("nan")
    if xs.size == 0:
        return dict(err_mean=nan, err_max=nan, err_rms=nan, err_input_mean=nan, err_own_mean=nan)
    err = np.abs(xs - xf)
    return dict(err_mean=float(err.mean()), err_max=float(err.max()), err_rms=float(np.sqrt((err ** 2).mean())),
                err_input_mean=float(np.abs(v - xf).mean()) if v is not None else nan,
                err_own_mean=float(np.abs(xs - v).mean()) if v is not None else nan)


def _receives(snn: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in snn.graph.node if n.domain == DOMAIN and n.op_type in (RECEIVE, RATE_RECEIVE)]


def neuron_probes(snn: onnx.ModelProto) -> list[str]:
    """Tensors the TTFSNeuron counts read: every non-initializer input (spike times, side inputs)."""
    inits = {t.name for t in snn.graph.initializer}
    return [i for n in snn.graph.node if is_neuron(n) for i in n.input if i and i not in inits]


def count_neurons(snn: onnx.ModelProto, snn_out: dict, keys: int, snn_c: Counts, qann_c: Counts) -> None:
    """Add every TTFSNeuron's synaptic ACs, product MULs and receive-phase updates (and a wired
    linear's dense MACs to the QANN) to the counts. ``snn_out`` holds ``neuron_probes``' tensors."""
    dims = {t.name: tuple(t.dims) for t in snn.graph.initializer}
    for n in (n for n in snn.graph.node if is_neuron(n)):
        spec = NeuronSpec.from_node(n)
        out_size = int(snn_out[n.output[0]].size)
        shapes = [dims.get(i) or (tuple(snn_out[i].shape) if i in snn_out else None) for i in n.input]
        k = neuron_fan_in(spec, shapes, keys)
        inputs = [(int(snn_out[i].size), spikes_of(snn_out[i], "ttfs", T))
                  for i, T in zip(n.input[:spec.n_spike], spec.windows_in)]
        acs, muls = neuron_synaptic(spec, out_size, k, inputs)
        snn_c.ac_synaptic += acs
        snn_c.mul_synaptic += muls
        steps_in = sum(T - 1 for T in spec.windows_in)
        snn_c.ac_neuron += neuron_updates(out_size, steps_in)
        snn_c.neuron_steps += neuron_updates(out_size, steps_in)
        if spec.target == "matmul_weights":  # o_proj behind wiring: the QANN's int8 weight MatMul
            qann_c.mac_dense += float(out_size) * k


def count_network(snn: onnx.ModelProto, stages: list[Stage], snn_out: dict,
                  keys: int | None = None) -> tuple[Counts, Counts]:
    """(SNN, QANN) totals of spikes, ACs, MULs, dense MACs, bits moved and neuron steps on the run.

    ``keys``: the attention's key count on the run (a product neuron's open fan-in); with
    TTFSNeuron stages ``snn_out`` must also hold ``neuron_probes(snn)``.
    """
    by_out = {s.out: s for s in stages}
    dims = {t.name: tuple(t.dims) for t in snn.graph.initializer}
    snn_c, qann_c = Counts(), Counts()
    for s in stages:
        out = snn_out[s.out]
        spikes = spikes_of(out, s.coding, s.T)
        snn_c.spikes += spikes
        snn_c.neurons += out.size
        snn_c.silent += silent_of(out, s.coding, s.T)
        snn_c.ac_neuron += neuron_updates(out.size, s.spec.N)
        snn_c.neuron_steps += neuron_updates(out.size, s.spec.N)
        snn_c.move_bits += spikes * bits_per_spike(s.coding, s.T)
        qann_c.neurons += out.size
        qann_c.move_bits += out.size * math.log2(s.T)
    for r in _receives(snn):
        s = by_out.get(r.input[0])
        W = dims.get(r.input[1])
        if s is None or W is None or len(W) != 2:
            raise TtfscError(f"receive {r.name}: its input is no stage output or its weight is not a 2-D initializer; "
                             "is this model compiled by `ttfsc compile`?")
        K, O = W
        out = snn_out[s.out]
        rows = out.size // K
        snn_c.ac_synaptic += receive_acs(spikes_of(out, s.coding, s.T), O)
        snn_c.ac_neuron += neuron_updates(rows * O, s.spec.N)
        snn_c.neuron_steps += neuron_updates(rows * O, s.spec.N)
        qann_c.mac_dense += dense_macs(rows, K, O)
    count_neurons(snn, snn_out, keys or 0, snn_c, qann_c)
    return snn_c, qann_c


# ---------------------------------------------------------------- raster and membrane traces

def pick_trace_stage(snn: onnx.ModelProto, stages: list[Stage], which: str | None) -> tuple[Stage, onnx.NodeProto]:
    """The stage to trace (first, or first whose name contains ``which``) and a receive reading it.

    A TTFSEmit / RateEmit stage is preferred: a TTFSNeuron's potential is internal to the node, so
    only its receive side can be stepped (a fully spiking graph has receives after neurons only).
    """
    readers = {r.input[0]: r for r in reversed(_receives(snn))}
    cands = [s for s in stages if s.out in readers and (which is None or which in s.name)]
    cands = [s for s in cands if s.v is not None] or cands  # prefer a stage whose potential can be stepped
    if not cands:
        raise TtfscError(f"--trace-stage {which!r}: no stage of the model matches (stages look like {stages[0].name!r}).")
    return cands[0], readers[cands[0].out]


def _weights(snn: onnx.ModelProto, r: onnx.NodeProto, cols: np.ndarray) -> np.ndarray:
    """Dequantized weights [K, len(cols)] of a receive: (W - zp) * scale per output channel."""
    inits = Initializers(snn)
    W = np.asarray(inits.value(r.input[1]))[:, cols].astype(np.float64)
    if len(r.input) > 2 and r.input[2]:
        scale = np.asarray(inits.value(r.input[2]), dtype=np.float64).reshape(-1)
        zp = np.asarray(inits.value(r.input[3]), dtype=np.float64).reshape(-1) if len(r.input) > 3 and r.input[3] else 0.0
        scale = scale if scale.size == 1 else scale[cols]
        zp = zp if np.size(zp) <= 1 else zp[cols]
        W = (W - zp) * scale
    return W


def simulate_trace(snn: onnx.ModelProto, s: Stage, r: onnx.NodeProto, snn_out: dict, n: int) -> dict:
    """Step one token of stage ``s`` and its reader ``r`` with the reference simulator.

    Emission: every neuron of the last token from its real potential; receive: ``n`` output
    neurons of ``r`` from the real input spike times and weights, traced step by step. Returns
    the traces and how well the simulator reproduces the runtime (spike times, potentials).
    """
    from ttfsc import simulator as sim
    K = snn_out[s.out].shape[-1]
    spikes = snn_out[s.out].reshape(-1, K)[-1].astype(np.int64)
    v = snn_out[s.v].reshape(-1, K)[-1].astype(np.float64) if s.v is not None else None
    runtime_v = snn_out[r.output[0]].reshape(-1, snn_out[r.output[0]].shape[-1])[-1]
    cols = np.arange(min(n, runtime_v.size))
    w = _weights(snn, r, cols)
    if s.coding == "rate":
        return _trace_rate(sim, s, r, spikes, v, w, runtime_v[cols], n)
    return _trace_ttfs(sim, s, r, spikes, v, w, runtime_v[cols], n)


def _pick_fired(times: np.ndarray, fired: np.ndarray, n: int) -> np.ndarray:
    """Up to n fired neurons spread over the spike times (earliest to latest)."""
    idx = np.flatnonzero(fired)
    if idx.size == 0:
        return np.arange(min(n, times.size))
    order = idx[np.argsort(times[idx], kind="stable")]
    return order[np.unique(np.linspace(0, order.size - 1, min(n, order.size)).round().astype(int))]


def _trace_ttfs(sim, s: Stage, r: onnx.NodeProto, t: np.ndarray, v: np.ndarray, w: np.ndarray,
                runtime_v: np.ndarray, n: int) -> dict:
    e = s.spec
    if v is None:  # a TTFSNeuron: no potential to step; its real spike times still drive the receive
        pick, emit_traces, emit_times, matches = np.zeros(0, int), np.zeros((0, e.N + 1)), np.zeros(0, int), None
    else:
        tr = sim.emit(v, np.asarray(e.psi), e.theta, e.N, e.t_ref, e.tie_rule)
        pick = _pick_fired(tr.times, tr.times < e.N, n)
        table = emit_ramp(e.psi)
        emit_traces, emit_times = v[pick, None] + table[None, :], tr.times[pick]
        matches = int(np.count_nonzero(tr.times == t))
    rs = ReceiveSpec.from_node(r)
    N_in = rs.T_in - 1
    eta = np.asarray(rs.eta, dtype=np.float64)
    C = receive_bias(rs.c_offset, w, N_in)
    recv = np.stack([sim.receive(t[None, :], w, eta[:k], C, k, rs.gain)[0] if k else np.zeros(w.shape[1])
                     for k in range(N_in + 1)], axis=1)
    return {"coding": "ttfs", "stage": s.name, "receiver": r.name, "N": e.N, "N_in": N_in,
            "raster_times": t, "raster_fired": t < e.N, "theta": float(e.theta),
            "emit_traces": emit_traces, "emit_times": emit_times, "emit_neurons": pick,
            "receive_traces": recv,
            "sim_matches_runtime_spikes": matches, "neurons": int(t.size),
            "receive_max_abs_diff": float(np.abs(recv[:, -1] - runtime_v).max()),
            "receive_scale": float(np.abs(runtime_v).max())}


def _trace_rate(sim, s: Stage, r: onnx.NodeProto, c: np.ndarray, v: np.ndarray, w: np.ndarray,
                runtime_v: np.ndarray, n: int) -> dict:
    st = s.spec.stage()
    tr = sim.rate_emit(v.astype(np.float32), st)
    pick = _pick_fired(-tr.counts, tr.counts > 0, n)
    steps = np.arange(1, st.N + 1)
    current = np.array([float(x) for x in st.current(st.quotient(v[pick]))])
    cum = np.cumsum(tr.trains[:, pick], axis=0).T
    emit_traces = np.concatenate([np.full((pick.size, 1), 0.5), 0.5 + steps[None, :] * current[:, None] - cum], axis=1)
    emit_traces *= float(st.threshold)
    rs = RateReceiveSpec.from_node(r)
    trains = tr.trains  # the receive reads exactly this stage's spike trains
    shift = rs.threshold_in * rs.zero_point_in * w.sum(axis=0)
    recv = [np.zeros(w.shape[1])] + [sim.rate_receive(trains[:k], w, rs.threshold_in, rs.zero_point_in)
                                     + shift * (1 - k / rs.N_in) for k in range(1, rs.N_in + 1)]
    return {"coding": "rate", "stage": s.name, "receiver": r.name, "N": st.N, "N_in": rs.N_in,
            "raster_trains": tr.trains, "theta": float(st.threshold),
            "emit_traces": emit_traces, "emit_times": None, "emit_neurons": pick,
            "receive_traces": np.stack(recv, axis=1),
            "sim_matches_runtime_spikes": int(np.count_nonzero(tr.counts == c)), "neurons": int(c.size),
            "receive_max_abs_diff": float(np.abs(recv[-1] - runtime_v).max()),
            "receive_scale": float(np.abs(runtime_v).max())}


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path.name


def plot_latency(rows: list[dict], folder: Path) -> str:
    """Fig. 1: steps per stage and cumulative steps, against continuous-time conversion."""
    plt = _plt()
    steps = np.array([r["steps"] for r in rows])
    x = np.arange(1, steps.size + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.bar(x, steps, width=1.0, color="tab:blue")
    ax1.set(xlabel="stage", ylabel="time steps", title="time steps per stage")
    ax2.plot(x, np.cumsum(steps), label=f"this model ({steps.sum()} steps/token)", color="tab:blue", lw=2)
    for T, c in zip(CONTINUOUS_T, ("tab:orange", "tab:red")):
        ax2.plot(x, x * T, label=f"continuous-time, T={T}", color=c, ls="--")
    ax2.set(xlabel="stage", ylabel="cumulative time steps", yscale="log", title="cumulative latency (Fig. 1)")
    ax2.legend(fontsize=8)
    return _save(fig, folder / "latency.png")


def _short(kind: str) -> str:
    """A legend label for a stage family (matplotlib hides labels that start with '_')."""
    return re.sub(r"^model_|_output_0$", "", kind).lstrip("_")[-48:]


def plot_spikes(rows: list[dict], folder: Path) -> str:
    plt = _plt()
    x = np.arange(1, len(rows) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for k in dict.fromkeys(r["kind"] for r in rows):
        sel = [i for i, r in enumerate(rows) if r["kind"] == k]
        ax1.plot(x[sel], [rows[i]["spikes_per_neuron"] for i in sel], "o", ms=3, label=_short(k))
        ax2.plot(x[sel], [100 * rows[i]["silent_fraction"] for i in sel], "o", ms=3)
    ax1.set(xlabel="stage", ylabel="spikes per neuron per token", title="spikes per neuron")
    ax2.set(xlabel="stage", ylabel="silent neurons (%)", title="neurons that never fire")
    ax2.set_ylim(bottom=0)
    fig.legend(fontsize=7, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(folder / "spikes.png", dpi=90)
    plt.close(fig)
    return "spikes.png"


def plot_energy(snn_lines: dict, qann_lines: dict, folder: Path) -> str:
    """Stacked bars per token; a line item has one colour in both bars (the float ops are shared)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.0))
    labels = list(dict.fromkeys(list(snn_lines) + list(qann_lines)))
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(labels)}
    shown = set()
    for y, lines in ((1, snn_lines), (0, qann_lines)):
        left = 0.0
        for label, pj in lines.items():
            uj = pj / 1e6
            if uj <= 0:
                continue
            ax.barh(y, uj, left=left, color=colors[label], label=None if label in shown else label)
            shown.add(label)
            left += uj
    ax.set_yticks([0, 1], ["QANN", "SNN"])
    ax.set(xlabel="energy per token (uJ)", title="energy per token by line item")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, folder / "energy.png")


def plot_error(rows: list[dict], folder: Path) -> str:
    plt = _plt()
    x = np.arange(1, len(rows) + 1)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    g = lambda k: np.array([r[k] for r in rows])  # noqa: E731
    ax.plot(x, g("err_mean"), "o-", ms=3, label="measured mean |x_snn - x_float|")
    ax.plot(x, g("err_max"), ".", ms=3, label="measured max")
    ax.plot(x, g("err_own_mean"), "^", ms=3, label="own rounding mean |x_snn - V_snn|")
    ax.plot(x, g("grid_max"), "--", label="grid term step/2")
    ax.plot(x, g("grid_rms"), ":", label="grid term RMS step/sqrt(12)")
    ax.plot(x, np.maximum(g("clip_mean"), 1e-12), "s", ms=3, label="clipping term (mean distance to [a, b])")
    ax.set(xlabel="stage", ylabel="error (activation units)", yscale="log", title="per-stage error vs Theorem 3's terms")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, folder / "error.png")


def plot_trace(tr: dict, folder: Path) -> str:
    plt = _plt()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(12, 3.6))
    if tr["coding"] == "rate":
        s_idx, n_idx = np.nonzero(tr["raster_trains"])
        ax1.plot(s_idx, n_idx, "|", ms=2, color="k")
    else:
        idx = np.flatnonzero(tr["raster_fired"])
        ax1.plot(tr["raster_times"][idx], idx, "|", ms=2, color="k")
    ax1.set(xlabel="time step of the emission window", ylabel="neuron", title=f"raster ({tr['neurons']} neurons, 1 token)",
            xlim=(-1, tr["N"] + 1))
    for row in tr["receive_traces"]:
        ax2.plot(np.arange(row.size), row, lw=1)
    ax2.set(xlabel="step of the receive window", ylabel="membrane potential", title="receive phase (next layer)")
    for i, row in enumerate(tr["emit_traces"]):
        stop = row.size if tr["emit_times"] is None else int(tr["emit_times"][i]) + 1
        line, = ax3.plot(np.arange(stop), row[:stop], lw=1)
        if tr["emit_times"] is not None:
            ax3.plot(stop - 1, row[stop - 1], "o", ms=4, color=line.get_color())
    ax3.axhline(tr["theta"], color="k", ls="--", lw=1, label="threshold")
    ax3.set(xlabel="step of the emission window", ylabel="membrane potential", title="emission phase")
    ax3.legend(fontsize=7)
    return _save(fig, folder / "raster.png")


# ---------------------------------------------------------------- the report

def _nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean next-token negative log-likelihood of ``ids`` under ``logits`` [1, seq, vocab]."""
    z = logits[0, :-1].astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def build_report(model: str, text: str, qann: str | None = None, tokens: int = 256,
                 constants: EnergyConstants = EnergyConstants(), trace_stage: str | None = None,
                 neurons: int = 6) -> dict:
    """Run the spiking model and its float reference on ``text``; return every number of the report.

    Arrays needed only for the plots travel under the key ``"_plots"``.
    """
    from ttfsc.compiler.pipeline import latency_per_token, stages as pipeline_stages
    from ttfsc.runtime.tokenizer import load_tokenizer
    snn_path = Path(model)
    snn = load_model(snn_path)
    body = read_text(text)
    qann_path = Path(qann) if qann else find_qann(snn_path)
    qann_model = load_model(qann_path)
    stages = find_stages(snn, qann_model, str(snn_path))
    trace_s, trace_r = pick_trace_stage(snn, stages, trace_stage)
    ids = load_tokenizer(snn_path).encode(body, bos=True)[:tokens]
    probes = [n for s in stages for n in (s.v, s.out) if n] + [trace_r.output[0]] + neuron_probes(snn)
    gen = _generator(snn, probes)
    ids = gen.strip_bos(ids)
    if len(ids) < 2:
        raise TtfscError(f"{text}: gives {len(ids)} token(s); give --text a longer text (and --tokens >= 2).")
    prefix = gen.prefix_cost()["tokens"]
    keys = _keys(gen, ids)
    snn_out = _run(gen, ids, probes)
    del gen
    ref, pairs = float_reference(qann_model)
    xs = [s.x for s in stages if s.x is not None]
    gen = _generator(ref, xs, float_only=True)
    ref_out = _run(gen, ids, xs)
    del gen
    n_tok = len(ids)
    rows = stage_rows(stages, snn_out, ref_out, n_tok)
    snn_c, qann_c = count_network(snn, stages, snn_out, keys)
    snn_c.mac_float, by_kind, by_op = float_op_counts(snn, ids)
    snn_c.mac_float_by_kind = by_kind
    qann_c.mac_float, qann_c.mac_float_by_kind, qann_by_op = float_op_counts(qann_model, ids)
    snn_t, qann_t = snn_c.scaled(1 / n_tok), qann_c.scaled(1 / n_tok)
    e_snn, e_qann = snn_energy(snn_t, constants), qann_energy(qann_t, constants)
    lat_stages = pipeline_stages(snn)
    trace = simulate_trace(snn, trace_s, trace_r, snn_out, neurons)
    return {
        "model": str(snn_path), "qann": str(qann_path), "text": str(text), "tokens": n_tok, "prefix_tokens": prefix,
        "coding": stages[0].coding, "stages": len(stages), "float_reference_pairs_removed": pairs,
        "latency": {"steps_per_token": latency_per_token(snn), "sum_of_stage_steps": int(sum(r["steps"] for r in rows)),
                    "pipelined_steps_per_token": max(r["steps"] for r in rows),
                    "continuous": {str(T): T * len(rows) for T in CONTINUOUS_T},
                    "per_stage": [{"stage": s["stage"], "steps": s["steps"]} for s in lat_stages]},
        "spikes": {"per_token": snn_t.spikes, "neurons_per_token": snn_t.neurons,
                   "per_neuron": snn_c.spikes / max(snn_c.neurons, 1), "silent_fraction": snn_c.silent / max(snn_c.neurons, 1)},
        "ops_per_token": {"snn": asdict(snn_t), "qann": asdict(qann_t), "keys": keys,
                          "neuron_stages": sum(1 for n in snn.graph.node if is_neuron(n)),
                          "float_ops_by_op": {k: v / n_tok for k, v in by_op.items()},
                          "qann_float_ops_by_op": {k: v / n_tok for k, v in qann_by_op.items()}},
        "energy_constants_pj": asdict(constants),
        "energy_pj_per_token": {"snn": e_snn, "qann": e_qann, "snn_total": sum(e_snn.values()),
                                "qann_total": sum(e_qann.values())},
        "energy_pj_per_token_int_prices": {"constants": asdict(INT_PRICES),
                                           "snn_total": sum(snn_energy(snn_t, INT_PRICES).values()),
                                           "qann_total": sum(qann_energy(qann_t, INT_PRICES).values())},
        "error": {"stages": rows,
                  "logits_mean_abs_diff": float(np.abs(snn_out["logits"] - ref_out["logits"]).mean()),
                  "nll_snn": _nll(snn_out["logits"], ids), "nll_float": _nll(ref_out["logits"], ids)},
        "trace": {k: v for k, v in trace.items() if not isinstance(v, np.ndarray)},
        "_plots": {"trace": trace},
    }


def _g(x: float) -> str:
    """Compact number: 3 significant digits, thousands separators for big values."""
    if x == 0:
        return "0"
    if isinstance(x, (int, np.integer)):
        return f"{x:,}"
    if abs(x) >= 1e4:
        return f"{x:,.0f}" if abs(x) < 1e7 else f"{x:.3e}"
    return f"{x:.3g}"


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c if isinstance(c, str) else _g(c) for c in r) + " |" for r in rows]
    return out + [""]


def _by_kind(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["kind"], []).append(r)
    return out


def _md_header(r: dict, command: str) -> list[str]:
    return [f"# Spiking-model report: `{Path(r['model']).name}`", "", "Command:", "", "```", command, "```", "",
            f"One run of {r['tokens']} tokens of `{r['text']}`"
            + (f" (after the model's {r['prefix_tokens']}-token PrefixQuant prefix)" if r["prefix_tokens"] else "")
            + f"; {r['stages']} {r['coding'].upper()} stages; QANN `{r['qann']}`. Per-token figures are run totals "
            "divided by the run's tokens (attention's share grows with the context).", ""]


def _md_latency(r: dict, img: str) -> list[str]:
    lat = r["latency"]
    steps = sorted({s["steps"] for s in lat["per_stage"]})
    md = ["## Latency", ""]
    md += _table(["quantity", "time steps"], [
        ["steps per stage", "/".join(map(str, steps))],
        ["latency per token (longest chain of stages)", lat["steps_per_token"]],
        ["sum of all stages' steps", lat["sum_of_stage_steps"]],
        ["per-token delay, stages pipelined across tokens", lat["pipelined_steps_per_token"]],
        *[[f"continuous-time conversion, T={T} per stage", v] for T, v in lat["continuous"].items()]])
    return md + ["Pipelined: once every stage works on a different token, a new token leaves every "
                 "max-window steps. That holds for a prompt (prefill) or a batch; autoregressive decoding of one "
                 "sequence still waits the full latency per generated token, since the next input is this output.",
                 "", f"![latency]({img})", ""]


def _md_spikes(r: dict, img: str) -> list[str]:
    sp, rows = r["spikes"], r["error"]["stages"]
    md = ["## Spikes", "",
          f"{_g(sp['per_token'])} spikes per token from {_g(sp['neurons_per_token'])} neurons: "
          f"{sp['per_neuron']:.3f} spikes per neuron, {100 * sp['silent_fraction']:.1f}% of neurons silent.", ""]
    fam = []
    for k, v in _by_kind(rows).items():
        neurons, spikes = sum(x["neurons_per_token"] for x in v), sum(x["spikes_per_token"] for x in v)
        fam.append([k, len(v), neurons, spikes, spikes / max(neurons, 1e-30),
                    f"{100 * np.mean([x['silent_fraction'] for x in v]):.1f}%"])
    md += _table(["stage family", "stages", "neurons/token", "spikes/token", "spikes/neuron", "silent"], fam)
    return md + [f"![spikes]({img})", ""]


def _md_ops(r: dict) -> list[str]:
    ops = r["ops_per_token"]
    s, q = ops["snn"], ops["qann"]
    md = ["## Operations per token", "",
          "AC: one per incoming spike and synapse (the weight joins the neuron's ramp) plus one per neuron per "
          "step of its receive and emission windows (an upper bound: a fired neuron could be gated off). MAC: "
          "every float op still in the graph, counted from the run's shapes (MatMul M*N*K, element-wise 1 per "
          "element, softmax 3, reduce 1 per input; adds charged as MACs). Attention counts the graph's full "
          "score matrix (the export masks future positions rather than skipping them; a causal kernel does about "
          "half). QANN: dense integer MatMuls on the same rows plus the float ops of its own graph. Rules: "
          "`ttfsc/analysis/energy.py`.", ""]
    if ops.get("neuron_stages"):
        md += [f"{ops['neuron_stages']} TTFSNeuron stages (nonlinear, product and multi-input neurons): a fixed "
               "weight costs one AC per incoming spike and synapse; a product synapse (QK^T, PV, gate*up, x*r), "
               "whose weight is the other operand's run-time value, one MUL and one AC per synapse, spike or not; "
               "each neuron updates once per step of its input windows. Their float work stays on the QANN's "
               f"side as its float ops (attention over {ops['keys']} keys).", ""]
    md += _table(["quantity per token", "SNN", "QANN"], [
        ["AC, synaptic (spikes x fan-out)", s["ac_synaptic"], 0],
        ["AC, neuron updates per step", s["ac_neuron"], 0],
        ["MUL, product synapses (run-time weights)", s.get("mul_synaptic", 0), 0],
        ["MAC, dense weight MatMuls", 0, q["mac_dense"]],
        ["MAC, float ops left in the graph", s["mac_float"], q["mac_float"]],
        ["bits stored/routed (spike times log2 T; activations n bits)", s["move_bits"], q["move_bits"]],
        ["neuron-steps (static energy base)", s["neuron_steps"], 0]])
    kinds = sorted(set(s["mac_float_by_kind"]) | set(q["mac_float_by_kind"]),
                   key=lambda k: -max(s["mac_float_by_kind"].get(k, 0), q["mac_float_by_kind"].get(k, 0)))
    return md + _table(["float ops by purpose", "SNN MAC per token", "QANN MAC per token"],
                       [[k, s["mac_float_by_kind"].get(k, 0.0), q["mac_float_by_kind"].get(k, 0.0)] for k in kinds])


def _md_energy(r: dict, img: str) -> list[str]:
    en, c, ip, sp = r["energy_pj_per_token"], r["energy_constants_pj"], r["energy_pj_per_token_int_prices"], r["spikes"]
    s, q = r["ops_per_token"]["snn"], r["ops_per_token"]["qann"]
    md = ["## Energy per token", "",
          f"Constants (pJ): E_AC {c['e_ac']}, E_MAC {c['e_mac']} (QANN weight MatMuls "
          f"{c['e_mac'] if c['e_mac_dense'] is None else c['e_mac_dense']}), E_MUL of a product synapse "
          f"{c.get('e_mul', E_MUL_PJ)}, per bit stored/routed {c['e_bit']}, "
          f"static per neuron per step {c['e_static']} (flags --e-ac, --e-mac, --e-mac-dense, --e-mul, --e-bit, --e-static; "
          "defaults: 45 nm, Horowitz ISSCC 2014; static 0 = not modelled). Weight reads are not counted (same "
          "weights in both).", ""]
    names = list(en["snn"]) + [k for k in en["qann"] if k not in en["snn"]]
    md += _table(["line item", "SNN (uJ)", "QANN (uJ)"],
                 [[k, en["snn"].get(k, 0) / 1e6, en["qann"].get(k, 0) / 1e6] for k in names]
                 + [["**total**", en["snn_total"] / 1e6, en["qann_total"] / 1e6]])
    share = s["ac_synaptic"] / max(q["mac_dense"], 1e-30)
    if share > 1:
        why = "more weight additions than the QANN has multiply-adds; only the cheaper add can make up for that."
    elif share > 0.5:
        why = "any difference in energy is the price of an add against a multiply-add, not sparsity."
    else:
        why = "sparsity and the price of an add against a multiply-add both count."
    return md + [
        f"SNN / QANN energy: {en['snn_total'] / max(en['qann_total'], 1e-30):.3f}.", "",
        f"Where it comes from: {100 * (1 - sp['silent_fraction']):.1f}% of neurons spike ({sp['per_neuron']:.3f} "
        f"spikes per neuron), so the synaptic ACs are {100 * share:.1f}% of the QANN's dense MACs"
        + (" (they include the product synapses' ACs, whose QANN counterpart is a float MAC)"
           if r["ops_per_token"].get("neuron_stages") else "") + f": {why} The "
        "default constants price the QANN's int8 MatMuls as fp32 MACs. At the same source's integer prices "
        f"(AC = 32-bit integer add {INT_PRICES.e_ac} pJ, QANN MAC = 8-bit multiply + 32-bit accumulate "
        f"{INT_PRICES.dense} pJ, product-synapse MUL {INT_PRICES.e_mul} pJ, float ops still {INT_PRICES.e_mac} pJ): SNN {ip['snn_total'] / 1e6:.3g} uJ vs QANN "
        f"{ip['qann_total'] / 1e6:.3g} uJ per token (ratio {ip['snn_total'] / max(ip['qann_total'], 1e-30):.3f}).",
        "", f"![energy]({img})", ""]


def _nanmean(values: list[float]) -> float:
    """Mean over the defined values (a TTFSNeuron has no potential of its own to split its error by)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x[~np.isnan(x)].mean()) if np.any(~np.isnan(x)) else float("nan")


def _nanmax(values: list[float]) -> float:
    x = np.asarray(values, dtype=np.float64)
    return float(x[~np.isnan(x)].max()) if np.any(~np.isnan(x)) else float("nan")


def _md_error(r: dict, img: str) -> list[str]:
    err, rows = r["error"], r["error"]["stages"]
    mean = lambda k, v=rows: _nanmean([x[k] for x in v])  # noqa: E731
    md = ["## Error against the float network (Theorem 3)", "",
          f"Float reference: the QANN with its {r['float_reference_pairs_removed']} activation Clip -> "
          "QuantizeLinear -> DequantizeLinear chains bypassed (float activations, same weights), run on the same "
          "tokens. At each stage's input tensor x: measured |x_snn - x_float| with x_snn the value the stage's "
          "spikes stand for; 'input err' compares the SNN's potential before its own stage (error carried in "
          "from upstream); 'own rounding' is mean |x_snn - V_snn|, the stage's own quantization. Theorem 3's "
          "clipping term is the mean distance of x_float to the stage's range [a, b] (and the share outside it), "
          "its grid term step/2 (worst case) or step/sqrt(12) (RMS).", "",
          "Theorem 3 bounds the total error by L*I*max(rho - T/(2 tau), 0) + L*I*G1*G2*Omega/T: clipping plus "
          f"grid, summed over L layers of I neurons. Here, over all stages, the error carried in averages "
          f"{mean('err_input_mean'):.3g} against {mean('err_own_mean'):.3g} for a stage's own rounding and "
          f"{mean('clip_mean'):.3g} for its clipping term: the per-stage error is mostly what earlier stages passed "
          "on (the bound's L factor), not this stage's grid."
          + (" TTFSNeuron stages keep their potential inside the node, so the carried-in / own split covers "
             "the other stages only (NaN in the rows below)." if r["ops_per_token"].get("neuron_stages") else ""), "",
          f"Logits: mean |SNN - float| {err['logits_mean_abs_diff']:.3g}; next-token NLL on the text: SNN "
          f"{err['nll_snn']:.3f} (PPL {math.exp(err['nll_snn']):.2f}), float reference {err['nll_float']:.3f} "
          f"(PPL {math.exp(err['nll_float']):.2f}).", ""]
    md += _table(["stage family", "mean err", "max err", "input err", "own rounding", "grid step/2", "grid RMS",
                  "clip term", "clipped"],
                 [[k, mean("err_mean", v), _nanmax([x["err_max"] for x in v]), mean("err_input_mean", v),
                   mean("err_own_mean", v), mean("grid_max", v), mean("grid_rms", v), mean("clip_mean", v),
                   f"{100 * mean('clip_share', v):.3f}%"] for k, v in _by_kind(rows).items()])
    return md + [f"![error]({img})", ""]


def _md_trace(r: dict, img: str) -> list[str]:
    t = r["trace"]
    return ["## Raster and membrane traces", "",
            f"Stage `{t['stage']}` (last token of the run) and its reader `{t['receiver']}`, stepped by the "
            "reference simulator (`ttfsc.simulator`) with the real potentials, input spike times and weights. "
            + (f"The simulator reproduces {t['sim_matches_runtime_spikes']} of {t['neurons']} runtime spike "
               f"{'counts' if t['coding'] == 'rate' else 'times'}. "
               if t["sim_matches_runtime_spikes"] is not None else
               "The stage is a TTFSNeuron, whose potential stays inside the node: its emission is not stepped "
               "(no emission traces), its real spike times drive the receive. ")
            + f"The receive potentials after {t['N_in']} steps "
            f"differ from the runtime's by at most {t['receive_max_abs_diff']:.3g} (potentials up to "
            f"{t['receive_scale']:.3g}).", "", f"![raster]({img})", ""]


def _md_stages(r: dict) -> list[str]:
    return ["## Per stage", ""] + _table(
        ["#", "stage", "steps", "spikes/neuron", "silent", "mean err", "max err", "input err", "own rounding",
         "grid step/2", "clip term"],
        [[str(i + 1), x["stage"], x["steps"], x["spikes_per_neuron"], f"{100 * x['silent_fraction']:.1f}%",
          x["err_mean"], x["err_max"], x["err_input_mean"], x["err_own_mean"], x["grid_max"], x["clip_mean"]]
         for i, x in enumerate(r["error"]["stages"])])


def render_markdown(r: dict, command: str, images: dict[str, str]) -> str:
    """report.md: one section per question (latency, spikes, ops, energy, error, traces), per-stage table last."""
    md = (_md_header(r, command) + _md_latency(r, images["latency"]) + _md_spikes(r, images["spikes"]) + _md_ops(r)
          + _md_energy(r, images["energy"]) + _md_error(r, images["error"]) + _md_trace(r, images["raster"])
          + _md_stages(r))
    return "\n".join(md)


def write_report(r: dict, out: Path, command: str) -> None:
    """Write report.md, report.json and the PNGs into a staged folder that replaces ``out`` when complete
    (ttfsc.transaction: a failure or an interrupt leaves ``out`` as it was)."""
    with transaction() as txn, writing(out, "the report"):
        tmp = txn.stage(out, directory=True)
        rows = r["error"]["stages"]
        images = {"latency": plot_latency(rows, tmp), "spikes": plot_spikes(rows, tmp),
                  "energy": plot_energy(r["energy_pj_per_token"]["snn"], r["energy_pj_per_token"]["qann"], tmp),
                  "error": plot_error(rows, tmp), "raster": plot_trace(r["_plots"]["trace"], tmp)}
        data = {k: v for k, v in r.items() if k != "_plots"} | {"command": command}
        (tmp / "report.json").write_text(json.dumps(data, indent=1, default=float))
        (tmp / "report.md").write_text(render_markdown(r, command, images))
        os.chmod(tmp, 0o755)


REPORT_FILES = ("report.md", "report.json")


def check_out(out: Path, inputs: dict[Path, str]) -> None:
    """Before the work: ``--out`` is replaced whole, so it must be new or an earlier report (never a folder
    holding other files, or an input), in a folder that can be written."""
    if out.exists() and not out.is_dir():
        raise TtfscError(f"--out {out}: exists and is not a folder; give a folder path for the report.")
    refuse_replacing_folder(out, inputs, "--out")
    if out.is_dir():
        foreign = [f.name for f in out.iterdir() if f.name not in REPORT_FILES and f.suffix != ".png"]
        if foreign:
            raise TtfscError(f"--out {out}: the folder holds files that are not a report's ({', '.join(sorted(foreign)[:3])}), "
                             "and the report replaces the whole folder; give --out a new folder.")
    check_writable(out.parent, "--out")


def report_inputs(args) -> dict[Path, str]:
    """The files the report reads: the spiking model's and the QANN's (their data, sidecars), the text."""
    inputs: dict[Path, str] = {Path(args.text): "the --text file"}
    for path in (Path(args.model), Path(args.qann) if args.qann else _found_qann(Path(args.model))):
        with contextlib.suppress(TtfscError):  # a model that cannot be read: build_report says why, first
            inputs |= model_files(load_model(path), path) if path is not None else {}
    return inputs


def _found_qann(snn_path: Path) -> Path | None:
    try:
        return find_qann(snn_path)
    except TtfscError:
        return None  # build_report says so


def _command(args) -> str:
    """The command line that reproduces this report (only options that differ from the defaults)."""
    parts = ["ttfsc", "report", args.model, "--text", args.text, "--out", str(args.out)]
    if args.qann:
        parts += ["--qann", args.qann]
    defaults = {"tokens": 256, "e_ac": E_AC_PJ, "e_mac": E_MAC_PJ, "e_mac_dense": None, "e_mul": E_MUL_PJ,
                "e_bit": E_BIT_PJ,
                "e_static": E_STATIC_PJ,
                "trace_stage": None, "neurons": 6}
    for k, d in defaults.items():
        v = getattr(args, k)
        if v != d:
            parts += ["--" + k.replace("_", "-"), str(v)]
    return shlex.join(parts)


def cli(args) -> int:
    if args.out is None:
        p = Path(args.model)
        args.out = str(p.with_name(p.name.removesuffix(".onnx") + ".report"))
    check_out(Path(args.out), report_inputs(args))
    consts = EnergyConstants(args.e_ac, args.e_mac, args.e_bit, args.e_static, args.e_mac_dense, args.e_mul)
    r = build_report(args.model, args.text, args.qann, args.tokens, consts, args.trace_stage, args.neurons)
    write_report(r, Path(args.out), _command(args))
    en = r["energy_pj_per_token"]
    print(f"report: {args.out}/report.md ({r['tokens']} tokens, {r['stages']} stages, "
          f"latency {r['latency']['steps_per_token']} steps/token, {r['spikes']['per_token']:.0f} spikes/token, "
          f"energy/token SNN {en['snn_total'] / 1e6:.3g} uJ vs QANN {en['qann_total'] / 1e6:.3g} uJ)")
    return 0
