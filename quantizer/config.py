"""The options of ``ttfsc quantize``, written once: one ``QuantConfig`` field per option.

Why one list: ``ttfsc quantize``, ``ttfsc compile`` (which quantizes a float model first) and the
Python API (``quantize_model``) take the same options, and three hand-kept copies drift. Each field
carries its help and argparse settings as metadata: ``add_arguments`` makes the CLI options from
them, ``QuantConfig.from_args`` reads them back, ``compile_options`` names the ones compile
forwards. The vocabularies and measured defaults of the options live here beside the fields, and
``QuantConfig.check`` rejects bad values before any file is read, so an error is about the
option, not the model. Nothing here reads a model (no onnx), so building the CLI stays cheap.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from ttfsc.errors import TtfscError
from ttfsc.ttfs import MAX_BITS, MIN_BITS, bits_for_window, window_for_bits

WEIGHT_BITS = {8: 127, 4: 7}  # wbits -> largest symmetric code
WEIGHT_METHODS = ("rtn", "gptq")  # round to nearest, or GPTQ (quantizer/gptq.py) onto the same grid
DEFAULT_WEIGHT_METHOD = {4: "gptq", 8: "rtn"}  # SmolLM2 W4A6 RTN 99.7 -> GPTQ 46.3 (benchmarks/bits_T.md); W8A6 GPTQ 24.04 vs RTN 23.99: no gain
METHODS = ("minmax", "percentile", "search")
DEFAULT_METHOD = "search"  # measured best on SmolLM2-135M W8A6/W8A4 (benchmarks/lowT.md)
PREFIX_MODES = ("auto", "none", "bos")  # or explicit comma-separated token ids
ROTATIONS = ("random", "hadamard")  # orthogonal rotations of the residual stream (quantizer/rotate.py)
ROTATE_CHOICES = ("auto", "none", *sorted(ROTATIONS))
ROTATE_AUTO = "hadamard"  # what --rotate auto applies to a recognised LLaMA decoder
DEFAULT_ROTATE = "auto"  # SmolLM2 W8A6: 71.2 -> 34.0 with smoothing (benchmarks/lowT.md)
ONLINE_CHOICES = ("auto", "on", "off")  # online Hadamard before down_proj; auto: with a Hadamard rotation, not --full
DEFAULT_SMOOTH = 0.5  # SmoothQuant alpha before calibration, 0 = off (benchmarks/lowT.md)
LOW_BIT_SMOOTH = 0.75  # at <= 4 activation bits: SmolLM2 W8A4 163 (0.5) -> 109 (0.75), benchmarks/lowT.md

# stage kinds of a --full twin (quantizer/full.py); the width classes are the kinds, except that
# QK^T scores (kind "product") are sized with the softmax
FULL_KINDS = ("residual", "rmsnorm_ms", "rsqrt", "product", "linear_out", "rotary", "silu", "lse", "sub", "exp",
              "kv")
WIDTHS = tuple(k for k in FULL_KINDS if k != "kv") + ("scores",)
WINDOW_ALIASES = {"softmax": ("scores", "lse", "sub", "exp"), "rmsnorm": ("rmsnorm_ms", "rsqrt")}

# where an option appears: both commands, quantize only (compile takes A from -T), quantize only (--full)
SHARED, ABITS, FULL = "shared", "abits", "full"


def _option(default: Any, help: str, scope: str = SHARED, **argparse_kw: Any) -> Any:
    """A QuantConfig field whose metadata is its CLI option (flag from the name, help, argparse settings)."""
    return field(default=default, metadata={"help": help, "scope": scope, "argparse": argparse_kw})


def _weight_method_help() -> str:
    per_width = ", ".join(f"{m} at --wbits {b}" for b, m in sorted(DEFAULT_WEIGHT_METHOD.items()))
    return (f"weight rounding onto the per-channel grid: rtn (nearest) or gptq (error-compensating, "
            f"quantizer/gptq.py); default: {per_width}, rtn with --full")


def _window_help() -> str:
    kinds = " ".join("scores (QK^T)" if k == "scores" else k for k in WIDTHS)
    aliases = ", ".join(f"{a} ({' '.join(ks)})" for a, ks in WINDOW_ALIASES.items())
    return (f"--full: levels of one stage kind (repeatable), e.g. softmax=256, residual=256; kinds: {kinds}; "
            f"aliases {aliases}; default: --abits plus the measured extra bits of the kind (quantizer/full.py)")


@dataclass(frozen=True)
class QuantConfig:
    """Every option of ``ttfsc quantize``; field order is the order of the CLI options.

    ``calib`` is None (text the model samples itself), a plain-text file path, or, through the
    API only, an iterable of ready feed dicts (for non-decoder graphs and tests). ``abits_for``
    may also be a ready {pattern: bits} dict.
    """

    wbits: int = _option(8, "weight width (per output channel, symmetric)", type=int,
                         choices=tuple(sorted(WEIGHT_BITS)))
    weight_method: str | None = _option(None, _weight_method_help(), choices=WEIGHT_METHODS)
    abits: int = _option(6, f"activation width, {MIN_BITS}..{MAX_BITS} (per tensor, asymmetric)", ABITS, type=int)
    method: str = _option(DEFAULT_METHOD, "activation range calibration (search: clipping of least layer-output MSE)",
                          choices=METHODS)
    percentile: float = _option(99.99, "percentile for --method percentile", type=float)
    prefix: str = _option("auto", "fixed prefix whose float KV cache is kept (PrefixQuant): auto (outlier tokens "
                                  "found in calibration, if any), none, bos, or token ids such as 1,198")
    rotate: str = _option(DEFAULT_ROTATE, "rotate the residual stream before calibrating (QuaRot-style, "
                                          "function-preserving); auto: hadamard (and --smooth) for a recognised "
                                          "LLaMA decoder, nothing for other graphs", choices=ROTATE_CHOICES)
    rotate_seed: int = _option(0, "seed of the rotation's random signs / factors", type=int)
    online_hadamard: str = _option("auto", "a float Hadamard (factored, ~n*(sqrt(n)+m) multiplies) before every "
                                           "down_proj input, which the residual rotation cannot reach; auto: with "
                                           "--rotate hadamard, not with --full", choices=ONLINE_CHOICES)
    abits_for: Sequence[str] | Mapping[str, int] | None = _option(
        None, "another activation width for tensors whose name contains PATTERN (repeatable); compile such a "
              "model with -T auto to keep each stage's window", action="append", metavar="PATTERN=BITS")
    smooth: float | None = _option(None, f"SmoothQuant migration strength for norm outputs and down_proj inputs, "
                                         f"0 = off (default {DEFAULT_SMOOTH:g}, {LOW_BIT_SMOOTH:g} at 4 activation "
                                         f"bits or fewer)", type=float, metavar="ALPHA")
    calib: Any = _option(None, "plain-text calibration file (default: text the model generates itself)")
    calib_samples: int = _option(8, "number of calibration sequences", type=int)
    calib_seqlen: int = _option(128, "tokens per calibration sequence", type=int)
    full: bool = _option(False, "also quantize every nonlinearity, product of activations and the residual stream: "
                                "the twin of a fully spiking graph (quantizer/full.py)", FULL, action="store_true")
    window: Sequence[str] | None = _option(None, _window_help(), FULL, action="append", metavar="KIND=LEVELS")

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "QuantConfig":
        """The config a parsed command line asks for; options the command lacks keep their defaults."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    # ---------------------------------------------------------------- resolved values

    @property
    def smooth_alpha(self) -> float:
        """SmoothQuant alpha: as given, else stronger at 4 activation bits and below (``default_smooth``)."""
        return default_smooth(self.abits) if self.smooth is None else self.smooth

    @property
    def weight_rounding(self) -> str:
        """rtn or gptq: as given, else the measured default per width; --full twins round to nearest only."""
        if self.weight_method is None:
            return "rtn" if self.full or self.wbits not in DEFAULT_WEIGHT_METHOD else DEFAULT_WEIGHT_METHOD[self.wbits]
        if self.weight_method not in WEIGHT_METHODS:
            raise TtfscError(f"--weight-method {self.weight_method!r}: use rtn or gptq.")
        if self.weight_method == "gptq" and self.full:
            raise TtfscError("--weight-method gptq is not available with --full yet; use --weight-method rtn.")
        return self.weight_method

    @property
    def overrides(self) -> dict[str, int]:
        """--abits-for as {pattern: bits}."""
        return dict(self.abits_for) if isinstance(self.abits_for, Mapping) else parse_bits_overrides(self.abits_for)

    @property
    def prefix_mode(self) -> str | list[int]:
        return parse_prefix(self.prefix)

    @property
    def kind_windows(self) -> dict[str, int]:
        """--window as {width class: bits}."""
        if self.window and not self.full:
            raise TtfscError("--window sets the levels of --full stage kinds; add --full (or drop --window).")
        return parse_windows(self.window)

    @property
    def method_desc(self) -> str:
        return f"percentile {self.percentile}" if self.method == "percentile" else self.method

    def bits(self, name: str) -> int:
        """Activation width of tensor ``name`` (``bits_for`` with this config's --abits-for)."""
        return bits_for(name, self.abits, self.overrides)

    # ---------------------------------------------------------------- validation

    def check(self) -> None:
        """Reject bad options before any file is read, so errors are about the option, not the model."""
        _ = self.weight_rounding, self.overrides  # each raises on a bad --weight-method / --abits-for
        if self.wbits not in WEIGHT_BITS:
            raise TtfscError(f"--wbits {self.wbits} is not supported; use 8 or 4.")
        if not MIN_BITS <= self.abits <= MAX_BITS:
            raise TtfscError(f"--abits {self.abits} is outside {MIN_BITS}..{MAX_BITS}; pick an activation width in "
                             "that range (e.g. 6).")
        if self.method not in METHODS:
            raise TtfscError(f"--method {self.method} is unknown; use one of {', '.join(METHODS)}.")
        if self.method == "percentile" and not 50.0 < self.percentile <= 100.0:
            raise TtfscError(f"--percentile {self.percentile} must be in (50, 100], e.g. 99.99.")
        if self.calib_samples < 1:
            raise TtfscError(f"--calib-samples {self.calib_samples} must be at least 1.")
        if self.calib_seqlen < 2:
            raise TtfscError(f"--calib-seqlen {self.calib_seqlen} must be at least 2.")
        if self.rotate not in ROTATE_CHOICES:
            raise TtfscError(f"--rotate {self.rotate} is unknown; use auto, none, {', '.join(ROTATIONS)}.")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise TtfscError(f"--smooth {self.smooth_alpha} is outside [0, 1]; 0 turns smoothing off, SmoothQuant "
                             "uses 0.5.")
        _ = self.prefix_mode, self.kind_windows  # each raises on a bad --prefix / --window
        self._check_online()

    def _check_online(self) -> None:
        if self.online_hadamard not in ONLINE_CHOICES:
            raise TtfscError(f"--online-hadamard {self.online_hadamard!r}: use one of {', '.join(ONLINE_CHOICES)}.")
        if self.online_hadamard == "on" and self.full:
            raise TtfscError("--online-hadamard on and --full exclude each other: a --full twin quantizes gate*up "
                             "itself; drop one of them.")


