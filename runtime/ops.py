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
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ttfsc.ttfs import DOMAIN, UniformStage

EMIT, RECEIVE, DECODE = "TTFSEmit", "TTFSReceive", "TTFSDecode"
TTFS_OPS = (EMIT, RECEIVE, DECODE)


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


@dataclass(frozen=True)
class EmitSpec:
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
                   _s(a.get("tie_rule", "half_even")), _s(a.get("qann_tensor", "")), int(a.get("qann_code_min", 0)))

    @property
    def N(self) -> int:
        return self.T - 1

    def make_node(self, v: str, t: str, name: str) -> onnx.NodeProto:
        return helper.make_node(
            EMIT, [v], [t], name=name, domain=DOMAIN, window=self.T, t_ref=self.t_ref, step=self.step,
            tau=float(1.0 / np.float64(self.step)), psi=list(self.psi), theta=self.theta,
            tie_rule=self.tie_rule, qann_tensor=self.qann_tensor, qann_code_min=self.qann_code_min)


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
        stage = UniformStage(e.step, e.N - e.t_ref, e.T)
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


def make_decode_node(e: EmitSpec, t: str, x: str, name: str) -> onnx.NodeProto:
    return helper.make_node(DECODE, [t], [x], name=name, domain=DOMAIN, window=e.T, t_ref=e.t_ref, step=e.step)


def decode_spec(node: onnx.NodeProto) -> tuple[int, int, float]:
    a = attrs(node)
    return int(a["window"]), int(a["t_ref"]), float(a["step"])
