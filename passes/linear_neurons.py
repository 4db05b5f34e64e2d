"""Pass: linear multi-input groups (residual add, x - LSE, rotary) ==> TTFSNeuron.

A residual add or a softmax difference is a neuron with step-kernel synapses (Theorem 2 with
f = identity) from each input stage and fixed weights (+1, +1) or (+1, -1): its potential at
t_emit is the QANN's float sum, and the output grid's Corollary-1 emission rounds it. Rotary
(``x*cos + rotate_half(x)*sin``) is linear in x with weights that are constant per position:
the synapse weights are the position's cos/sin (side inputs gathered by position, never
spikes), the rotate-half permutation and sign are wiring and weight signs.

Operations per output neuron: one accumulation per synapse (2 for residual/difference/rotary),
no multiplication by a run-time activation (fixed and per-position weights are ordinary
synaptic weights). The attention mask of a difference group, if present, is a side input added
unchanged, so masked positions stay exactly as the QANN has them.

Run time: the QANN's own float ops as the body, then the Corollary-1 quantizer: bit-exact.
"""
from __future__ import annotations

from ttfsc.passes.base import GraphIndex, Match, Pass
from ttfsc.passes.neuron_groups import PLUMBING, Group, NeuronRule, count_ops, step_kernel

LINEAR = {"Add", "Sub", "Mul", "Div", "Neg", "Where", "Sum"}


class LinearToNeuron(NeuronRule):
    name = "LinearToNeuron"
    kind = "linear"

    def accepts(self, grp: Group) -> bool:
        if grp.activation_products() or not set(grp.op_types) <= LINEAR | PLUMBING:
            return False
        return len(grp.spikes) >= 2 or bool(grp.sides)

    def kernels(self, g: GraphIndex, m: Match, kw: dict) -> None:
        grp: Group = m.nodes["group"]
        etas, cs = zip(*(step_kernel(T, r, s) for T, r, s in zip(kw["windows_in"], kw["t_refs_in"], kw["steps_in"])))
        ops = set(grp.compute_ops)
        if grp.sides and "Mul" in ops:
            target, synapse, weights = "rotary", "per_position", ()
        else:
            live = grp.spike_derived()  # the node that joins two spike inputs (not a mask add)
            joins = [n for n in grp.nodes if n.op_type in ("Add", "Sub") and all(i in live for i in n.input[:2])]
            root = (joins or [n for n in grp.nodes if n.op_type in ("Add", "Sub")])[0]
            target, synapse = ("sub", "fixed") if root.op_type == "Sub" else ("add", "fixed")
            weights = tuple(1.0 if (root.op_type == "Add" or j == 0) else -1.0 for j in range(len(grp.spikes)))
        adds, _ = count_ops(grp, m.nodes["info"], product=False)
        adds = max(adds, 2.0) if target == "rotary" else adds  # x_i*cos + x_(i+-d/2)*sin: two synapses
        kw.update(target=target, eta=tuple(tuple(e) for e in etas), c_offset=tuple(cs), weights=weights,
                  synapse=synapse, fan_in=len(grp.spikes), adds=adds, muls=0.0)


class LinearNeurons(Pass):
    name = "linear_neurons"

    def __init__(self):
        self.rules = (LinearToNeuron(),)