# ---------------------------------------------------------------- the CLI, generated from the fields

def add_arguments(parser: argparse.ArgumentParser, abits_default: int | None = None, full: bool = False) -> None:
    """Add the quantization options to a command: --abits only with a default (compile takes A from -T),
    --full/--window only for ``ttfsc quantize`` (``full=True``)."""
    for f in fields(QuantConfig):
        scope = f.metadata["scope"]
        if (scope == FULL and not full) or (scope == ABITS and abits_default is None):
            continue
        default = abits_default if scope == ABITS else f.default
        kw = dict(f.metadata["argparse"])
        shown = default is not None and kw.get("action") != "store_true"
        help_text = f.metadata["help"] + (" (default: %(default)s)" if shown else "")
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, help=help_text, **kw)


def compile_options() -> tuple[str, ...]:
    """The options ``ttfsc compile`` shares with ``ttfsc quantize`` and forwards when it quantizes first."""
    return tuple(f.name for f in fields(QuantConfig) if f.metadata["scope"] == SHARED)


# ---------------------------------------------------------------- parsing option values

def bits_for(name: str, abits: int, overrides: Mapping[str, int] | None) -> int:
    """Activation width of tensor ``name``: the first override whose pattern it contains, else ``abits``.

    Per-stage widths let a few sensitive tensors get a wider TTFS window (more latency only on
    their stages) while the rest stay narrow; ``ttfsc compile -T auto`` keeps each stage's window.
    """
    for pattern, bits in (overrides or {}).items():
        if pattern in name:
            return bits
    return abits


