"""``ttfsc report`` on a fully spiking model (TTFSNeuron stages), counts checked against independent counts.

The tiny seeded LLaMA's ``quantize --full`` twin (no transforms, so RMSNorm's gamma stays a
multiply after the x*r product) is compiled with every stage group a TTFSNeuron. One run of the
spiking model gives the report's counts; the test recounts them without NeuronSpec: product
multiplications from the QANN's own activation-times-activation ops on the same tokens, and
fixed-weight accumulations by walking each neuron's real connectivity (broadcast, row mean,
rotary's partner element, o_proj's head merge) over the spikes that actually arrived.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ttfsc.cli import main
from ttfsc.analysis.report import (
    _generator, _keys, _run, count_network, find_stages, float_op_counts, neuron_probes)
from ttfsc.neuron import NeuronSpec, is_neuron
from ttfsc.ttfs import spike_count

PLAIN = ["--rotate", "none", "--smooth", "0", "--method", "minmax", "--prefix", "none"]
IDS = [5, 9, 14, 3, 22, 40, 7, 11, 60, 2, 33, 18]


@pytest.fixture(scope="module")
def full_snn(tiny_llama_onnx: Path, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("report_full")
    qdq, snn = folder / "model.qdq.onnx", folder / "model.snn.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "--full", "--abits", "6", *PLAIN, "--calib-samples", "2",
                 "--calib-seqlen", "16", "-o", str(qdq)]) == 0
    model = onnx.load(str(qdq))  # a random init has RMSNorm gamma = 1 (a no-op multiply): make it a real one
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:
        if t.name.endswith("norm.weight"):
            t.CopyFrom(numpy_helper.from_array(rng.uniform(0.8, 1.2, t.dims).astype(np.float32), t.name))
    onnx.save(model, str(qdq))
    assert main(["compile", str(qdq), "-T", "auto", "-o", str(snn)]) == 0
    return qdq, snn


def _sources(model: onnx.ModelProto) -> dict[str, frozenset]:
    """For each QANN tensor that depends on dequantized *activations*, the set of those dequantizers
    (weights, positions and the mask depend on none)."""
    inits = {t.name for t in model.graph.initializer}
    src: dict[str, frozenset] = {}
    for n in model.graph.node:  # topological order
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits:
            src[n.output[0]] = frozenset([n.output[0]])
        elif n.op_type not in ("Shape", "Size"):
            deps = frozenset().union(*(src.get(i, frozenset()) for i in n.input))
            if deps:
                src.update({o: deps for o in n.output if o})
    return src


def qann_product_counts(qann: onnx.ModelProto, ids: list[int], where: str = "") -> tuple[float, float]:
    """(multiply-adds of activation x activation ops, constant multiplies applied to their results).

    Counted on the QANN's own graph and run: a MatMul of two activations (from different
    quantizers) costs M*N*K, a Mul of two such activations one per element, and a Mul/Div by a
    constant right after such a product (gamma after x*r) one per element. ``where``: only
    products whose node name contains it.
    """
    src = _sources(qann)
    prods = [n for n in qann.graph.node if n.op_type in ("MatMul", "Mul") and where in n.name and n.input[0] in src
             and n.input[1] in src and src[n.input[0]] != src[n.input[1]]]  # not SiLU's x * sigmoid(x)
    prod_out = {n.output[0] for n in prods}
    for n in qann.graph.node:  # a Cast moves the product along unchanged
        if n.op_type == "Cast" and n.input[0] in prod_out:
            prod_out.add(n.output[0])
    consts = {t.name for t in qann.graph.initializer}
    for n in qann.graph.node:  # the export shares equal gammas through Identity nodes
        if n.op_type == "Constant" or (n.input and all(i in consts for i in n.input)):
            consts.update(n.output)
    post = [n for n in qann.graph.node if n.op_type in ("Mul", "Div") and n not in prods
            and any(i in prod_out for i in n.input) and any(i in consts for i in n.input)]
    names = [x for n in prods + post for x in (n.input[0], n.output[0])]
    out = _run(_generator(qann, names, float_only=True), ids, names)
    macs = sum(out[n.output[0]].size * (out[n.input[0]].shape[-1] if n.op_type == "MatMul" else 1) for n in prods)
    return float(macs), float(sum(out[n.output[0]].size for n in post))


def fixed_synapse_acs(spec: NeuronSpec, node: onnx.NodeProto, out: dict) -> float:
    """Accumulations of a fixed-weight neuron: for every output neuron, its inputs that spiked."""
    fired = [out[i] < T - 1 for i, T in zip(node.input[:spec.n_spike], spec.windows_in)]
    y = out[node.output[0]]
    if spec.target in ("add", "sub", "concat") or spec.synapse == "one_to_one":
        return float(sum(np.broadcast_to(f, y.shape).sum() for f in fired))
    if spec.synapse == "mean" or spec.target == "log_sum_exp":  # each input neuron feeds its row's one output
        assert y.shape[-1] == 1 and y.size * fired[0].shape[-1] == fired[0].size
        return float(fired[0].sum())
    if spec.target == "rotary":  # x_i*cos_i + x_(i +- d/2)*sin_i, per head of size d
        d = y.shape[-1]
        f = fired[0].reshape(*fired[0].shape[:-1], -1, d).astype(np.int64)
        return float((f + np.roll(f, d // 2, axis=-1)).sum())
    if spec.target == "matmul_weights":  # heads merged, then every input feeds all O outputs
        return float(fired[0].sum()) * y.shape[-1]
    raise AssertionError(f"no independent count for {spec.kind}/{spec.target}")


def test_neuron_counts_match_independent_counts(full_snn):
    qdq, snn_path = full_snn
    qann, snn = onnx.load(str(qdq)), onnx.load(str(snn_path))
    neurons = [n for n in snn.graph.node if is_neuron(n)]
    kinds = {NeuronSpec.from_node(n).kind for n in neurons}
    assert {"product", "elementwise", "mean_square", "lse", "linear"} <= kinds
    stages = find_stages(snn, qann, str(snn_path))
    recv = [n for n in snn.graph.node if n.op_type == "TTFSReceive"]
    probes = [s.out for s in stages] + neuron_probes(snn) + [r.input[0] for r in recv]
    gen = _generator(snn, probes)
    keys = _keys(gen, IDS)
    assert keys == len(IDS)                                            # no prefix in this twin
    out = _run(gen, IDS, probes + [n.output[0] for n in neurons])
    snn_c, qann_c = count_network(snn, stages, out, keys)

    macs, post = qann_product_counts(qann, IDS)
    assert macs > 0 and post > 0                                       # QK^T, PV, gate*up, x*r; gamma after x*r
    assert snn_c.mul_synaptic == pytest.approx(macs + post)            # one MUL per product synapse + gamma

    dims = {t.name: tuple(t.dims) for t in snn.graph.initializer}
    recv_acs = 0.0
    for r in recv:
        T = next(s.T for s in stages if s.out == r.input[0])
        recv_acs += spike_count(out[r.input[0]], T) * dims[r.input[1]][1]
    fixed = sum(fixed_synapse_acs(NeuronSpec.from_node(n), n, out) for n in neurons
                if NeuronSpec.from_node(n).synapse != "operand")
    assert fixed > 0
    # product synapses accumulate on every synapse: as many ACs as the QANN's activation MACs
    assert snn_c.ac_synaptic == pytest.approx(recv_acs + fixed + macs)

    # the QANN: its int8 weight MatMuls (receives and o_proj behind wiring) and its own float ops
    qann_dense = sum(out[r.input[0]].size // dims[r.input[1]][0] * math.prod(dims[r.input[1]]) for r in recv)
    o_proj = [n for n in neurons if NeuronSpec.from_node(n).target == "matmul_weights"]
    assert len(o_proj) == 2
    qann_dense += sum(out[n.output[0]].size * out[n.input[0]].shape[1] * out[n.input[0]].shape[-1] for n in o_proj)
    assert qann_c.mac_dense == qann_dense
    qann_float = float_op_counts(qann, IDS)[0]
    assert qann_float >= macs + post                                   # the products are among its float ops
    assert float_op_counts(snn, IDS)[0] < 0.01 * qann_float            # the SNN keeps only rotary-table arithmetic


def test_coverage_shares_the_neuron_count(full_snn):
    """``compile --json``'s coverage and the report count a neuron's multiplies with the same rule."""
    from ttfsc.compiler.coverage import coverage
    qdq, snn_path = full_snn
    snn = onnx.load(str(snn_path))
    cov = coverage(snn, str(snn_path.parent), context=len(IDS))
    probe_ids = list(np.arange(len(IDS)) % 3 + 3)                      # coverage's probe tokens
    stages = find_stages(snn, None, str(snn_path))
    probes = [s.out for s in stages] + neuron_probes(snn)
    gen = _generator(snn, probes)
    out = _run(gen, probe_ids, probes + [n.output[0] for n in snn.graph.node if is_neuron(n)])
    snn_c, _ = count_network(snn, stages, out, _keys(gen, probe_ids))
    macs, post = qann_product_counts(onnx.load(str(qdq)), probe_ids, where="layers.")  # coverage: decoder blocks
    assert cov["ops_per_token"]["ttfs"]["muls"] * len(IDS) == pytest.approx(macs + post)
    assert snn_c.mul_synaptic > macs + post                            # the report also counts the final norm
    # a wired o_proj sums over its weight's 64 rows (not the probe's context)
    assert cov["ops_per_token"]["ttfs"]["adds"] > 2 * 64 * 64


def test_report_cli_on_full_model(full_snn, tmp_path):
    qdq, snn = full_snn
    text = tmp_path / "t.txt"
    text.write_text("A small robot counted spikes, one by one, all day long. ")
    out = tmp_path / "rep"
    assert main(["report", str(snn), "--text", str(text), "--out", str(out), "--tokens", "16"]) == 0
    r = json.loads((out / "report.json").read_text())
    ops = r["ops_per_token"]
    assert ops["neuron_stages"] == sum(1 for n in onnx.load(str(snn)).graph.node if is_neuron(n))
    assert ops["snn"]["mul_synaptic"] > 0 and ops["qann"]["mac_float"] > ops["snn"]["mac_float"]
    en = r["energy_pj_per_token"]["snn"]
    assert en["MUL product synapses (run-time weights)"] == pytest.approx(ops["snn"]["mul_synaptic"] * 3.7)
    t = r["trace"]
    assert t["sim_matches_runtime_spikes"] is None                     # a neuron stage: no potential to step
    assert t["receive_max_abs_diff"] <= 1e-4 * max(t["receive_scale"], 1.0)
    assert "TTFSNeuron stages" in (out / "report.md").read_text()
