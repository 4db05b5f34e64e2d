"""Schemas of the TTFS operators (domain ``ai.ttfsc``, version 1).

``TTFSEmit(V) -> t``
    Emission phase of a stage: membrane potential (float) to spike times (uint8/uint16).
    Attributes: ``window`` (T), ``t_ref`` (int), ``step`` (value of one time step, 1/tau),
    ``tau``, ``psi`` (T-1 floats), ``theta``, ``tie_rule``, ``qann_tensor`` (the QANN tensor
    whose codes this stage reproduces, for the verifier), ``qann_code_min`` (0, or -128 for an
    int8 QANN).
``TTFSReceive(t, W, w_scale[, w_zero_point]) -> V``
    Receive phase: incoming spike times integrated through the ``eta`` table and the integer
    weights ``W`` (int8, dequantized per output channel by ``w_scale``) into potentials.
    Attributes: ``window_in``, ``t_ref_in``, ``step_in``, ``eta`` (T_in-1 floats),
    ``c_offset`` (f(a_in), sets the bias C), ``gain``.
``TTFSDecode(t) -> x``
    Spike times to values, x = (t_ref - t) * step, for standard ops not yet spiking.
    Attributes: ``window``, ``t_ref``, ``step``.

Spike-time tensors: integers in [0, T); t = T-1 is the silent neuron (see ttfsc.ttfs).

Rate-coded baseline (same domain and version; ``ttfsc compile --coding rate``):

``RateEmit(V) -> counts``
    Integrate-and-fire stage with reset by subtraction over ``steps`` (N = 2^n - 1) steps: the
    spike count (uint8, uint16 for N > 255) equals the QANN code (see ttfsc.ttfs, "Rate coding").
    Attributes: ``steps`` (N), ``threshold`` (= the QANN scale), ``zero_point`` (z; the bias
    current is threshold*z/N per step, the initial potential threshold/2), ``tie_rule``,
    ``qann_tensor``, ``qann_code_min`` (as for TTFSEmit).
``RateReceive(counts, W, w_scale[, w_zero_point]) -> V``
    Spike trains integrated through the integer weights: ``V = sum_j w_ij * threshold_in *
    (c_j - zero_point_in)``. Attributes ``steps_in``, ``threshold_in``, ``zero_point_in``.
``RateDecode(counts) -> x``
    Counts to values, ``x = (c - zero_point) * threshold``. Attributes ``steps``, ``threshold``,
    ``zero_point``.

Continuous-kernel baseline (TTFSFormer style; ``ttfsc compile --neuron continuous``):

``ContinuousEmit(V) -> t``
    Emission of a stage whose kernels come from the continuous theory (ttfsc.ttfs.ContinuousStage):
    range ``[a, b]`` from the float model's min/max, ``tau = T/(b - a)``, constant ``psi``,
    ``theta = b``; spike times as for TTFSEmit (uint8/uint16, ``t = T-1`` silent). The decoded
    value ``a + (T-1-t) * (b-a)/T`` floors V onto T levels: it is no QANN's code.
    Attributes: ``window`` (T), ``a``, ``b``, ``tau``, ``psi``, ``theta``, ``source_tensor``
    (the float tensor the stage replaces).
``ContinuousDecode(t) -> x``
    Spike times to values, ``x = a + (T-1-t) * (b-a)/T``. Attributes ``window``, ``a``, ``b``.
    Receivers are ordinary ``TTFSReceive`` nodes on the table kernel (``c_offset = a``).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ttfsc.ttfs import DOMAIN, ContinuousStage, RateStage, UniformStage, Window, tau_of_step, time_dtype

EMIT, RECEIVE, DECODE = "TTFSEmit", "TTFSReceive", "TTFSDecode"
TTFS_OPS = (EMIT, RECEIVE, DECODE)
RATE_EMIT, RATE_RECEIVE, RATE_DECODE = "RateEmit", "RateReceive", "RateDecode"
RATE_OPS = (RATE_EMIT, RATE_RECEIVE, RATE_DECODE)
NEURON = "TTFSNeuron"  # a receive+emit stage of nonlinear/product neurons (ttfsc.neuron)
CONT_EMIT, CONT_DECODE = "ContinuousEmit", "ContinuousDecode"


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def attr_text(v) -> str:
    """A STRING attribute as text: onnx hands those back as bytes."""
    return v.decode() if isinstance(v, bytes) else v


#: codes an ONNX QuantizeLinear can produce, by the element type of its zero point
CODE_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127),
               TensorProto.UINT16: (0, 65535), TensorProto.INT16: (-32768, 32767)}


def code_range(elem_type: int) -> tuple[int, int]:
    """(lowest, highest) code of a quantizer whose zero point has this ONNX type (uint8 if unknown)."""
    return CODE_RANGES.get(elem_type, (0, 255))


def time_elem_type(T: int) -> int:
    """ONNX element type of spike-time tensors of a T-slot window (``ttfs.time_dtype``)."""
    return TensorProto.UINT8 if time_dtype(T) == np.uint8 else TensorProto.UINT16


def _twin_fields(a: dict) -> tuple[str, str, int]:
    """``tie_rule``, ``qann_tensor``, ``qann_code_min`` of an emission node's attributes (defaults if absent).

    Every coding that reproduces a QANN quantizer (TTFS, rate) carries these three the same way:
    how the quantizer breaks ties, and which QANN tensor it stands for, for the verifier.
    """
    return (attr_text(a.get("tie_rule", "half_even")), attr_text(a.get("qann_tensor", "")),
            int(a.get("qann_code_min", 0)))


def _twin_attrs(spec: EmitSpec | RateEmitSpec) -> dict[str, str | int]:
    """The node attributes ``_twin_fields`` reads back."""
    return dict(tie_rule=spec.tie_rule, qann_tensor=spec.qann_tensor, qann_code_min=spec.qann_code_min)


@dataclass(frozen=True)
class EmitSpec(Window):
    """Everything an emission node carries; built from a quantizer or read back from a node."""

    T: int
    t_ref: int
    step: float
    psi: tuple[float, ...]
    theta: float
    tie_rule: str = "half_even"
    qann_tensor: str = ""
    qann_code_min: int = 0

    @classmethod
    def from_stage(cls, stage: UniformStage, qann_tensor: str = "", qann_code_min: int = 0) -> "EmitSpec":
        return cls(stage.T, stage.t_ref, float(stage.step), tuple(float(v) for v in stage.psi()),
                   float(stage.theta), stage.tie_rule, qann_tensor, qann_code_min)

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> "EmitSpec":
        a = attrs(node)
        return cls(int(a["window"]), int(a["t_ref"]), float(a["step"]), tuple(a["psi"]), float(a["theta"]),
                   *_twin_fields(a))

    def stage(self) -> UniformStage:
        """The Corollary-1 stage on this emission's grid (its zero point, range and kernels)."""
        return UniformStage.from_timing(self.step, self.t_ref, self.T, self.tie_rule)

    def make_node(self, v: str, t: str, name: str) -> onnx.NodeProto:
        return helper.make_node(
            EMIT, [v], [t], name=name, domain=DOMAIN, window=self.T, t_ref=self.t_ref, step=self.step,
            tau=tau_of_step(self.step), psi=list(self.psi), theta=self.theta, **_twin_attrs(self))

    def make_decode(self, t: str, x: str, name: str) -> onnx.NodeProto:
        return helper.make_node(DECODE, [t], [x], name=name, domain=DOMAIN, window=self.T, t_ref=self.t_ref,
                                step=self.step)

    def receive_spec(self) -> "ReceiveSpec":
        return ReceiveSpec.from_emit(self)