def check_overrides_match(overrides: Mapping[str, int], names: Sequence[str]) -> None:
    """Refuse an --abits-for pattern that no quantized activation's name contains.

    Such a pattern used to be ignored without a word, leaving the model at one width while the
    user believed some stages were wider (e.g. ``down_proj=8``: the down_proj input is named
    ``.../mlp/Mul_output_0``).
    """
    for pattern, bits in overrides.items():
        if not any(pattern in n for n in names):
            example = next(iter(names), "")
            raise TtfscError(f"--abits-for {pattern}={bits}: no quantized activation's name contains {pattern!r}; "
                             f"the names look like {example!r} (the list is printed by `ttfsc quantize`); use a part "
                             f"of one, e.g. 'mlp/Mul' for the down_proj inputs.")


def parse_bits_overrides(specs: Sequence[str] | None) -> dict[str, int]:
    """``["mlp/Mul=8", ...]`` -> {"mlp/Mul": 8}; bad syntax or widths are a clear error."""
    out: dict[str, int] = {}
    for spec in specs or ():
        pattern, sep, bits = spec.rpartition("=")
        if not sep or not pattern or not bits.isdigit() or not MIN_BITS <= int(bits) <= MAX_BITS:
            raise TtfscError(f"--abits-for {spec!r}: expected PATTERN=BITS with BITS in {MIN_BITS}..{MAX_BITS}, "
                             "e.g. --abits-for mlp/Mul=8 (PATTERN is a substring of the activation tensor name).")
        out[pattern] = int(bits)
    return out


