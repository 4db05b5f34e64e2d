"""Pass: one-input elementwise stage groups (SiLU, GELU, exp, x^-1/2, square, ...) ==> TTFSNeuron.

The neuron (Theorem 2): a one-to-one synapse from the input stage, input kernel
``eta(u) = f(a_in + (u+1)*step_in) - f(a_in + u*step_in)`` built from the *target* f on the
input grid (f evaluated in float64 from the QANN's own ops, e.g. x*sigmoid(x)), ``C`` from
``f(a_in)``, and the output grid's Corollary-1 emission (psi = step_out, theta = b - step_out/2),
so its potential at t_emit is f(x) and it fires at round(f(x)) on the output grid.

A side input (softmax's exp reads ``DQ(d) + mask``, the additive mask 0 or -inf): when the graph
proves the mask two-valued (a ``Where`` of two constants, moved only by reshapes/slices/expands,
as Optimum exports it), the neuron is its unmasked table plus an inhibitory gate (a masked
position fires at the one time of exp(-inf) = 0); otherwise it keeps its body as its run-time
form (decode, the QANN's ops, the quantizer). Either way masked positions are exactly the
QANN's; the kernels describe the unmasked function.

Run time: the neuron's realised function is a map from input spike time to output spike time,
at most 2^n entries. It is obtained by running the QANN's own DQ -> ops -> Q on every input
time in onnxruntime, and the node is lowered to one Gather on that table: bit-exact to the
QANN by construction, and no float arithmetic at run time. Counted cost per neuron: one
accumulation (its one synapse), no multiplication: a hardware neuron with this eta integrates
it over the window after the input spike exactly as it would a step kernel.
``ttfsc inspect --neurons`` checks (Theorem 1) that the kernels realise the same table except
where the float64 target and the QANN's float32 kernels straddle a rounding boundary.
"""
from __future__ import annotations

import numpy as np

from ttfsc.graph import GraphIndex
from ttfsc.neuron import NeuronSpec
from ttfsc.passes.base import Match, Pass
from ttfsc.passes.neuron_groups import (ELEMENTWISE, Group, NeuronRule, eval_body_f64, realise_table, target_kernel,
                                        two_values)

#: recognisable targets, by the set of arithmetic ops in the group
TARGETS = {frozenset({"Sigmoid", "Mul"}): "silu", frozenset({"Exp"}): "exp", frozenset({"Pow"}): "square",
           frozenset({"Add", "Sqrt", "Div"}): "rsqrt", frozenset({"Add", "Sqrt", "Reciprocal"}): "rsqrt",
           frozenset({"Erf", "Mul", "Add"}): "gelu", frozenset({"Erf", "Mul", "Add", "Div"}): "gelu",
           frozenset({"Log"}): "log", frozenset({"Sigmoid"}): "sigmoid", frozenset({"Tanh"}): "tanh"}


def target_name(grp: Group) -> str:
    ops = frozenset(grp.compute_ops) - {"Identity", "Cast"} - ({"Add"} if grp.sides else set())  # mask add
    return TARGETS.get(ops, "+".join(sorted(ops)) or "identity")


class ElementwiseToNeuron(NeuronRule):
    name = "ElementwiseToNeuron"
    kind = "elementwise"

    def accepts(self, grp: Group) -> bool:
        """One spike input, elementwise ops; a side input is allowed (softmax's exp adds the mask)."""
        return len(grp.spikes) == 1 and all(op in ELEMENTWISE for op in grp.op_types)

    def check(self, g: GraphIndex, m: Match) -> str | None:
        grp: Group = m.nodes["group"]
        if any(np.asarray(g.const(c)).size != 1 for c in grp.consts):
            return "a per-channel constant: the neuron is not the same function on every channel"
        return super().check(g, m)

    def kernels(self, g: GraphIndex, m: Match, kw: dict) -> None:
        grp: Group = m.nodes["group"]
        body = m.nodes["body"]
        names = [vi.name for vi in body.input]  # spike, sides, constants, in this order
        x_name, n_side = names[0], len(grp.sides)
        sides = dict.fromkeys(names[1:1 + n_side], 0.0)  # the target on an unmasked position (mask = 0)
        consts = {nm: g.const(c) for nm, c in zip(names[1 + n_side:], grp.consts)}

        def f(x: np.ndarray) -> np.ndarray:
            return eval_body_f64(m.nodes["body"], {x_name: x, **sides, **consts}, g.inits.base_dir)

        eta, c = target_kernel(f, kw)
        kw.update(target=target_name(grp), eta=(eta,), c_offset=(c,), weights=(1.0,), synapse="one_to_one", fan_in=1)

    def realise(self, g: GraphIndex, m: Match, spec: NeuronSpec, feeds: list[str]) -> None:
        """A table of the realised function; with a two-valued mask, a table plus an inhibitory gate.

        Without side input the output depends on the input time alone. With one side input that
        the graph proves two-valued, {0, v} (softmax's exp: ``d + mask``), the table is the
        unmasked function and the other value must give one output time for every input time
        (exp(d + v) below half of p's step: code 0): that time is the gate's. Any other side
        input keeps the body.
        """
        grp: Group = m.nodes["group"]
        consts = {n: g.const(n) for n in feeds[1 + len(grp.sides):]}
        opsets = list(g.model.opset_import)
        if not grp.sides:
            spec.table = realise_table(spec, feeds, consts, opsets)
            return
        vals = two_values(g, grp.sides[0]) if len(grp.sides) == 1 else None
        if vals is None or 0.0 not in vals:
            return
        other = vals[1] if vals[0] == 0.0 else vals[0]
        side = grp.sides[0]
        gated = realise_table(spec, feeds, {**consts, side: np.float32(other)}, opsets)
        if len(set(gated)) != 1:
            return
        spec.table = realise_table(spec, feeds, {**consts, side: np.float32(0.0)}, opsets)
        spec.gate_time = gated[0]


class ElementwiseNeurons(Pass):
    name = "elementwise_neurons"
    rule_types = (ElementwiseToNeuron,)
