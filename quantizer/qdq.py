"""Writing the QANN: Q/DQ chains for activations, int8 codes + DequantizeLinear for weights.

The QANN is an ordinary ONNX model that plain onnxruntime runs; the TTFS compiler later reads its
scales and zero points, so the representation below is a contract, not an implementation detail.

Targets. Every ``MatMul`` whose second input is a float32 initializer (a linear layer, weight
``[in, out]``, lm_head included). Nothing else is touched: the attention-mask ``Add`` and the
attention score / probability-value ``MatMul``s (both inputs computed) stay float.

Weights: per output channel (axis 1 of ``[in, out]``), symmetric, zero point 0::

    W_q (int8 initializer) --DequantizeLinear(axis=1, scale[out], zero_point int8[out] = 0)--> MatMul

``--wbits 8`` stores codes in ``[-127, 127]`` (-128 is never used, so the grid is symmetric).
``--wbits 4`` stores codes in ``[-7, 7]`` *in an int8 tensor*: ONNX ``INT4`` needs opset 21 and the
exported decoder is opset 18, so the width is carried by the code range (and by the metadata key
``ttfsc.wbits``), not by the type.

Activations (the first input of each target): an n-bit code (ranges.py) has no ONNX type, so it
is carried in a wider unsigned type and restricted to ``0..N`` by a ``Clip`` whose bounds are
exactly ``ttfsc.ttfs.clip_bounds(scale, z, N)``::

    x --Clip(lo, hi)--> QuantizeLinear(scale, z) --> DequantizeLinear(scale, z) --> MatMul(s)

For ``abits <= 8`` the zero point is ``uint8`` and the standard ops are used. For 9..12 bits it is
``uint16`` and the Q/DQ nodes are onnxruntime's ``com.microsoft`` contrib ops (standard ONNX only
accepts 16-bit codes from opset 21). Scale and zero point are scalar initializers. A tensor
feeding several targets (q/k/v share their input) gets one Clip->Q->DQ chain shared by all.

Running the QANN. ``onnxruntime`` with its default optimisations fuses DQ->MatMul into integer
kernels (MatMulIntegerToFloat, MatMulNBits). On x86 CPUs without VNNI the u8 x s8 kernel adds
pairs of products in int16, which saturates when 8-bit activation codes (up to 255) meet 8-bit
weight codes (up to 127): W8A8 then runs visibly less accurately than its own QDQ math. For
bit-exact QDQ numerics set the session option ``session.disable_quant_qdq = 1`` (or disable graph
optimisations); abits <= 7 or wbits = 4 cannot saturate.

Memory stays bounded: weights are read one at a time (memory-mapped for external data), quantized
in row blocks and spilled to a temporary file that ``modelio.save_model`` streams into the output.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ttfsc import modelio
from ttfsc.errors import TtfscError
from ttfsc.graph import MS_DOMAIN, drop_metadata, set_metadata
from ttfsc.quantizer.config import WEIGHT_BITS
from ttfsc.quantizer.gptq import gptq_codes
from ttfsc.quantizer.ranges import ActParams
from ttfsc.quantizer.rotate import ONLINE_TRANSFORM_SUFFIX
from ttfsc.quantizer.weights import row_blocks, weight_codes, weight_scales

Chain = tuple[list[onnx.NodeProto], str]  # new nodes and the tensor their consumers read


# ---------------------------------------------------------------- what gets quantized

def find_linears(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a 2-D float32 initializer: the model's linear layers."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        if ONLINE_TRANSFORM_SUFFIX in node.name:  # a constant rotation kept in float by design
            continue
        w = inits.get(node.input[1])
        if w is not None and w.data_type == TensorProto.FLOAT and len(w.dims) == 2:
            out.append(node)
    return out


#: what the user is told when a model has no linear layer to quantize (an already quantized one, most likely)
NOT_A_FLOAT_MODEL = (" to quantize; give a float model exported with `ttfsc export` "
                     "(not an already quantized one).")


def float_linears(model: onnx.ModelProto, path: str, hint: str = NOT_A_FLOAT_MODEL) -> list[onnx.NodeProto]:
    """``find_linears``, or the user error of a model that has none: ``path`` is not a float export.

    Quantizing and the continuous baseline both start from the float model's linear layers;
    ``hint`` ends the message with what the caller needs.
    """
    linears = find_linears(model)
    if not linears:
        raise TtfscError(f"{path}: no MatMul with a float32 initializer weight{hint}")
    return linears


def activation_names(model: onnx.ModelProto, linears: list[onnx.NodeProto]) -> list[str]:
    """Distinct first inputs of the linears, in graph order; constants are not activations."""
    inits = {t.name for t in model.graph.initializer}
    names: list[str] = []
    for node in linears:
        x = node.input[0]
        if x and x not in inits and x not in names:
            names.append(x)
    return names


def check_opset(model: onnx.ModelProto, path: str) -> None:
    """Per-axis DequantizeLinear needs opset 13; the Optimum export is 18."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < 13:
        raise TtfscError(f"{path}: opset {version} is too old for per-channel QDQ (needs 13+). "
                         "Re-export the model with `ttfsc export` (opset 18).")