def default_smooth(abits: int) -> float:
    """SmoothQuant alpha when none is given: stronger migration pays off at 4 bits and below."""
    return LOW_BIT_SMOOTH if abits <= 4 else DEFAULT_SMOOTH


def parse_prefix(prefix: str) -> str | list[int]:
    """``auto``, ``none``, ``bos``, or explicit token ids "1,198" (returned as a list)."""
    if prefix in PREFIX_MODES:
        return prefix
    try:
        ids = [int(t) for t in prefix.split(",")]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise TtfscError(f"--prefix {prefix} is not valid; use auto, none, bos or token ids such as 1,198.")
    return ids


def parse_windows(specs: Sequence[str] | None) -> dict[str, int]:
    """``["softmax=256", "residual=256"]`` -> {width class: bits} (aliases expanded); one clear error otherwise."""
    out: dict[str, int] = {}
    valid = list(WIDTHS) + list(WINDOW_ALIASES)
    for spec in specs or ():
        kind, sep, levels = spec.partition("=")
        kinds = WINDOW_ALIASES.get(kind, (kind,) if kind in valid else ())
        bits = _window_bits(levels)
        if not sep or not kinds or bits is None:
            raise TtfscError(f"--window {spec!r}: expected KIND=LEVELS with KIND one of {', '.join(valid)} and LEVELS "
                             f"a power of two in {window_for_bits(MIN_BITS)}..{window_for_bits(MAX_BITS)}, e.g. --window softmax=256.")
        out.update({k: bits for k in kinds})
    return out


def _window_bits(levels: str) -> int | None:
    """Bits of a window of ``levels`` slots (a power of two in the TTFS range), None if it is not one."""
    try:
        return bits_for_window(int(levels)) if levels.isdigit() else None
    except ValueError:
        return None