@dataclass(frozen=True)
class ReceiveSpec:
    T_in: int
    t_ref_in: int
    step_in: float
    eta: tuple[float, ...]
    c_offset: float
    gain: float = 1.0

    @classmethod
    def from_emit(cls, e: EmitSpec) -> "ReceiveSpec":
        """Step input kernel after a uniform stage (Theorem 2 with f = identity)."""
        stage = e.stage()
        return cls(e.T, e.t_ref, e.step, tuple(float(v) for v in stage.eta()), float(stage.a), 1.0)

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> "ReceiveSpec":
        a = attrs(node)
        return cls(int(a["window_in"]), int(a["t_ref_in"]), float(a["step_in"]), tuple(a["eta"]),
                   float(a["c_offset"]), float(a.get("gain", 1.0)))

    def make_node(self, inputs: list[str], v: str, name: str) -> onnx.NodeProto:
        return helper.make_node(
            RECEIVE, inputs, [v], name=name, domain=DOMAIN, window_in=self.T_in, t_ref_in=self.t_ref_in,
            step_in=self.step_in, eta=list(self.eta), c_offset=self.c_offset, gain=self.gain)


def decode_spec(node: onnx.NodeProto) -> tuple[int, int, float]:
    a = attrs(node)
    return int(a["window"]), int(a["t_ref"]), float(a["step"])


