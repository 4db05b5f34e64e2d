"""Pass: linear multi-input groups (residual add, x - LSE, rotary, KV concat) ==> TTFSNeuron.

A residual add or a softmax difference is a neuron with step-kernel synapses (Theorem 2 with
f = identity) from each input stage and fixed weights (+1, +1) or (+1, -1): its potential at
t_emit is the QANN's float sum, and the output grid's Corollary-1 emission rounds it. Rotary
(``x*cos + rotate_half(x)*sin``) is linear in x with weights that are constant per position:
the synapse weights are the position's cos/sin (side inputs gathered by position, never
spikes), the rotate-half permutation and sign are wiring and weight signs.

A KV-cache group (``Concat(past, DQ(k)) -> Q`` on k's own grid) is a relay: the new key's spike
passes through a one-to-one unit-weight synapse; the past (a side input: the cache the caller
feeds back) is encoded on the same grid.

Operations per output neuron: one accumulation per synapse (2 for residual/difference/rotary),
no multiplication by a run-time activation (fixed and per-position weights are ordinary
synaptic weights). The attention mask of a difference group, if present, is a side input added
unchanged, so masked positions stay exactly as the QANN has them.

Run time: the QANN's own float ops as the body, then the Corollary-1 quantizer: bit-exact.
"""
from __future__ import annotations

from ttfsc.graph import DATA_MOVEMENT, GraphIndex
from ttfsc.passes.base import Match, Pass
from ttfsc.passes.neuron_groups import Group, NeuronRule, static_dim, step_kernel

LINEAR = {"Add", "Sub", "Mul", "Div", "Neg", "Where", "Sum"}


class LinearToNeuron(NeuronRule):
    name = "LinearToNeuron"
    kind = "linear"

    def accepts(self, grp: Group) -> bool:
        if grp.activation_products() or not set(grp.op_types) <= LINEAR | DATA_MOVEMENT:
            return False
        return len(grp.spikes) >= 2 or bool(grp.sides)

    def kernels(self, g: GraphIndex, m: Match, kw: dict) -> None:
        grp: Group = m.nodes["group"]
        etas, cs = zip(*(step_kernel(T, r, s) for T, r, s in zip(kw["windows_in"], kw["t_refs_in"], kw["steps_in"])))
        ops = set(grp.compute_ops)
        if grp.sides and "Mul" in ops:
            target, synapse, weights = "rotary", "per_position", ()
        elif not ops & {"Add", "Sub", "Sum"}:  # e.g. the KV cache: Concat(past, DQ(k)), a relay on k's grid
            target, synapse, weights = "concat", "one_to_one", (1.0,) * len(grp.spikes)
        else:
            live = grp.spike_derived()  # the node that joins two spike inputs (not a mask add)
            joins = [n for n in grp.nodes if n.op_type in ("Add", "Sub") and all(i in live for i in n.input[:2])]
            root = (joins or [n for n in grp.nodes if n.op_type in ("Add", "Sub")])[0]
            target, synapse = ("sub", "fixed") if root.op_type == "Sub" else ("add", "fixed")
            weights = tuple(1.0 if (root.op_type == "Add" or j == 0) else -1.0 for j in range(len(grp.spikes)))
        fan_in = 2 if target == "rotary" else len(grp.spikes)  # rotary: x_i*cos + x_(i+-d/2)*sin
        kw.update(target=target, eta=tuple(tuple(e) for e in etas), c_offset=tuple(cs), weights=weights,
                  synapse=synapse, fan_in=fan_in)


class WiredLinearToNeuron(NeuronRule):
    """A linear layer whose input passes through wiring first (o_proj: Transpose -> Reshape -> MatMul).

    Same neuron as a TTFSReceive (step kernel, the int8 weights as fixed synaptic weights, K
    accumulations per output neuron), but the decode does not feed the MatMul directly, so the
    reception pass leaves it; the body keeps the QANN's exact float MatMul.
    """

    name = "WiredLinearToNeuron"
    kind = "linear"

    def accepts(self, grp: Group) -> bool:
        mm = [n for n in grp.nodes if n.op_type == "MatMul"]
        return (len(grp.spikes) == 1 and len(mm) == 1 and not grp.activation_products()
                and set(grp.op_types) <= DATA_MOVEMENT | {"MatMul", "Add"})

    def kernels(self, g: GraphIndex, m: Match, kw: dict) -> None:
        grp: Group = m.nodes["group"]
        eta, c = step_kernel(kw["windows_in"][0], kw["t_refs_in"][0], kw["steps_in"][0])
        mm = next(n for n in grp.nodes if n.op_type == "MatMul")
        k = static_dim(m.nodes["info"], mm.input[0], -1)
        kw.update(target="matmul_weights", eta=(tuple(eta),), c_offset=(c,), weights=(), synapse="fixed",
                  fan_in=k)


class LinearNeurons(Pass):
    name = "linear_neurons"
    rule_types = (LinearToNeuron, WiredLinearToNeuron)
