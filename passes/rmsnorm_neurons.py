"""Pass: RMSNorm's mean-square group (x^2 -> mean over the hidden dim) ==> TTFSNeuron.

RMSNorm = mean-square neuron -> x^-1/2 neuron -> product with x (and gamma). This pass builds
the first: one neuron per token with I synapses (the hidden dim), input kernel from f(x) = x^2
on the input grid (Theorem 2), weight 1/I each and the output grid's Corollary-1 emission, so
its potential at t_emit is mean(x^2) and it fires at the rounded mean square. The x^-1/2 step
(Add eps -> Sqrt -> Div) is a one-input elementwise group (passes/elementwise_neurons.py: a
table neuron), and x*r[*gamma] a product (passes/product_neurons.py); gamma stays in that
product: folding it into the next weights would change the QANN's rounding of x*r*gamma.

Operations per output neuron: I accumulations (one per synapse), no multiplication by a run-time
value (1/I is a fixed weight; x^2 is the shape of eta, not a multiply).
Run time: the QANN's own float ops as the body (Pow/ReduceMean), then the quantizer: bit-exact.
"""
from __future__ import annotations

import numpy as np

from ttfsc.graph import GraphIndex
from ttfsc.passes.base import Match, Pass
from ttfsc.passes.neuron_groups import Group, NeuronRule, static_dim, target_kernel


class MeanSquareToNeuron(NeuronRule):
    name = "MeanSquareToNeuron"
    kind = "mean_square"

    def accepts(self, grp: Group) -> bool:
        ops = set(grp.compute_ops)
        squares = "Pow" in ops or any(n.op_type == "Mul" and n.input[0] == n.input[1] for n in grp.nodes)
        return (len(grp.spikes) == 1 and not grp.sides and "ReduceMean" in ops and squares
                and not ops & {"Exp", "Log", "MatMul", "Sqrt"})

    def kernels(self, g: GraphIndex, m: Match, kw: dict) -> None:
        grp: Group = m.nodes["group"]
        eta, c = target_kernel(np.square, kw)
        fan_in = static_dim(m.nodes["info"], grp.spikes[0][0], -1)
        kw.update(target="mean_square", eta=(eta,), c_offset=(c,), weights=(1.0 / fan_in if fan_in > 0 else 0.0,),
                  synapse="mean", fan_in=fan_in)


class RMSNormNeurons(Pass):
    name = "rmsnorm_neurons"
    rule_types = (MeanSquareToNeuron,)