@dataclass(frozen=True)
class RateEmitSpec:
    """Everything a RateEmit node carries; same interface as EmitSpec for the passes."""

    N: int
    threshold: float
    zero_point: int
    tie_rule: str = "half_even"
    qann_tensor: str = ""
    qann_code_min: int = 0

    @classmethod
    def from_stage(cls, stage: RateStage, qann_tensor: str = "", qann_code_min: int = 0) -> "RateEmitSpec":
        return cls(stage.N, float(stage.threshold), stage.zero_point, stage.tie_rule, qann_tensor, qann_code_min)

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> "RateEmitSpec":
        a = attrs(node)
        return cls(int(a["steps"]), float(a["threshold"]), int(a["zero_point"]), *_twin_fields(a))

    @property
    def T(self) -> int:
        """Code levels (N + 1), the TTFS window that would carry the same codes."""
        return self.N + 1

    def stage(self) -> RateStage:
        return RateStage(self.threshold, self.zero_point, self.N, self.tie_rule)

    def make_node(self, v: str, c: str, name: str) -> onnx.NodeProto:
        return helper.make_node(
            RATE_EMIT, [v], [c], name=name, domain=DOMAIN, steps=self.N, threshold=self.threshold,
            zero_point=self.zero_point, **_twin_attrs(self))

    def make_decode(self, c: str, x: str, name: str) -> onnx.NodeProto:
        return helper.make_node(RATE_DECODE, [c], [x], name=name, domain=DOMAIN, steps=self.N,
                                threshold=self.threshold, zero_point=self.zero_point)

    def receive_spec(self) -> "RateReceiveSpec":
        return RateReceiveSpec(self.N, self.threshold, self.zero_point)


@dataclass(frozen=True)
class RateReceiveSpec:
    N_in: int
    threshold_in: float
    zero_point_in: int

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> "RateReceiveSpec":
        a = attrs(node)
        return cls(int(a["steps_in"]), float(a["threshold_in"]), int(a["zero_point_in"]))

    def make_node(self, inputs: list[str], v: str, name: str) -> onnx.NodeProto:
        return helper.make_node(RATE_RECEIVE, inputs, [v], name=name, domain=DOMAIN, steps_in=self.N_in,
                                threshold_in=self.threshold_in, zero_point_in=self.zero_point_in)


def rate_decode_spec(node: onnx.NodeProto) -> tuple[int, float, int]:
    a = attrs(node)
    return int(a["steps"]), float(a["threshold"]), int(a["zero_point"])


