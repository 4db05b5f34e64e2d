"""``ttfsc sweep``: perplexity against latency, QANN vs QC-A2S SNN vs the continuous-kernel baseline.

The paper's Table 3 (accuracy of QC-A2S against the window T) plus its claim in one run: for
each T in ``-T`` and each weight width in ``--wbits`` it quantizes the float model with
A = log2(T) activation bits (ttfsc.quantizer, default options), compiles the QANN into
the spiking model (QC-A2S, ``ttfsc compile``) and measures the perplexity of *both*; they must
agree, since the SNN is bit-exact to its QANN. For each T it also compiles the TTFSFormer-style
baseline (``ttfsc compile --neuron continuous``: float weights, min/max ranges, floor neurons) and
measures it on the same windows. Latency is time steps per token (the longest chain of stage
windows, compiler.pipeline.latency_per_token).

Outputs in ``--out``: ``sweep.md`` (the table and the command), ``sweep.png`` (PPL against T)
and ``sweep.json`` (every number), written together at the end. Intermediate models go to
``--work`` and are reused when present: each is its own transaction (ttfsc.transaction), so a
present model is a complete one, and an interrupted sweep keeps the models finished so far and
nothing half-made.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ttfsc.errors import TtfscError

HELP = "PPL vs time window T: QANN, QC-A2S SNN and the continuous-kernel baseline, W4/W8 (table + plot)"
DEFAULT_T = (16, 64, 256, 1024)
DEFAULT_WBITS = (4, 8)


@dataclass
class Row:
    """One measured model: its kind (fp, qann, snn, continuous), widths, PPL and latency."""

    kind: str
    T: int | None
    wbits: int | None
    ppl: float
    tokens: int
    latency: int | None = None
    path: str = ""
    seconds: float = 0.0


@dataclass
class Sweep:
    model: str
    text: str
    seqlen: int | None
    windows: int | None
    first: bool
    rows: list[Row] = field(default_factory=list)
    command: str = ""

    def get(self, kind: str, T: int | None = None, wbits: int | None = None) -> Row | None:
        return next((r for r in self.rows if (r.kind, r.T, r.wbits) == (kind, T, wbits)), None)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas, e.g. 16,64,256") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="float ONNX model (as exported by `ttfsc export`)")
    p.add_argument("--ppl", required=True, metavar="TEXT", help="text file to measure perplexity on")
    p.add_argument("-T", dest="T", type=_int_list, default=list(DEFAULT_T),
                   help="time windows, comma separated (default 16,64,256,1024); QANN/SNN use A = log2(T) bits")
    p.add_argument("--wbits", type=_int_list, default=list(DEFAULT_WBITS), help="weight widths (default 4,8)")
    p.add_argument("--continuous-T", type=_int_list, default=[], metavar="T,...",
                   help="extra windows measured for the continuous-kernel baseline only (e.g. 8192)")
    p.add_argument("--no-continuous", action="store_true", help="skip the continuous-kernel baseline")
    p.add_argument("--no-qann", action="store_true",
                   help="skip QANN and SNN: measure only FP32 and the continuous baseline (at -T and --continuous-T)")
    p.add_argument("--windows", type=int, default=None, help="number of windows (seeded random subset; default all)")
    p.add_argument("--first", action="store_true", help="take the first --windows windows instead")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default min(2048, context))")
    p.add_argument("--calib", default=None, metavar="TEXT",
                   help="plain-text calibration file (quantize and continuous; default: self-generated text)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration sequences (quantize and continuous)")
    p.add_argument("--calib-seqlen", type=int, default=128, help="tokens per calibration sequence")
    p.add_argument("--out", default=".", help="folder for sweep.md, sweep.png and sweep.json")
    p.add_argument("--work", default=None, help="folder for intermediate models, reused if present (default OUT/work)")
    p.add_argument("--name", default="sweep", help="file stem of the outputs (default sweep)")


def _check_args(args: argparse.Namespace) -> None:
    from ttfsc.ttfs import bits_for_window, continuous_window
    if not Path(args.model).is_file():
        raise TtfscError(f"{args.model}: no such model file; give the float .onnx exported by `ttfsc export`.")
    if not Path(args.ppl).is_file():
        raise TtfscError(f"--ppl {args.ppl}: no such text file.")
    _check_windows("-T", args.T, bits_for_window)
    _check_windows("--continuous-T", args.continuous_T, continuous_window)
    bad = [w for w in args.wbits if w not in (4, 8)]
    if bad:
        raise TtfscError(f"--wbits {bad[0]}: weights are quantized to 4 or 8 bits.")


def _check_windows(flag: str, windows: list[int], check: Callable[[int], int]) -> None:
    """Each window of ``flag`` through ``check`` (ttfs's own test); the first bad one is a one-line user error."""
    for T in windows:
        try:
            check(T)
        except ValueError as exc:
            raise TtfscError(f"{flag}: {exc}") from None


class Runner:
    """Builds (or reuses) each model of the sweep in ``work`` and measures it on the same windows."""

    def __init__(self, sweep: Sweep, work: Path, calib: dict, log: Callable[[str], Any]):
        self.sweep, self.work, self.calib, self.log = sweep, work, calib, log

    def measure(self, kind: str, path: Path, T: int | None = None, wbits: int | None = None) -> Row:
        from ttfsc.analysis.evaluate import corpus_perplexity, read_corpus
        from ttfsc.modelio import load_model
        from ttfsc.compiler.pipeline import latency_per_token
        s = self.sweep
        model = _open_exact(path, T if kind == "qann" else None)
        r = corpus_perplexity(model, read_corpus(s.text), seqlen=s.seqlen, windows=s.windows, seed=0, first=s.first,
                              label=s.text)
        latency = latency_per_token(load_model(str(path))) if kind in ("snn", "continuous") else None
        row = Row(kind, T, wbits, r["ppl"], r["tokens"], latency, str(path), round(r["seconds"], 1))
        self.log(f"sweep: {kind:10s} T={T} W={wbits}: PPL {row.ppl:.4f} ({row.tokens} tokens, {row.seconds} s)"
                 + (f", {latency} steps/token" if latency is not None else ""))
        s.rows.append(row)
        return row

    def qann(self, T: int, wbits: int) -> Path:
        from ttfsc.quantizer.config import QuantConfig
        from ttfsc.quantizer.quantize import quantize_model
        from ttfsc.ttfs import bits_for_window
        path = self.work / f"W{wbits}_T{T}" / "model.qdq.onnx"
        if not path.is_file():  # quantize_model creates the folder with the model, or not at all
            config = QuantConfig(wbits=wbits, abits=bits_for_window(T), **self.calib)
            quantize_model(self.sweep.model, path, config, log=_quiet)
        return path

    def snn(self, qann: Path, T: int) -> Path:
        from ttfsc.compiler.pipeline import compile_model
        path = qann.with_name("model.snn.onnx")
        if not path.is_file():
            compile_model(str(qann), str(path), T, log=_quiet)
        return path

    def continuous(self, T: int) -> Path:
        from ttfsc.compiler.pipeline import compile_model
        path = self.work / f"continuous_T{T}" / "model.onnx"
        if not path.is_file():
            compile_model(self.sweep.model, str(path), T, quant_options=dict(self.calib), log=_quiet,
                          neuron="continuous")
        return path


def _open_exact(path: Path, qann_T: int | None) -> Any:
    """evaluate's opened model; a QANN of more than 128 levels with onnxruntime's exact QDQ numerics.

    The spiking model already runs that way (runtime.session.exact_options): onnxruntime's fused
    u8s8 kernels saturate int16 pair sums on CPUs without VNNI once codes exceed 127, which would
    make the *QANN* column wrong (measured on stories260K: W8A8 5.771 fused vs 5.178 exact, which
    is the SNN's value; W4A8 6.7436 vs 6.7433).
    """
    from ttfsc.analysis.evaluate import open_model
    from ttfsc.modelio import load_model
    from ttfsc.runtime.generate import Generator
    from ttfsc.runtime.session import SATURATION_FREE_T, default_options, session_from_model
    model = open_model(path)
    if qann_T is not None and qann_T > SATURATION_FREE_T:
        so = default_options()
        so.add_session_config_entry("session.disable_quant_qdq", "1")
        model.gen = Generator(session_from_model(load_model(path), so), path.parent)
    return model


def _quiet(*_a: Any) -> None:
    """Swallow the quantizer's and compiler's progress lines (the sweep logs its own)."""


def run_sweep(args: argparse.Namespace, log: Callable[[str], Any] = print) -> Sweep:
    """Build and measure every model; returns the sweep (rows in measurement order)."""
    _check_args(args)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    check_outputs(args, out, work)
    sweep = Sweep(str(args.model), str(args.ppl), args.seqlen, args.windows, args.first,
                  command=getattr(args, "command", ""))
    calib = {"calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen}
    if getattr(args, "calib", None):
        calib["calib"] = str(args.calib)
    run = Runner(sweep, work, calib, log)
    run.measure("fp", Path(args.model))
    for T in [] if args.no_qann else args.T:
        for w in args.wbits:
            qann = run.qann(T, w)
            run.measure("qann", qann, T, w)
            run.measure("snn", run.snn(qann, T), T, w)
    if not args.no_continuous:
        for T in sorted(set(args.T) | set(args.continuous_T)):
            run.measure("continuous", run.continuous(T), T)
    return sweep


# ---------------------------------------------------------------- outputs

def _fmt(row: Row | None) -> str:
    if row is None:
        return "–"
    return f"{row.ppl:.3f}" if row.ppl < 1e4 else f"{row.ppl:.3g}"


def render_markdown(s: Sweep, wbits: list[int], png_name: str) -> str:
    """Table 3-style: one row per T, QANN and SNN PPL per weight width, the baseline, latency."""
    fp = s.get("fp")
    Ts = sorted({r.T for r in s.rows if r.T is not None})
    head = ["T (A bits)", "latency (steps/token)"]
    for w in wbits:
        head += [f"W{w} QANN", f"W{w} SNN (QC-A2S)", f"W{w} \\|Δ\\|"]
    head += ["continuous (FP weights)", "continuous latency"]
    lines = [f"Perplexity of `{s.model}` on `{s.text}` ({_windows_desc(s, fp)}); FP32: **{fp.ppl:.3f}**.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for T in Ts:
        timed = [s.get("snn", T, w) for w in wbits] + [s.get("continuous", T)]
        lat = next((r.latency for r in timed if r is not None), None)
        cells = [f"{T} ({int(math.log2(T))})", str(lat) if lat is not None else "–"]
        for w in wbits:
            q, n = s.get("qann", T, w), s.get("snn", T, w)
            diff = f"{abs(q.ppl - n.ppl):.2g}" if q and n else "–"
            cells += [_fmt(q), _fmt(n), diff]
        c = s.get("continuous", T)
        cells += [_fmt(c), str(c.latency) if c else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![PPL against T]({png_name})", ""]
    return "\n".join(lines)


def _windows_desc(s: Sweep, fp: Row) -> str:
    n = fp.tokens
    how = "first" if s.first else "seeded random (seed 0)"
    return f"{s.windows or 'all'} {how} windows of {s.seqlen or 'default'} tokens, {n} scored tokens"


def plot(s: Sweep, wbits: list[int], path: Path) -> None:
    """PPL against T (log2 axis): QANN dashed, SNN markers, continuous baseline, FP32 line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for w, color in zip(wbits, ("tab:blue", "tab:orange", "tab:green")):
        for kind, style in (("qann", dict(ls="--", marker="s", ms=9, mfc="none")), ("snn", dict(ls="-", marker="o", ms=4))):
            pts = sorted((r.T, r.ppl) for r in s.rows if r.kind == kind and r.wbits == w)
            if pts:
                label = f"W{w} QANN" if kind == "qann" else f"W{w} SNN (QC-A2S)"
                ax.plot(*zip(*pts), color=color, label=label, **style)
    pts = sorted((r.T, r.ppl) for r in s.rows if r.kind == "continuous")
    if pts:
        ax.plot(*zip(*pts), color="tab:red", marker="^", label="continuous kernels (TTFSFormer-style)")
    ax.axhline(s.get("fp").ppl, color="black", lw=0.8, ls=":", label="FP32")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("time window T (steps per stage)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{Path(s.model).parent.name}: perplexity against T", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    from ttfsc.modelio import atomic_outputs
    with atomic_outputs(path) as (tmp,):
        write(Path(tmp))


def output_paths(out: Path, name: str) -> dict[str, Path]:
    return {"md": out / f"{name}.md", "png": out / f"{name}.png", "json": out / f"{name}.json"}


def check_outputs(args: argparse.Namespace, out: Path, work: Path) -> None:
    """Before the sweep's hours: its folders can be written, and no output is one of its inputs."""
    from ttfsc.modelio import load_model, model_files
    from ttfsc.transaction import check_writable, guard
    check_writable(work, "--work")
    inputs = {Path(args.ppl): "the --ppl text"} | model_files(load_model(args.model), args.model)
    if getattr(args, "calib", None):
        inputs[Path(args.calib)] = "the --calib text"
    guard({p: f"the sweep's {p.name}" for p in output_paths(out, args.name).values()}, inputs, "--out")


def write_outputs(s: Sweep, wbits: list[int], out: Path, name: str) -> dict[str, Path]:
    """sweep.md, sweep.png and sweep.json: all three or none (one transaction)."""
    from ttfsc.transaction import transaction
    paths = output_paths(out, name)
    with transaction():
        plot(s, wbits, paths["png"])
        md = render_markdown(s, wbits, paths["png"].name)
        if s.command:
            md = f"Command: `{s.command}`\n\n" + md
        _atomic_write(paths["md"], lambda tmp: tmp.write_text(md))
        _atomic_write(paths["json"], lambda tmp: tmp.write_text(json.dumps(
            {**{k: v for k, v in asdict(s).items() if k != "rows"}, "rows": [asdict(r) for r in s.rows]}, indent=1)))
    return paths


def command_line(args: argparse.Namespace) -> str:
    """The sweep's own command line, rebuilt from the parsed options (all of them, defaults included)."""
    def ints(v: list[int]) -> str:
        return ",".join(map(str, v))
    parts = ["ttfsc", "sweep", args.model, "--ppl", args.ppl, "-T", ints(args.T)]
    parts += [] if args.no_qann else ["--wbits", ints(args.wbits)]
    if args.continuous_T:
        parts += ["--continuous-T", ints(args.continuous_T)]
    for flag, value in (("--windows", args.windows), ("--seqlen", args.seqlen)):
        if value is not None:
            parts += [flag, str(value)]
    parts += [f for f, on in (("--first", args.first), ("--no-continuous", args.no_continuous),
                              ("--no-qann", args.no_qann)) if on]
    parts += ["--calib", args.calib] if getattr(args, "calib", None) else []
    parts += ["--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
              "--out", args.out] + (["--work", args.work] if args.work else [])
    parts += ["--name", args.name] if args.name != "sweep" else []
    return " ".join(shlex.quote(str(p)) for p in parts)


def cli(args: argparse.Namespace) -> int:
    if args.no_qann and args.no_continuous:
        raise TtfscError("--no-qann and --no-continuous leave nothing to sweep; drop one of them.")
    args.command = command_line(args)
    t0 = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    sweep = run_sweep(args, log)
    wbits = [] if args.no_qann else args.wbits
    paths = write_outputs(sweep, wbits, Path(args.out), args.name)
    print(render_markdown(sweep, wbits, paths["png"].name))
    print(f"wrote {paths['md']}, {paths['png']}, {paths['json']} ({time.perf_counter() - t0:.0f} s)")
    return 0
