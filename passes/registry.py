"""The compile pipelines: for each flavour, the ordered passes, declared once.

Every caller (``ttfsc compile``, the continuous baseline, tests, benchmarks) runs a pipeline
from :data:`PIPELINES` through :func:`run_pipeline`, so the order of the passes is written here
and nowhere else. A pass's constructor arguments come from one :class:`PassOptions`.

Why the orders are what they are:

* an emission pass always comes first: it turns each activation quantizer (or, for the
  continuous baseline, each calibrated linear input) into an emission and its decodes;
* decode -> receive folding needs those decodes, so it follows the emission pass;
* dead code goes last: only once every rewrite is done are the weight dequantizers and the
  float ops the neurons replaced left without consumers;
* the neuron passes of a fully spiking twin run between the folding and the final dead code:
  they find their groups from the emissions, and they clear the groups' float ops (dead code)
  before ShapeOfSpikes re-reads shapes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import onnx

from ttfsc.graph import GraphIndex
from ttfsc.passes.base import Pass
from ttfsc.passes.dead_code import DeadCode
from ttfsc.passes.decode_matmul_to_receive import DecodeMatMulToReceivePass
from ttfsc.passes.elementwise_neurons import ElementwiseNeurons
from ttfsc.passes.kv_relay import KvRelay
from ttfsc.passes.linear_neurons import LinearNeurons
from ttfsc.passes.neuron_groups import extract_group, spike_dependent
from ttfsc.passes.product_neurons import ProductNeurons
from ttfsc.passes.qdq_to_continuous import ActivationsToContinuous
from ttfsc.passes.qdq_to_emit import QdqToEmit
from ttfsc.passes.qdq_to_rate import QdqToRate
from ttfsc.passes.rmsnorm_neurons import RMSNormNeurons
from ttfsc.passes.shape_of_spikes import ShapeOfSpikes
from ttfsc.passes.softmax_neurons import SoftmaxNeurons
from ttfsc.ttfs import DOMAIN, DOMAIN_VERSION


@dataclass(frozen=True)
class PassOptions:
    """What the passes of a pipeline are built with (each pass takes the fields it needs).

    ``T``: the window of every stage, None to keep each quantizer's own width (``-T auto``);
    ``requantize``: re-grid a QDQ model whose width differs from log2(T);
    ``ranges``: the continuous baseline's float range of each linear input.
    """

    T: int | None = None
    requantize: bool = False
    ranges: Mapping[str, tuple[float, float]] | None = None


PassFactory = Callable[[PassOptions], Pass]


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of passes, and why they run in that order.

    ``grows_into``/``grows_when``: a pipeline that shares this one's first passes and that this
    one becomes when the model, as those shared passes left it, satisfies ``grows_when``.
    """

    name: str
    why: str
    steps: tuple[PassFactory, ...]
    grows_into: str | None = None
    grows_when: Callable[[onnx.ModelProto], bool] | None = None


def has_stage_groups(model: onnx.ModelProto) -> bool:
    """Whether any emission is fed by float ops on decoded spikes only (a --full twin's stage group)."""
    g = GraphIndex(model)
    dep = spike_dependent(g)
    return any(extract_group(g, e, dep) is not None for e in g.nodes if e.domain == DOMAIN and e.op_type == "TTFSEmit")


def _ttfs_emit(o: PassOptions) -> Pass:
    return QdqToEmit(o.T, o.requantize)


def _rate_emit(o: PassOptions) -> Pass:
    return QdqToRate(o.T, o.requantize)


def _continuous_emit(o: PassOptions) -> Pass:
    return ActivationsToContinuous(o.T, o.ranges or {})


def _plain(cls: type[Pass]) -> PassFactory:
    """A factory for a pass that takes no options."""
    return lambda _o: cls()


RECEIVE = _plain(DecodeMatMulToReceivePass)
DEAD_CODE = _plain(DeadCode)

#: the neuron passes of a fully spiking (``quantize --full``) twin, in the order each finds its
#: groups in what the previous one left; dead code before ShapeOfSpikes re-reads shapes
NEURON_STEPS: tuple[PassFactory, ...] = tuple(_plain(cls) for cls in (
    ElementwiseNeurons, RMSNormNeurons, SoftmaxNeurons, ProductNeurons, KvRelay, LinearNeurons,
    DeadCode, ShapeOfSpikes))

PIPELINES: dict[str, Pipeline] = {p.name: p for p in (
    Pipeline("ttfs_full", "a --full twin: the hybrid's emissions and receptions, then the neuron passes on "
             "the groups those emissions reveal, then the hybrid's dead code",
             (_ttfs_emit, RECEIVE, *NEURON_STEPS, DEAD_CODE)),
    Pipeline("ttfs", "TTFS hybrid: emissions first, receptions fold their decodes, dead weights go last; "
             "a model whose emissions reveal stage groups continues as ttfs_full",
             (_ttfs_emit, RECEIVE, DEAD_CODE), grows_into="ttfs_full", grows_when=has_stage_groups),
    Pipeline("rate", "the rate-coded baseline: the TTFS hybrid's order with rate emissions "
             "(no neuron passes: they build TTFS neurons only)",
             (_rate_emit, RECEIVE, DEAD_CODE)),
    Pipeline("continuous", "the continuous-kernel baseline of a float model: a stage per calibrated linear "
             "input, then the same folding and dead code",
             (_continuous_emit, RECEIVE, DEAD_CODE)),
)}


def _fork(a: tuple[PassFactory, ...], b: tuple[PassFactory, ...]) -> int:
    """How many first passes two pipelines share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] is b[n]:
        n += 1
    return n


def _run(model: onnx.ModelProto, steps: tuple[PassFactory, ...], options: PassOptions) -> list[dict]:
    return [step(options).run(model).as_dict() for step in steps]


def run_pipeline(model: onnx.ModelProto, name: str, options: PassOptions) -> list[dict]:
    """Run pipeline ``name`` on ``model`` in place; return one report per pass.

    A pipeline that may grow runs the passes it shares with the larger one, then the rest of
    whichever of the two the model now calls for. Declares the ``ai.ttfsc`` opset the rewritten
    graph uses.
    """
    pipe = PIPELINES[name]
    steps, shared = pipe.steps, len(pipe.steps)
    if pipe.grows_into is not None:
        shared = _fork(steps, PIPELINES[pipe.grows_into].steps)
    reports = _run(model, steps[:shared], options)
    if pipe.grows_into is not None and pipe.grows_when is not None and pipe.grows_when(model):
        steps = PIPELINES[pipe.grows_into].steps
    reports += _run(model, steps[shared:], options)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return reports