@dataclass(frozen=True)
class ContinuousEmitSpec(Window):
    """Everything a ContinuousEmit node carries; same interface as EmitSpec for the passes.

    Only ``a``, ``b`` and ``T`` are free: kernels and threshold follow from them (ContinuousStage),
    and are written to the node so the graph states the neuron it runs.
    """

    T: int
    a: float
    b: float
    source_tensor: str = ""

    @classmethod
    def from_stage(cls, stage: ContinuousStage, source_tensor: str = "") -> "ContinuousEmitSpec":
        return cls(stage.T, stage.a, stage.b, source_tensor)

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> "ContinuousEmitSpec":
        a = attrs(node)
        return cls(int(a["window"]), float(a["a"]), float(a["b"]), attr_text(a.get("source_tensor", "")))

    @property
    def qann_tensor(self) -> str:
        """No QANN behind this stage: reported as empty, so `ttfsc verify` says it has no twin."""
        return ""

    def stage(self) -> ContinuousStage:
        return ContinuousStage(self.a, self.b, self.T)

    def make_node(self, v: str, t: str, name: str) -> onnx.NodeProto:
        st = self.stage()
        return helper.make_node(
            CONT_EMIT, [v], [t], name=name, domain=DOMAIN, window=self.T, a=self.a, b=self.b, tau=st.tau,
            psi=[float(x) for x in st.psi()], theta=float(st.theta), source_tensor=self.source_tensor)

    def make_decode(self, t: str, x: str, name: str) -> onnx.NodeProto:
        return helper.make_node(CONT_DECODE, [t], [x], name=name, domain=DOMAIN, window=self.T, a=self.a, b=self.b)

    def receive_spec(self) -> ReceiveSpec:
        """A TTFSReceive integrating eta = step from c_offset = f(a) = a (the table kernel).

        ``t_ref_in`` is the nearest integer reference in 0..N; the receive lowering takes its
        integer fast path only when that reference reproduces ``a`` exactly, else the table.
        """
        st = self.stage()
        return ReceiveSpec(self.T, st.nearest_t_ref(), float(st.step), tuple(float(v) for v in st.eta()),
                           float(self.a), 1.0)


def continuous_decode_spec(node: onnx.NodeProto) -> ContinuousStage:
    a = attrs(node)
    return ContinuousStage(float(a["a"]), float(a["b"]), int(a["window"]))


EMIT_SPECS = {EMIT: EmitSpec, RATE_EMIT: RateEmitSpec, CONT_EMIT: ContinuousEmitSpec}
EMIT_OF_DECODE = {DECODE: EMIT, RATE_DECODE: RATE_EMIT, CONT_DECODE: CONT_EMIT}
CODING_OF_EMIT = {EMIT: "ttfs", RATE_EMIT: "rate", CONT_EMIT: "continuous"}
EMIT_SPECS[NEURON] = EmitSpec  # a neuron stage emits like TTFSEmit (same emission attributes)
CODING_OF_EMIT[NEURON] = "ttfs"


def emit_spec(node: onnx.NodeProto) -> EmitSpec | RateEmitSpec | ContinuousEmitSpec | None:
    """The spec of an emission node of either coding, or None for any other node."""
    cls = EMIT_SPECS.get(node.op_type) if node.domain == DOMAIN else None
    return cls.from_node(node) if cls else None


def emissions(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, EmitSpec | RateEmitSpec | ContinuousEmitSpec]]:
    """Every emission node of ``model``, any coding, with its spec, in graph order.

    The walk that stage listings, reports and the verifier's probes all start from.
    """
    for node in model.graph.node:
        spec = emit_spec(node)
        if spec is not None:
            yield node, spec


def stage_steps(node: onnx.NodeProto) -> int:
    """Time steps an emission costs: a TTFS window T, or a rate window of N steps; 0 otherwise."""
    spec = emit_spec(node)
    if spec is None:
        return 0
    return spec.N if isinstance(spec, RateEmitSpec) else spec.T
