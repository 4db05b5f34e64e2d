"""``TTFSNeuron``: one stage of nonlinear / product / multi-input TTFS neurons (domain ai.ttfsc).

``TTFSNeuron(t_1..t_k, side_1..side_m, const_1..const_c) -> t``
    Receives the spike times of ``k`` earlier stages and emits spike times on its own window.
    It replaces one *stage group* of a fully quantized twin: the float ops between a set of
    per-tensor DequantizeLinears and one QuantizeLinear (SiLU, mean square, x^-1/2, log-sum-exp,
    a product of two activations, a residual add, rotary, ...).

Attributes (two families):

* What the neuron *is* (Theorem 2): ``kind``, ``target`` (the function's name), per spike input
  ``windows_in``/``t_refs_in``/``steps_in``, the input kernels ``eta`` (concatenated, N_in_j
  floats each), ``c_offset`` (f_j(a_in_j) per input; with Theorem 2's bias C this cancels the
  kernels' offset), ``weights`` (fixed synaptic weight per input; ``synapse`` says how they are
  used: ``one_to_one``, ``mean`` (1/I over the fan-in), ``fixed``, ``operand`` (the weight is the
  other operand's decoded value: a product) or ``per_position`` (rotary: a side input supplies
  one constant weight per position)), ``fan_in``, the output function ``h`` (``identity`` or
  ``log``) and the emission ``window``/``t_ref``/``step``/``psi``/``theta``/``tie_rule`` plus
  ``qann_tensor``/``qann_code_min`` (read by EmitSpec.from_node, so stages, latency and the
  verifier treat a neuron like any other emission). Operations one output neuron costs:
  ``fan_in`` accumulations (one per synapse; -1 means the context length), plus
  ``synapse_muls`` multiplications per synapse (1 when the weight is a run-time activation: a
  product) and ``muls`` more per neuron (e.g. gamma applied to a run-time product); see
  :meth:`NeuronSpec.ops`.
* How it *runs* bit-exactly: ``body`` is the QANN's own float subgraph (inputs: the decoded
  spike inputs, then the side inputs and constants; output: the potential the QANN quantized),
  and for a one-input elementwise neuron ``table`` is its realised function, output spike time
  per input spike time (obtained by running ``body`` on every input time).

* ``gate_time`` (optional, with a ``table``): the neuron's one side input is an additive mask
  the compiler proved two-valued (0 or a constant so negative that the output is one fixed
  code: softmax's exp reads ``d + mask``, exp(-inf) = 0). It acts as an inhibitory gate: where
  the mask is 0 the neuron fires at ``table[t]``, elsewhere at ``gate_time`` whatever t is.

This module is the node's description, part of the ``ai.ttfsc`` dialect (ground floor): the
passes build it, the runtime (``ttfsc.runtime.neuron``: a Gather on ``table``, or the decoded
inputs through ``body`` and the Corollary-1 quantizer) lowers it, inspect and report read it.
``ttfsc.ttfs.realised_function`` (Theorem 1) computes what ``eta``/``psi``/``theta``/``c_offset``
realise, and ``ttfsc inspect --neurons`` checks it against the table / target.

Precision: ONNX float attributes are float32, too coarse for kernels of a wide dynamic range
(log-sum-exp's exp/log kernels span many e-folds). The kernels are therefore also stored in
float64 as ``eta_f64``, ``c_offset_f64``, ``psi_f64``, ``theta_f64``: integer lists holding the
doubles' IEEE bit patterns (an INTS attribute is lossless and, unlike a tensor attribute, never
moved to the external data file), which :meth:`NeuronSpec.from_node` prefers; the float32 lists
stay for readers of the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import helper

from ttfsc.dialect import NEURON, EmitSpec, attr_text, attrs
from ttfsc.ttfs import DOMAIN, tau_of_step

SYNAPSES = ("one_to_one", "mean", "fixed", "operand", "per_position")


@dataclass
class NeuronSpec:
    """Everything a TTFSNeuron node carries (see the module docstring)."""

    emit: EmitSpec
    kind: str
    target: str
    windows_in: tuple[int, ...]
    t_refs_in: tuple[int, ...]
    steps_in: tuple[float, ...]
    eta: tuple[tuple[float, ...], ...]
    c_offset: tuple[float, ...]
    weights: tuple[float, ...]
    synapse: str
    body: onnx.GraphProto
    fan_in: int = 1
    h: str = "identity"
    synapse_muls: float = 0.0
    muls: float = 0.0
    table: tuple[int, ...] = field(default=())
    gate_time: int = -1

    @property
    def n_spike(self) -> int:
        return len(self.windows_in)

    def ops(self, context: int) -> tuple[float, float]:
        """(additions, multiplications) per output neuron; a fan-in of -1 is ``context`` keys."""
        k = self.fan_in if self.fan_in > 0 else context
        return float(k), k * self.synapse_muls + self.muls

    def make_node(self, inputs: list[str], t: str, name: str) -> onnx.NodeProto:
        e = self.emit
        kw = dict(window=e.T, t_ref=e.t_ref, step=e.step, tau=tau_of_step(e.step), psi=list(e.psi),
                  theta=e.theta, tie_rule=e.tie_rule, qann_tensor=e.qann_tensor, qann_code_min=e.qann_code_min,
                  kind=self.kind, target=self.target, n_spike=self.n_spike, windows_in=list(self.windows_in),
                  t_refs_in=list(self.t_refs_in), steps_in=list(self.steps_in),
                  eta=[float(v) for k in self.eta for v in k], c_offset=list(self.c_offset),
                  synapse=self.synapse, fan_in=int(self.fan_in), h=self.h,
                  synapse_muls=float(self.synapse_muls), muls=float(self.muls), body=self.body)
        kw.update(eta_f64=_f64([v for k in self.eta for v in k]), c_offset_f64=_f64(self.c_offset),
                  psi_f64=_f64(e.psi), theta_f64=_f64([e.theta]))
        if self.weights:  # absent for product / per-position synapses (the weight is a run-time value)
            kw["weights"] = [float(v) for v in self.weights]
        if self.table:
            kw["table"] = [int(v) for v in self.table]
        if self.gate_time >= 0:
            kw["gate_time"] = int(self.gate_time)
        return helper.make_node(NEURON, inputs, [t], name=name, domain=DOMAIN, **kw)

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> "NeuronSpec":
        a = attrs(node)
        wins = tuple(int(v) for v in a["windows_in"])
        flat, eta, i = _read64(a, "eta"), [], 0
        for T in wins:
            eta.append(tuple(flat[i:i + T - 1]))
            i += T - 1
        emit = replace(EmitSpec.from_node(node), psi=tuple(_read64(a, "psi")), theta=_read64(a, "theta")[0])
        return cls(emit, attr_text(a["kind"]), attr_text(a["target"]), wins,
                   tuple(int(v) for v in a["t_refs_in"]), tuple(float(v) for v in a["steps_in"]), tuple(eta),
                   tuple(_read64(a, "c_offset")), tuple(float(v) for v in a.get("weights", [])),
                   attr_text(a["synapse"]), a["body"], int(a.get("fan_in", 1)),
                   attr_text(a.get("h", "identity")), float(a.get("synapse_muls", 0.0)), float(a.get("muls", 0.0)),
                   tuple(int(v) for v in a.get("table", [])), int(a.get("gate_time", -1)))


def _f64(values) -> list[int]:
    """Doubles as their int64 bit patterns (lossless in an INTS attribute)."""
    return [int(v) for v in np.asarray(values, dtype=np.float64).reshape(-1).view(np.int64)]


def _read64(a: dict, name: str) -> list[float]:
    """A kernel in float64 when the node has it (``<name>_f64``), else its float32 attribute."""
    if f"{name}_f64" in a:
        return [float(v) for v in np.asarray(a[f"{name}_f64"], dtype=np.int64).view(np.float64)]
    v = a[name]
    return [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def is_neuron(node: onnx.NodeProto) -> bool:
    """A TTFSNeuron node of the ai.ttfsc domain."""
    return node.domain == DOMAIN and node.op_type == NEURON