# ---------------------------------------------------------------- chains

class Names:
    """Unique tensor/node names: quantizer tensors must never collide with the model's."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.used = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for n in g.node:
            self.used.update(n.input)
            self.used.update(n.output)
            self.used.add(n.name)

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name


def _scalar(value: Any, dtype: np.dtype, name: str) -> TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def activation_chain(x: str, p: ActParams, names: Names) -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """Clip -> QuantizeLinear -> DequantizeLinear for tensor ``x``; returns nodes, initializers, DQ output."""
    wide = p.N > 255
    zdtype, domain = (np.uint16, MS_DOMAIN) if wide else (np.uint8, "")
    base = x.strip("/").replace("/", "_") or "act"
    lo, hi, s, z = (names(f"{base}_clip_lo"), names(f"{base}_clip_hi"), names(f"{base}_scale"), names(f"{base}_zero_point"))
    inits = [_scalar(p.lo, np.float32, lo), _scalar(p.hi, np.float32, hi), _scalar(p.scale, np.float32, s),
             _scalar(p.zero_point, zdtype, z)]
    clipped, q, dq = names(f"{base}_clipped"), names(f"{base}_quantized"), names(f"{base}_dequantized")
    nodes = [
        helper.make_node("Clip", [x, lo, hi], [clipped], name=names(f"{base}_Clip")),
        helper.make_node("QuantizeLinear", [clipped, s, z], [q], name=names(f"{base}_QuantizeLinear"), domain=domain),
        helper.make_node("DequantizeLinear", [q, s, z], [dq], name=names(f"{base}_DequantizeLinear"), domain=domain),
    ]
    return nodes, inits, dq


def weight_chain(qt: TensorProto, scale: np.ndarray, names: Names) -> tuple[onnx.NodeProto, list[TensorProto], str]:
    """DequantizeLinear(axis=1) of an int8 weight with per-channel scales and zero points 0."""
    base = qt.name.strip("/").replace("/", "_")
    s, z, out = names(f"{base}_scale"), names(f"{base}_zero_point"), names(f"{base}_dequantized")
    inits = [numpy_helper.from_array(scale, s), numpy_helper.from_array(np.zeros(scale.shape, np.int8), z)]
    node = helper.make_node("DequantizeLinear", [qt.name, s, z], [out], name=names(f"{base}_DequantizeLinear"), axis=1)
    return node, inits, out


def use_contrib_domain(model: onnx.ModelProto, params: Iterable[ActParams]) -> None:
    """Import onnxruntime's contrib domain when any quantizer has more than 8 bits (its Q/DQ take uint16)."""
    if any(p.N > 255 for p in params) and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def insert_before_consumers(model: onnx.ModelProto, chains: list[Chain]) -> None:
    """Put each new chain right before the first node reading its output, keeping topological order."""
    consumers: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for x in node.input:
            consumers.setdefault(x, i)
    before: dict[int, list[onnx.NodeProto]] = {}
    for nodes, out in chains:
        before.setdefault(consumers[out], []).extend(nodes)
    new_nodes = []
    for i, node in enumerate(model.graph.node):
        new_nodes.extend(before.get(i, []))
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)


def _used_names(model: onnx.ModelProto) -> set[str]:
    used = {o.name for o in model.graph.output}
    for node in model.graph.node:
        used.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                for sub in a.g.node:
                    used.update(sub.input)
    return used


