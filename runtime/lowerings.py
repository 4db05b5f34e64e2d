"""The registry of lowerings: every ``ai.ttfsc`` operator and the function that replaces its node.

Kept apart from the lowerings themselves so that both families are visible here without a
cycle: ``runtime.kernels`` (emission, reception, decoding of every coding) and
``runtime.neuron`` (TTFSNeuron, built on the kernels' emission and decoding).
"""
from __future__ import annotations

from typing import Callable

import onnx

from ttfsc.dialect import CONT_DECODE, CONT_EMIT, DECODE, EMIT, NEURON, RATE_DECODE, RATE_EMIT, RATE_RECEIVE, RECEIVE
from ttfsc.runtime.kernels import (Lowering, lower_continuous_decode, lower_continuous_emit, lower_decode, lower_emit,
                                   lower_rate_decode, lower_rate_emit, lower_rate_receive, lower_receive)
from ttfsc.runtime.neuron import lower_neuron

LOWERINGS: dict[str, Callable[[onnx.NodeProto], Lowering]] = {
    EMIT: lower_emit, RECEIVE: lower_receive, DECODE: lower_decode,
    RATE_EMIT: lower_rate_emit, RATE_RECEIVE: lower_rate_receive, RATE_DECODE: lower_rate_decode,
    CONT_EMIT: lower_continuous_emit, CONT_DECODE: lower_continuous_decode,
    NEURON: lower_neuron,
}
