"""Pass: activation [Clip ->] QuantizeLinear -> DequantizeLinear  ==>  RateEmit -> RateDecode.

The rate-coded (SpikeLLM-style) baseline of qdq_to_emit: the same n-bit quantizer becomes an
integrate-and-fire stage of N = 2^n - 1 steps whose spike count is the QANN code (ttfsc.ttfs,
"Rate coding"). Matching, checks (static per-tensor scale, DequantizeLinear consumers, code
range, -T vs the QANN's width, --requantize) and the rewrite are QdqToEmit's: only the emitted
spec differs, so both codings reproduce exactly the same QANN codes and can be compared on
spikes and latency at equal accuracy. decode_matmul_to_receive then folds the RateDecodes into
RateReceives, as it does for TTFS.
"""
from __future__ import annotations

from ttfsc.passes.qdq_to_emit import QdqToEmit, QuantDequantToEmit
from ttfsc.dialect import RateEmitSpec
from ttfsc.ttfs import RateStage


class QuantDequantToRate(QuantDequantToEmit):
    """Rewrite one activation quantizer into a rate-coded IF stage and its decoders."""

    name = "QuantDequantToRate"
    out_suffix = "spike_count"

    def spec(self, scale: float, z: int, T: int, qann_tensor: str, qann_code_min: int) -> RateEmitSpec:
        return RateEmitSpec.from_stage(RateStage(scale, z, T - 1), qann_tensor=qann_tensor,
                                       qann_code_min=qann_code_min)


class QdqToRate(QdqToEmit):
    """All activation quantizers of the graph become rate-coded emissions of N = T - 1 steps."""

    name = "qdq_to_rate"
    rule_types = (QuantDequantToRate,)