def drop_unused_initializers(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove the initializers among ``candidates`` that nothing reads any more (the float weights)."""
    used = _used_names(model)
    keep = [t for t in model.graph.initializer if t.name not in candidates or t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def replace_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Drop any earlier entries of these keys, then append them in order (the QANN's metadata layout)."""
    drop_metadata(model, list(entries))
    set_metadata(model, entries)


# ---------------------------------------------------------------- weights

def quantize_weight(inits: modelio.Initializers, name: str, qmax: int, spill: modelio.SpillFile,
                    hessian: Any = None) -> tuple[TensorProto, np.ndarray]:
    """Quantize one [in, out] weight (RTN block by block, or GPTQ given its input Hessian); return its
    spilled int8 tensor and scales (the same scales either way)."""
    w = inits.value(name)
    scale = weight_scales(w, qmax, name)
    start = spill.begin()
    if hessian is not None:
        spill.write(gptq_codes(np.asarray(w, dtype=np.float32), scale, qmax, hessian))
    else:
        for r in row_blocks(w):
            spill.write(weight_codes(np.asarray(w[r], dtype=np.float32), scale, qmax))
    del w
    return spill.tensor(f"{name}_quantized", TensorProto.INT8, inits.by_name[name].dims, start), scale


def quantize_weights(model: onnx.ModelProto, linears: list[onnx.NodeProto], wbits: int,
                     spill: modelio.SpillFile, hessians: dict[str, Any] | None = None
                     ) -> tuple[list[Chain], set[str]]:
    """Point each linear at int8 codes + per-channel DQ; returns the DQ chains and replaced weights.

    Nodes are rewired in place; the chains are inserted later in one pass (rebuilding the node
    list copies the protobuf messages, so ``linears`` must not be used after that).
    """
    inits = modelio.Initializers(model)
    names = Names(model)
    qmax = WEIGHT_BITS[wbits]
    done: dict[str, str] = {}
    chains, new_inits = [], []
    for node in linears:
        w = node.input[1]
        if w not in done:
            qt, scale = quantize_weight(inits, w, qmax, spill, (hessians or {}).get(w))
            qt.name = names(qt.name)
            dq_node, extra, out = weight_chain(qt, scale, names)
            new_inits += [qt, *extra]
            chains.append(([dq_node], out))
            done[w] = out
        node.input[1] = done[w]
    model.graph.initializer.extend(new_inits)
    return chains, set(done)


# ---------------------------------------------------------------- activations

def quantize_activations(model: onnx.ModelProto, linears: list[onnx.NodeProto],
                         params: dict[str, ActParams]) -> list[Chain]:
    """One shared Clip->Q->DQ per calibrated activation; every target reading it reads the DQ."""
    names = Names(model)
    chains, new_inits, dq_of = [], [], {}
    for x, p in params.items():
        nodes, extra, dq = activation_chain(x, p, names)
        chains.append((nodes, dq))
        new_inits += extra
        dq_of[x] = dq
    for node in linears:
        if node.input[0] in dq_of:
            node.input[0] = dq_of[node.input[0]]
    model.graph.initializer.extend(new_inits)
    use_contrib_domain(model, params.values())
    return chains


def write_qann(model: onnx.ModelProto, linears: list[onnx.NodeProto], params: dict[str, ActParams], wbits: int,
               meta: dict[str, str], out_path: str | os.PathLike, hessians: dict[str, Any] | None = None) -> int:
    """Rewrite ``model`` into the QDQ form and save it; quantized weights pass through a spill file."""
    with modelio.SpillFile.beside(out_path, "qweights") as spill:
        w_chains, replaced = quantize_weights(model, linears, wbits, spill, hessians)
        a_chains = quantize_activations(model, linears, params)
        insert_before_consumers(model, w_chains + a_chains)
        return save_qann(model, replaced, meta, out_path)


def save_qann(model: onnx.ModelProto, replaced: set[str], meta: dict[str, str], out_path: str | os.PathLike) -> int:
    """The end every QANN writer shares: drop the float weights the int8 ones replaced, set ``meta``, save.

    Returns the number of weights quantized. Call it inside the spill file's block: the save
    streams the new weights out of it.
    """
    drop_unused_initializers(model, replaced)
    replace_metadata(model, meta)
    modelio.save_model(model, out_path)
    return len(replaced)
