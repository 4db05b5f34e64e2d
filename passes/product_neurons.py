"""Pass: products of two activations (Q.K^T, P.V, gate*up, x*rsqrt [*gamma]) ==> TTFSNeuron.

Realisation chosen (the paper leaves it open): a *product synapse*. Operand x arrives as a
spike on a step-kernel synapse (Theorem 2 with f = identity: the potential ramps by
``step_x`` per time step after the spike, summing to x at t_emit), and the synapse's weight is
the other operand's decoded value y (its own spike sets the weight before the receive window
closes). Integrating ``y * eta_x`` gives x*y, and the output grid's Corollary-1 emission rounds
it: exactly the QANN's quantized product. For Q.K^T and P.V a neuron has K such synapses and
sums them (the dot product), so its potential is the QANN's float MatMul output.

Honest operation count, per output neuron: a product synapse's weight is a run-time value, so
each synapse costs one multiplication (y times x, or y times step_x per step) and one
accumulation: K multiplications + K additions for a K-long dot product (QK^T: K = head dim;
PV: K = context length), 1 + 1 for gate*up, 2 multiplications for x*r*gamma (gamma is a
constant, but it multiplies the run-time product). These are reported on the node (``fan_in``,
``synapse_muls``, ``muls``; NeuronSpec.ops) and in the compile report's coverage; they are never counted as spikes.

Run time: the node carries the QANN's own float ops as its body and lowers to decode -> those
ops -> the Corollary-1 quantizer, so it is bit-exact to the QANN as onnxruntime runs it.
"""
from __future__ import annotations

from ttfsc.graph import GraphIndex
from ttfsc.passes.base import Match, Pass
from ttfsc.passes.neuron_groups import Group, NeuronRule, post_product_muls, static_dim, step_kernel

NONLINEAR = {"Exp", "Log", "ReduceLogSumExp", "Sigmoid", "Erf", "Tanh", "Sqrt", "Pow"}


class ProductToNeuron(NeuronRule):
    name = "ProductToNeuron"
    kind = "product"

    def accepts(self, grp: Group) -> bool:
        return (len(grp.spikes) == 2 and bool(grp.activation_products())
                and not NONLINEAR & set(grp.op_types))

    def kernels(self, g: GraphIndex, m: Match, kw: dict) -> None:
        grp: Group = m.nodes["group"]
        info = m.nodes["info"]
        etas, cs = zip(*(step_kernel(T, r, s) for T, r, s in zip(kw["windows_in"], kw["t_refs_in"], kw["steps_in"])))
        mm = [n for n in grp.activation_products() if n.op_type == "MatMul"]
        fan_in = static_dim(info, mm[0].input[0], -1) if mm else 1
        kw.update(target="matmul" if mm else "mul", eta=tuple(tuple(e) for e in etas), c_offset=tuple(cs),
                  weights=(), synapse="operand", fan_in=fan_in, synapse_muls=1.0,
                  muls=post_product_muls(grp))


class ProductNeurons(Pass):
    name = "product_neurons"
    rule_types = (ProductToNeuron,)
