"""Pass: softmax's log-sum-exp group ==> TTFSNeuron (the rest of softmax is two more neurons).

Softmax in a fully quantized twin is three stages: LSE = log(sum_j exp(s_j)) (this pass),
d_i = s_i - LSE (a two-input linear neuron, passes/linear_neurons.py, weights +1/-1, the mask a
side input) and p_i = exp(d_i) (a one-input table neuron, passes/elementwise_neurons.py).

The LSE neuron (the paper's Corollary 4): K synapses (the keys) whose input kernel comes from
f = exp on the input grid (Theorem 2), weight 1, so the potential at t_emit is sum_j exp(s_j);
its output kernel comes from h = log: ``psi(v) = exp(b' - v*step) - exp(b' - (v+1)*step)``,
``theta = exp(b')`` with ``b' = b - step/2`` (ttfs.output_kernels), so it fires at the first k
with log(V) >= b - (k + 1/2)*step: log of the sum, rounded to the output grid. Every kernel is
divided by exp(b') (the potential is counted in units of exp(b'): a common factor of all
kernels and the threshold changes nothing in Eq. 7), so theta = 1 and the kernels stay within
float range whatever the score range; they are stored in float64 (ttfsc.neuron). A masked key
(the QANN adds -inf or a large negative bias before the reduction) contributes exp(-inf) = 0:
in the body the mask is a side input added exactly as the QANN adds it.

Operations per output neuron: K accumulations (one per key), no multiplication by a run-time
value. Run time: the QANN's own float ops as the body, then the quantizer: bit-exact.
"""
from __future__ import annotations

import numpy as np

from ttfsc.graph import GraphIndex
from ttfsc.passes.base import Match, Pass
from ttfsc.dialect import EmitSpec
from ttfsc.passes.neuron_groups import Group, NeuronRule, static_dim, target_kernel
from ttfsc.ttfs import output_kernels, rounding_top


class LogSumExpToNeuron(NeuronRule):
    name = "LogSumExpToNeuron"
    kind = "lse"

    def accepts(self, grp: Group) -> bool:
        ops = set(grp.compute_ops)
        lse = "ReduceLogSumExp" in ops or {"Exp", "ReduceSum", "Log"} <= ops
        return len(grp.spikes) == 1 and lse and not grp.activation_products()

    def kernels(self, g: GraphIndex, m: Match, kw: dict) -> None:
        grp: Group = m.nodes["group"]
        e: EmitSpec = kw["emit"]
        out = e.stage()
        unit = float(rounding_top(out.b, out.step))  # potentials in units of exp(b')

        def exp_u(x: np.ndarray) -> np.ndarray:
            return np.exp(x - unit)

        psi, theta = output_kernels(exp_u, float(out.b), float(out.step), out.N)
        kw["emit"] = EmitSpec(e.T, e.t_ref, e.step, tuple(float(v) for v in psi), float(theta), e.tie_rule,
                              e.qann_tensor, e.qann_code_min)
        fan_in = static_dim(m.nodes["info"], grp.spikes[0][0], -1)
        eta, c = target_kernel(exp_u, kw)
        kw.update(target="log_sum_exp", eta=(eta,), c_offset=(c,), weights=(1.0,), synapse="fixed", fan_in=fan_in,
                  h="log")


class SoftmaxNeurons(Pass):
    name = "softmax_neurons"
    rule_types = (LogSumExpToNeuron,)
