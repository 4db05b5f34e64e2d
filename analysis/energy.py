"""Operation and energy accounting of a spiking model and of the QANN it came from (pure functions).

``ttfsc report`` feeds these functions with what one real run measured (spike times / counts,
tensor shapes); tests feed them hand-built numbers. Nothing here runs a model, so every count
can be checked by hand.

Counting rules (per run; the report divides by the run's tokens):

* **Spikes.** TTFS: one per neuron with ``t < N`` (``t = N`` is silent); rate: the sum of the
  counts (``ttfsc.ttfs.spike_count`` / ``rate_spike_count``). Silent fraction: neurons without
  a spike.
* **Accumulates (AC), synaptic.** A receiving layer adds one weight per incoming spike and
  synapse: ``spikes_in * fan_out``. With a step input kernel the weight is added once to the
  neuron's ramp (its slope), so a spike costs one AC per synapse whatever its time.
* **Accumulates (AC), neuron updates.** Every neuron integrates its ramp once per step of the
  receive window (``neurons * N_in``) and, in the emission window, adds psi and compares once
  per step (``neurons * steps``). Counted over the whole window, an upper bound: a neuron that
  has fired could be gated off.
* **TTFSNeuron stages** (fully spiking graphs compiled from ``quantize --full`` twins; the
  per-neuron rule is ``NeuronSpec.ops``, shared with the compile report's coverage): a neuron
  with fixed synaptic weights (residual +-1, mean 1/I, log-sum-exp, rotary cos/sin, o_proj's
  int8 weights, a one-to-one table) adds one weight per incoming spike and synapse, the
  synapses split evenly over its spike inputs (``neuron_synaptic``). A *product synapse*
  (QK^T, PV, gate*up, x*r) has a run-time weight, the other operand's value: it costs one
  multiplication (MUL) and one accumulation per synapse whether or not its spike came (a
  silent operand still contributes its offset times the weight), plus ``muls`` per neuron.
  Its receive phase updates every neuron once per step of each input window. A fan-in left
  open at compile time (-1: a dynamic axis of the export) is read from the run's shapes
  (``neuron_fan_in``, in compiler/coverage.py with ``neuron_ops``: the compile report's
  coverage counts synapses by the same rule).
* **Multiply-accumulates (MAC).** Every float operation the graph still runs on activations
  (``FLOAT_OP_COST``: products of two activations such as attention's QK^T and PV, SiLU, the
  RMSNorm chain, softmax, rotary, residual adds), counted from the run's shapes. A MatMul of
  two activations costs ``M*N*K``; an element-wise op one per output element (an add is charged
  as a MAC: conservative for the SNN, and the QANN runs the same ops, so the comparison is fair).
* **QANN.** Dense integer MatMuls, ``rows * K * O`` MACs per weight layer (every activation,
  zero or not; a TTFSReceive's or a wired linear neuron's layer), plus the float ops of the
  QANN's own graph (its activation products, SiLU, RMSNorm, softmax, ... counted by the same
  rules from its run; for a fully spiking model these are what the neurons replaced).
* **Data movement.** A TTFS spike is stored / routed with its time, ``log2(T)`` bits; a rate
  spike is a 1-bit event. A QANN activation is moved as its ``n``-bit code. Weight reads are not
  counted: both networks read the same weights (an event-driven SNN only the rows of spiking inputs).
* **Static energy.** ``e_static`` per neuron per step over each neuron's window (default 0,
  i.e. not modelled, but the line is always shown).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ttfsc.compiler.coverage import neuron_fan_in, neuron_ops
from ttfsc.ttfs import rate_spike_count, spike_count

# Horowitz, "Computing's energy problem", ISSCC 2014 (45 nm): 32-bit float add 0.9 pJ, mult 3.7 pJ
# (a MAC = 4.6 pJ); an 8 KB SRAM read of 64 bits ~10 pJ, i.e. ~0.16 pJ per bit.
E_AC_PJ = 0.9
E_MUL_PJ = 3.7
E_MAC_PJ = 4.6
E_BIT_PJ = 0.16
E_STATIC_PJ = 0.0

# Float ops per output element (MatMul is handled apart); ops that only move data are not counted.
FLOAT_OP_COST: dict[str, float] = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 1, "Neg": 1, "Pow": 1, "Sqrt": 1, "Reciprocal": 1,
    "Sigmoid": 1, "Tanh": 1, "Exp": 1, "Log": 1, "Erf": 1, "Relu": 1, "Gelu": 1,
    "Softmax": 3,   # exp, running sum, divide
}
REDUCE_OPS = ("ReduceMean", "ReduceSum")  # one add per *input* element


@dataclass(frozen=True)
class EnergyConstants:
    """Energy per operation in picojoules (defaults: 45 nm, see module docstring)."""

    e_ac: float = E_AC_PJ
    e_mac: float = E_MAC_PJ
    e_bit: float = E_BIT_PJ
    e_static: float = E_STATIC_PJ
    e_mac_dense: float | None = None  # the QANN's weight MatMuls; None: e_mac
    e_mul: float = E_MUL_PJ           # a product synapse's multiplication (its add is an AC)

    @property
    def dense(self) -> float:
        return self.e_mac if self.e_mac_dense is None else self.e_mac_dense


# The same source's integer prices: an AC is a 32-bit integer add (0.1 pJ); the QANN's weight MAC an
# 8-bit multiply (0.2 pJ) plus a 32-bit accumulate (0.1 pJ). Float ops stay at the fp32 MAC price.
# A product synapse's multiplication: 8-bit multiply (0.2 pJ), its operands being activation codes.
INT_PRICES = EnergyConstants(e_ac=0.1, e_mac=E_MAC_PJ, e_bit=E_BIT_PJ, e_static=E_STATIC_PJ, e_mac_dense=0.3,
                             e_mul=0.2)


def spikes_of(out: np.ndarray, coding: str, T: int) -> int:
    """Spikes an emission produced: TTFS times (t < T-1 fires once) or rate counts (sum)."""
    return rate_spike_count(out) if coding == "rate" else spike_count(out, T)


def silent_of(out: np.ndarray, coding: str, T: int) -> int:
    """Neurons that never fired: t = N for TTFS, count 0 for rate."""
    out = np.asarray(out)
    return int(np.count_nonzero(out == 0)) if coding == "rate" else int(np.count_nonzero(out >= T - 1))


def bits_per_spike(coding: str, T: int) -> float:
    """A TTFS spike carries its time (log2 T bits); a rate spike is a 1-bit event."""
    return 1.0 if coding == "rate" else math.log2(T)


def receive_acs(spikes_in: int, fan_out: int) -> int:
    """One weight addition per incoming spike and synapse."""
    return int(spikes_in) * int(fan_out)


def neuron_updates(neurons: int, steps: int) -> int:
    """One potential update per neuron per step of its window."""
    return int(neurons) * int(steps)


def dense_macs(rows: int, K: int, O: int) -> int:
    """The QANN's MatMul on the same rows: every activation times every weight."""
    return int(rows) * int(K) * int(O)


