"""Property-based tests of the compiler: random QDQ graphs compile to spiking models that equal them.

Hypothesis draws a plain-data graph spec (tests/graphs.py: ``QdqGraphSpec`` of ``ActSpec`` /
``LinearSpec`` stages), ``random_qdq_model`` builds it with an input, ttfsc compiles it in
memory (``run_passes``, the pipeline ``ttfsc compile`` runs) at ``-T 2^bits`` (one width per
example) or ``-T auto`` (mixed widths), and ``compare_stages`` runs both models under onnxruntime
with ``exact_options`` on both sides. At ORT_DISABLE_ALL every stage's codes (spike times turned
back into codes, exact ties included: no tie is excused), every float tensor between stages and
every output must be equal, bit for bit; at ORT_ENABLE_ALL (ttfsc's default) every output, for
codes typed as ttfsc's quantizer types them (two known exceptions: the xfails below).

What varies: activation widths 2..12 bits, carried as ttfsc's quantizer writes them (uint8 + a
narrowing Clip below 8 bits, uint16 com.microsoft Q/DQ above) and in the other forms the pass
accepts (int8/int16 codes, a code window offset inside its type, a 16-bit type carrying <= 8 bits,
Clip bounds off the code grid by up to 3/8 of a step); scales over ~6 decades (2^-16 .. 2^8; a power of
two is the simplest, to which failures shrink); zero points anywhere in the window; input shapes (2-D and 3-D);
int8 and int4 (codes -7..7 in int8) per-channel weights; chains of up to 3 stages; branches (one
quantized activation read by two MatMuls, added, multiplied, one of them an extra output; a
residual Add reading the activation itself); float ops before a quantizer (Add/Mul of a constant,
Sigmoid(x)*x) that stay standard ops. The input mixes values inside and outside the clip range,
exact ties (k + 1/2) * scale and their float32 neighbours (about 1,000 exact ties per run, all at
the first stage: later stages' potentials are compared bit for bit instead).

Reproducible: ``derandomize=True`` and no example database, so CI runs the same examples every
time; a failure prints the minimal spec hypothesis shrank it to (pass it to ``random_qdq_model``).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import copy  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from graphs import (LINEAR_KINDS, PRE_OPS, ActSpec, LinearSpec, QdqGraphSpec, assert_compiled_equals_qdq,  # noqa: E402
                    compare_stages, random_qdq_model)
from ttfsc.compiler.pipeline import (check_rewritten, compile_model, latency_per_token,  # noqa: E402
                                     leftover_activation_qdq, run_passes, stages)
from ttfsc.errors import TtfscError  # noqa: E402
from ttfsc.ttfs import MAX_BITS, MIN_BITS  # noqa: E402

DISABLE, ENABLE = ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL

#: reproducible in CI: the same examples every run, nothing read from or written to .hypothesis/
PROPERTY = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BITS = st.integers(MIN_BITS, MAX_BITS)


# ------------------------------------------------------------------ strategies

@st.composite
def act_specs(draw, levels: int, narrow_in_wide: bool = True) -> ActSpec:
    """One activation quantizer of ``levels`` codes, in any form the emission pass accepts."""
    N = levels - 1
    wide = levels > 256 or (narrow_in_wide and draw(st.booleans()))
    span = 65535 if wide else 255
    return ActSpec(
        levels=levels,
        zero=draw(st.integers(0, N)),
        exp=draw(st.integers(-2, 2)),
        mant=draw(st.one_of(st.just(0), st.integers(1, 2 ** 23 - 1))),
        signed=draw(st.booleans()),
        wide=wide,
        offset=draw(st.one_of(st.just(0), st.integers(0, min(span - N, 40)))) if span > N else 0,
        clip=draw(st.booleans()),
        lo_eighths=draw(st.integers(-3, 3)),
        hi_eighths=draw(st.integers(-3, 3)),
        pre=draw(st.sampled_from(PRE_OPS)),
    )


LINEAR = st.builds(LinearSpec, out=st.integers(1, 8), wbits=st.sampled_from([8, 4]), wbits2=st.sampled_from([8, 4]),
                   kind=st.sampled_from(LINEAR_KINDS), dyadic=st.sampled_from([True, False]))
SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple)


@st.composite
def graph_specs(draw, max_stages: int = 3, narrow_in_wide: bool = True) -> QdqGraphSpec:
    """A chain of 1..max_stages (quantizer, linear) stages: one width for all, or mixed widths."""
    n = draw(st.integers(1, max_stages))
    mixed = draw(st.booleans())
    bits = [draw(BITS)] * n if not mixed else [draw(BITS) for _ in range(n)]
    stage_list = tuple((draw(act_specs(1 << b, narrow_in_wide)), draw(LINEAR)) for b in bits)
    return QdqGraphSpec(rows=draw(SHAPES), channels=draw(st.integers(1, 8)), stages=stage_list,
                        scale_exp=draw(st.integers(-14, 6)), seed=draw(st.integers(0, 2 ** 16)))


def window_of(spec: QdqGraphSpec) -> int | None:
    """-T for a spec: 2^bits when every stage has that width, else auto (None)."""
    widths = spec.widths()
    return next(iter(widths)) if len(widths) == 1 else None


def codes_typed_as_times(spec: QdqGraphSpec) -> bool:
    """Every quantizer's codes have the type of the spike times replacing them: unsigned, 16-bit only
    above 256 levels (ttfsc's own form). onnxruntime picks its fusions by type, so only then does
    ORT_ENABLE_ALL fuse both models alike (test_enable_all_*_codes)."""
    return all(not a.signed and a.wide == (a.levels > 256) for a, _ in spec.stages)


def compile_in_memory(model: onnx.ModelProto, T: int | None) -> tuple[onnx.ModelProto, list[dict]]:
    c = copy.deepcopy(model)
    return c, run_passes(c, T)


# ------------------------------------------------------------------ the property

def assert_compiles_exactly(spec: QdqGraphSpec) -> None:
    model, x, info = random_qdq_model(spec)
    T = window_of(spec)
    c, reports = compile_in_memory(model, T)
    emit = reports[0]
    assert emit["rewritten"] == {"QuantDequantToEmit": len(spec.stages)} and emit["skipped"] == [], emit
    assert leftover_activation_qdq(c) == []
    assert not [n for n in c.graph.node if n.op_type == "MatMul"], "a MatMul on decoded spikes was not folded"
    onnx.checker.check_model(c)
    windows = [s["window"] for s in stages(c)]
    assert sorted(windows) == sorted(a.levels for a, _ in spec.stages)
    assert latency_per_token(c) == sum(windows)                    # one chain: the windows add up
    assert_equal_runs(spec, model, c, x, info)


def assert_equal_runs(spec: QdqGraphSpec, model: onnx.ModelProto, c: onnx.ModelProto, x, info: dict) -> None:
    """Stage by stage at ORT_DISABLE_ALL (exact QDQ math), outputs at ttfsc's default ORT_ENABLE_ALL.

    ORT_ENABLE_ALL only where the codes are typed as the spike times (codes_typed_as_times): signed
    codes and <= 8-bit codes in 16-bit types are known to differ there (the xfails below).
    """
    bad = compare_stages(model, c, x, DISABLE, info["values"])
    assert not bad, ("ORT_DISABLE_ALL", bad)
    if codes_typed_as_times(spec):
        bad = compare_stages(model, c, x, ENABLE, probes=False)
        assert not bad, ("ORT_ENABLE_ALL", bad)


@settings(max_examples=600, **PROPERTY)
@given(graph_specs())
def test_random_qdq_graph_compiles_exactly(spec):
    """Chains of 1..3 stages, one width (-T 2^bits) or mixed (-T auto): every stage rewritten, every
    MatMul folded, and the spiking model equal to the QDQ model (assert_equal_runs)."""
    assert_compiles_exactly(spec)


@pytest.mark.parametrize("bits", range(MIN_BITS, MAX_BITS + 1))
@settings(max_examples=15, **PROPERTY)
@given(data=st.data())
def test_random_qdq_graph_every_width(bits, data):
    """Every width 2..12 bits gets its own examples: one-stage graphs at -T 2^bits."""
    spec = QdqGraphSpec(rows=data.draw(SHAPES, "rows"), channels=data.draw(st.integers(1, 8), "channels"),
                        stages=((data.draw(act_specs(1 << bits), "act"), data.draw(LINEAR, "linear")),),
                        scale_exp=data.draw(st.integers(-14, 6), "scale_exp"),
                        seed=data.draw(st.integers(0, 2 ** 16), "seed"))
    assert_compiles_exactly(spec)


@settings(max_examples=30, **PROPERTY)
@given(graph_specs(max_stages=2))
def test_random_qdq_graph_through_compile_model(spec):
    """The same property through ``compile_model`` (files, checks, metadata), -T as the CLI gets it."""
    model, x, info = random_qdq_model(spec)
    T = window_of(spec)
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "q.onnx", Path(d) / "snn.onnx"
        onnx.save(model, str(src))
        report = compile_model(str(src), str(out), T if T is not None else "auto", log=lambda *a, **k: None)
        assert len(report["stages"]) == len(spec.stages)
        compiled = onnx.load(str(out))
    assert_equal_runs(spec, model, compiled, x, info)


# ------------------------------------------------------------------ known gap of exact_options (xfail)
#
# Not miscompilations: at ORT_DISABLE_ALL both models below equal the QDQ math bit for bit (checked
# first). At ORT_ENABLE_ALL onnxruntime chooses its fusions by tensor type, and these QDQ models'
# codes are not typed as the spike times replacing them (uint8 up to 256 levels, uint16 above), so
# the two models fuse differently and their float outputs differ by ulps (uint16: by ~1e-2).
# ``exact_options`` turns Q/DQ fusions off only above 128 levels, so it does not cover them.
# Neither form is what ttfsc's quantizer writes (uint8 + Clip up to 8 bits, uint16 above); both are
# accepted by qdq_to_emit. Minimal examples as hypothesis shrank them.

GAP = ("exact_options leaves Q/DQ fusions on for <= 128 levels, but onnxruntime fuses a QANN whose codes are "
       "{} differently from the uint8 spike times replacing them, so ORT_ENABLE_ALL outputs differ")


@pytest.mark.xfail(strict=True, reason=GAP.format("int8 (a shared activation: two MatMuls)"))
def test_enable_all_signed_codes():
    """int8 codes of 8 levels read by two MatMuls: the QANN keeps DQ -> MatMul (float, Gemm), the
    spiking model's uint8 times fuse into MatMulIntegerToFloat; outputs 1-2 ulp apart."""
    spec = QdqGraphSpec(rows=(2,), channels=1, seed=0, stages=(
        (ActSpec(levels=8, zero=0), LinearSpec(out=2)),
        (ActSpec(levels=8, zero=0, mant=1, signed=True), LinearSpec(out=1, kind="add"))))
    model, x, info = random_qdq_model(spec)
    c, _ = compile_in_memory(model, 8)
    assert not compare_stages(model, c, x, DISABLE, info["values"])
    assert not compare_stages(model, c, x, ENABLE, probes=False)


@pytest.mark.xfail(strict=True, reason=GAP.format("uint16 (com.microsoft Q/DQ) carrying <= 8 bits"))
def test_enable_all_narrow_codes_in_16_bit_type():
    """16 levels in a uint16 quantizer: onnxruntime turns the QANN's DQ(int8 W) -> MatMul, whose
    activation comes from a 16-bit DQ it cannot fuse, into MatMulNBits, which rounds its input
    (outputs ~1e-2 off); the spiking model's 4-bit times fuse into exact MatMulIntegerToFloat."""
    spec = QdqGraphSpec(rows=(3,), channels=5, seed=1,
                        stages=((ActSpec(levels=16, zero=3, wide=True), LinearSpec(out=4)),))
    model, x, info = random_qdq_model(spec)
    c, _ = compile_in_memory(model, 16)
    assert not compare_stages(model, c, x, DISABLE, info["values"])
    assert not compare_stages(model, c, x, ENABLE, probes=False)


# ------------------------------------------------------------------ zero point outside the code window
#
# Outside the properties above (they keep the zero point inside the Clip's code window): a zero
# point above the window (t_ref = N - z < 0), or so far below it that t_ref exceeds the spike-time
# type, has no emission. Hypothesis found that qdq_to_emit used to accept such a quantizer and wrote
# a model that could not be opened (OverflowError in the lowering); the minimal examples it shrank
# to are kept here. The pass now leaves the quantizer alone with its reason, and compile refuses the
# model with one clear error. With the zero point below the window and t_ref within the type, the
# property holds (300 examples checked when the bug was found).

OUTSIDE = [
    pytest.param(ActSpec(levels=4, zero=4), -1, id="zero-point-above-window"),          # z = N + 1: t_ref = -1
    pytest.param(ActSpec(levels=256, zero=-1, wide=True, offset=1), 256, id="t_ref-256-in-uint8"),
]


@pytest.mark.parametrize("act,t_ref", OUTSIDE)
def test_zero_point_outside_code_window(act, t_ref):
    spec = QdqGraphSpec(rows=(3,), channels=1, stages=((act, LinearSpec(out=1)),))
    model, x, info = random_qdq_model(spec)
    c, reports = compile_in_memory(model, act.levels)
    skipped = reports[0]["skipped"]
    assert len(skipped) == 1 and f"t_ref = N - z = {t_ref} outside" in skipped[0]["reason"], reports[0]
    assert leftover_activation_qdq(c)
    with pytest.raises(TtfscError):
        check_rewritten(c, "q.onnx")


# ------------------------------------------------------------------ negative: not 2^n levels

def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


BAD_LEVELS = st.one_of(st.integers(3, 4095).filter(lambda n: not _is_pow2(n)),
                       st.sampled_from([2, 8192, 65536]))


@st.composite
def graphs_with_a_bad_stage(draw) -> tuple[QdqGraphSpec, int]:
    """A graph spec in which one stage's quantizer has a number of levels no TTFS window has."""
    spec = draw(graph_specs(max_stages=2))
    i = draw(st.integers(0, len(spec.stages) - 1))
    levels = draw(BAD_LEVELS)
    act = draw(act_specs(levels))
    stage_list = list(spec.stages)
    stage_list[i] = (act, stage_list[i][1])
    return QdqGraphSpec(spec.rows, spec.channels, tuple(stage_list), spec.scale_exp, spec.seed), i


@settings(max_examples=150, **PROPERTY)
@given(graphs_with_a_bad_stage())
def test_non_power_of_two_levels_left_alone(case):
    """A quantizer of 37 (or any non-2^n) levels is skipped with its reason, never miscompiled.

    The other stages still compile (-T auto), the skipped quantizer stays as it was, the partly
    compiled model still equals the QDQ model, and ``compile`` refuses it (check_rewritten).
    """
    spec, i = case
    model, x, info = random_qdq_model(spec)
    c, reports = compile_in_memory(model, None)
    emit = reports[0]
    bad_q = info["quantizers"][i]
    levels = spec.stages[i][0].levels
    assert [s["node"] for s in emit["skipped"]] == [bad_q], emit
    assert f"{levels} code levels is not 2^n" in emit["skipped"][0]["reason"]
    assert emit["rewritten"] == ({"QuantDequantToEmit": len(spec.stages) - 1} if len(spec.stages) > 1 else {})
    kept = {n.name: n for n in c.graph.node}
    before = {n.name: n for n in model.graph.node}
    assert kept[bad_q] == before[bad_q]
    assert leftover_activation_qdq(c) == [bad_q, f"a{i}_DequantizeLinear"]
    with pytest.raises(TtfscError, match="could not become TTFS stages"):
        check_rewritten(c, "q.onnx")
    if len(spec.stages) > 1:
        assert_equal_runs(spec, model, c, x, info)
    else:                                                          # nothing compiled: the same graph
        assert list(c.graph.node) == list(model.graph.node)
        assert_compiled_equals_qdq(model, c, [x], (DISABLE, ENABLE), exact_reference=True)