def neuron_synaptic(spec, out_size: int, fan_in: int, inputs: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(ACs, MULs) a TTFSNeuron spends on its synapses given (neurons, spikes) of each spike input.

    Fixed weights: one AC per incoming spike and synapse. The ``out_size * fan_in`` synapses
    are split evenly over the spike inputs (one per output for a residual add's two inputs),
    and each input's share is fed by its neurons alike, so an input delivers ``spikes / neurons``
    of its share. Product synapses: every synapse (the weight is a run-time value, see the
    module docstring).
    """
    synapses, muls = neuron_ops(spec, out_size, fan_in)
    if spec.synapse == "operand" or not inputs:
        return synapses, muls
    share = synapses / len(inputs)
    return sum(share * spikes / neurons for neurons, spikes in inputs if neurons > 0), muls


def float_op_macs(op_type: str, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]) -> float:
    """MAC-equivalents of one float node from its run-time shapes (0 for ops that only move data)."""
    if op_type == "MatMul":
        a = in_shapes[0]
        return float(np.prod(out_shape, dtype=np.float64)) * (a[-1] if a else 1)
    if op_type in REDUCE_OPS:
        return float(np.prod(in_shapes[0], dtype=np.float64))
    return float(np.prod(out_shape, dtype=np.float64)) * FLOAT_OP_COST.get(op_type, 0)


@dataclass
class Counts:
    """Everything one network spends on a run (totals, not per token)."""

    spikes: float = 0.0
    neurons: float = 0.0
    silent: float = 0.0
    ac_synaptic: float = 0.0
    ac_neuron: float = 0.0
    mul_synaptic: float = 0.0
    mac_dense: float = 0.0
    mac_float: float = 0.0
    move_bits: float = 0.0
    neuron_steps: float = 0.0
    mac_float_by_kind: dict = field(default_factory=dict)

    def scaled(self, k: float) -> "Counts":
        d = {key: (v * k if isinstance(v, float | int) else {a: b * k for a, b in v.items()})
             for key, v in asdict(self).items()}
        return Counts(**d)


def snn_energy(c: Counts, e: EnergyConstants) -> dict[str, float]:
    """Energy lines of the spiking model, pJ."""
    return {
        "AC synaptic (spikes x fan-out)": c.ac_synaptic * e.e_ac,
        "AC neuron updates (per step)": c.ac_neuron * e.e_ac,
        "MUL product synapses (run-time weights)": c.mul_synaptic * e.e_mul,
        "MAC float ops left in the graph": c.mac_float * e.e_mac,
        "spike-time storage/routing": c.move_bits * e.e_bit,
        "static (per neuron per step)": c.neuron_steps * e.e_static,
    }


def qann_energy(c: Counts, e: EnergyConstants) -> dict[str, float]:
    """Energy lines of the QANN, pJ (static: not modelled, shown as 0 for symmetry)."""
    return {
        "MAC dense integer MatMuls": c.mac_dense * e.dense,
        "MAC float ops left in the graph": c.mac_float * e.e_mac,
        "activation storage/routing (n bits each)": c.move_bits * e.e_bit,
        "static": 0.0,
    }
