"""``ttfsc export``: turn a LLaMA checkpoint into one ONNX decoder graph with a KV cache.

Every later stage (quantize, compile, verify, run) works on a single ``model.onnx`` that serves
both prefill and decode (inputs ``input_ids, attention_mask, position_ids,
past_key_values.{i}.key/value``; outputs ``logits, present.{i}.key/value``), so that the graph
rewriting passes only ever see one graph. Three sources are accepted:

* a Hugging Face folder (``config.json`` + weights);
* a ``.gguf`` file (dequantized to fp32 by transformers; tokenizer rebuilt from its metadata);
* a llama2.c ``.bin`` checkpoint plus its ``tokenizer.bin``.

GGUF and llama2.c checkpoints are first written as a temporary fp32 Hugging Face folder so that
one exporter (optimum-onnx) produces every graph. The tokenizer is saved beside the output.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import struct
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from ttfsc.errors import TtfscError
from ttfsc.modelio import SIDECAR_NAMES, atomic_outputs, data_file_name, load_model, save_model
from ttfsc.transaction import guard, refuse_changing, transaction

SUPPORTED_MODEL_TYPES = ("llama",)
LLAMA2C_HEADER = struct.Struct("<7i")
LLAMA2C_BOS, LLAMA2C_EOS = 1, 2
# Recorded in config.json so load_tokenizer picks tokenizer.bin even beside stale HF tokenizer files.
LLAMA2C_TOKENIZER = "tokenizer.bin"


# ---------------------------------------------------------------- CLI and entry point

def export_cli(args: argparse.Namespace) -> int:
    """CLI wrapper: export, then say where the model went and how long it took."""
    t0 = time.perf_counter()
    out = export_model(args.src, args.output, tokenizer=args.tokenizer)
    print(f"exported {args.src} -> {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def export_model(src: str | os.PathLike, out_path: str | os.PathLike,
                 tokenizer: str | os.PathLike | None = None) -> Path:
    """Export SRC to ``out_path`` (+ ``.data``, config and tokenizer beside it); return the path.

    Everything is built in a temporary folder; the model, its data, config and tokenizer are one
    transaction (ttfsc.transaction), moved into place together when complete, so a failure or an
    interrupt leaves no partial output.
    """
    src, out = Path(src), Path(out_path)
    _check_output(out)
    kind = detect_format(src)
    with transaction() as txn:
        inputs = _export_inputs(src, kind, tokenizer)
        guard(_export_outputs(out), inputs)
        work = txn.scratch(None, "export")
        try:
            with _quiet():
                hf_dir, stage = _prepare_hf_folder(src, kind, work, tokenizer)
            refuse_changing({out.parent / f.name: f for f in stage.iterdir()}, inputs)  # before the long export
            onnx_dir = work / "onnx"
            _run_optimum(hf_dir, onnx_dir)
            model = load_model(onnx_dir / "model.onnx")
            _publish_sidecars(stage, out.parent)
            save_model(model, out)
        finally:
            txn.release(work)
    return out


def _export_outputs(out: Path) -> dict[Path, str]:
    return {out: "the output", out.with_name(data_file_name(out)): "the output's data file"}


def _export_inputs(src: Path, kind: str, tokenizer: str | os.PathLike | None) -> dict[Path, str]:
    """The checkpoint's files, which the export must not overwrite (a tokenizer copied onto itself is fine)."""
    if kind == "hf":
        return {f: f"the checkpoint's {f.name}" for f in sorted(src.iterdir()) if f.is_file()}
    files = {src: "the checkpoint"}
    if kind == "llama2c":
        with contextlib.suppress(TtfscError):  # none found: _prepare_hf_folder says so
            files[_find_llama2c_tokenizer(src, tokenizer)] = "the tokenizer"
    return files


def _check_output(out: Path) -> None:
    """Refuse outputs that later commands could not find as a model."""
    if out.suffix != ".onnx":
        raise TtfscError(f"{out}: output must end in .onnx (e.g. -o out/model.onnx).")
    if out.is_dir():
        raise TtfscError(f"{out}: is a folder. Give an .onnx file path with -o.")


def detect_format(src: Path) -> str:
    """'hf', 'gguf' or 'llama2c'; a clear error for anything else."""
    if not src.exists():
        raise TtfscError(f"{src}: no such file or folder. Give a Hugging Face folder, a .gguf file "
                         "or a llama2.c .bin checkpoint.")
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise TtfscError(f"{src}: folder has no config.json, so it is not a Hugging Face checkpoint. "
                             "Point at the folder that holds config.json and the weights.")
        return "hf"
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if src.suffix == ".bin" and _looks_like_llama2c(src):
        return "llama2c"
    raise TtfscError(f"{src}: unknown checkpoint format. Give a Hugging Face folder, a .gguf file "
                     "or a llama2.c .bin checkpoint (header of 7 int32 then fp32 weights).")


# ---------------------------------------------------------------- sources -> HF folder

def _prepare_hf_folder(src: Path, kind: str, work: Path, tokenizer: str | os.PathLike | None) -> tuple[Path, Path]:
    """(folder optimum exports from, staging folder of the sidecars to publish)."""
    stage = work / "sidecars"
    stage.mkdir()
    if kind == "hf":
        if tokenizer is not None:
            raise TtfscError("--tokenizer is only for llama2.c checkpoints; a Hugging Face folder carries its own.")
        _check_architecture(_read_json(src / "config.json"), src / "config.json")
        _save_hf_tokenizer(src, stage, src)
        _stage_configs(src, stage)
        return src, stage
    hf_dir = work / "hf"
    if kind == "gguf":
        if tokenizer is not None:
            raise TtfscError("--tokenizer is only for llama2.c checkpoints; a .gguf file carries its own.")
        _gguf_to_hf(src, hf_dir)
        _save_hf_tokenizer(src.parent, stage, src, gguf_file=src.name)
    else:
        tok = _find_llama2c_tokenizer(src, tokenizer)
        llama2c_to_hf(src, hf_dir)
        shutil.copy2(tok, stage / LLAMA2C_TOKENIZER)
    _stage_configs(hf_dir, stage)
    return hf_dir, stage


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TtfscError(f"{path}: unreadable JSON ({exc.__class__.__name__}). Re-download the checkpoint.") from None


def _check_architecture(config: dict, where: Path | str) -> None:
    """Only LLaMA-family graphs are understood by the compiler passes."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TtfscError(f"{where}: model_type {model_type!r} is not supported; ttfsc exports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} models only. Use a LLaMA-architecture checkpoint.")


def _stage_configs(hf_dir: Path, stage: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, stage / name)


def _save_hf_tokenizer(load_dir: Path, stage: Path, src: Path, gguf_file: str | None = None) -> None:
    """Save the checkpoint's tokenizer so ``load_tokenizer`` finds it beside the model."""
    from transformers import AutoTokenizer
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(str(load_dir), **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise TtfscError(f"{src}: could not load its tokenizer ({exc.__class__.__name__}: {exc}). "
                         "Add the tokenizer files (tokenizer.json / tokenizer.model) to the checkpoint.") from None
    # Fast files only: a GGUF tokenizer would otherwise copy the whole .gguf as "tokenizer.model".
    tok.save_pretrained(str(stage), legacy_format=False if tok.is_fast else None)


def _gguf_to_hf(src: Path, hf_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into an fp32 transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM
    arch = gguf_architecture(src)
    if arch is not None:
        _check_architecture({"model_type": arch}, src)
    try:
        with _no_gguf_progress_bar():
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise TtfscError(f"{src}: transformers cannot read this GGUF file ({exc.__class__.__name__}: {exc}). "
                         "Use a LLaMA-architecture GGUF (needs the gguf and accelerate packages).") from None
    _check_architecture(model.config.to_dict(), src)
    model.save_pretrained(str(hf_dir))


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """transformers' GGUF loader draws a tqdm bar that ignores its own progress-bar switch."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING = 8


def gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` from the GGUF header, read without parsing the whole file.

    transformers parses every key (tokenizer included) just to build a config, which takes
    seconds; the architecture is one of the first keys, so an unsupported model fails fast.
    None when it is not among the leading scalar/string keys.
    """
    try:
        return _scan_gguf_keys(path)
    except (ValueError, struct.error):
        return None


def _scan_gguf_keys(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            return None
        n_kv = struct.unpack_from("<Q", head, 16)[0]
        for _ in range(min(n_kv, 64)):
            key = _gguf_string(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            if vtype == _GGUF_STRING:
                value = _gguf_string(f)
                if key == "general.architecture":
                    return value
            elif vtype in _GGUF_SCALAR_SIZES:
                f.seek(_GGUF_SCALAR_SIZES[vtype], os.SEEK_CUR)
            else:
                return None
    return None


def _gguf_string(f) -> str:
    raw = f.read(8)
    n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if not 0 <= n <= 1 << 16:
        raise ValueError("not a GGUF string")
    return f.read(n).decode("utf-8", errors="replace")


def _run_optimum(hf_dir: Path, onnx_dir: Path) -> None:
    """One graph for prefill and decode: task with past, no decoder merging post-process."""
    from optimum.exporters.onnx import main_export
    with _quiet():
        main_export(str(hf_dir), str(onnx_dir), task="text-generation-with-past", no_post_process=True,
                    do_validation=False, local_files_only=True, dtype="fp32")
    if not (onnx_dir / "model.onnx").is_file():
        raise TtfscError(f"{hf_dir}: optimum-onnx produced no model.onnx ({sorted(os.listdir(onnx_dir))}).")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the tracer's and transformers' warnings: they concern the exporter, not the user."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _publish_sidecars(stage: Path, out_dir: Path) -> None:
    """Copy config and tokenizer beside the model, replacing stale ones from an earlier export
    (outputs of the export's transaction: they appear with the model, or not at all)."""
    for name in SIDECAR_NAMES:
        if (stage / name).is_file():
            with atomic_outputs(out_dir / name) as (tmp,):
                shutil.copy2(stage / name, tmp)


# ---------------------------------------------------------------- llama2.c

def _looks_like_llama2c(path: Path) -> bool:
    """The header is plausible and the file size matches the weights it announces."""
    try:
        header = _read_llama2c_header(path)
    except TtfscError:
        return False
    return header is not None


def _read_llama2c_header(path: Path) -> dict | None:
    """Parse the 7-int header; None when the numbers cannot describe this file."""
    size = path.stat().st_size
    if size < LLAMA2C_HEADER.size:
        return None
    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = LLAMA2C_HEADER.unpack(f.read(LLAMA2C_HEADER.size))
    if min(dim, hidden, n_layers, n_heads, n_kv, seq_len) <= 0 or vocab == 0:
        return None
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        return None
    cfg = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv,
               vocab=abs(vocab), shared=vocab > 0, seq_len=seq_len)
    if LLAMA2C_HEADER.size + 4 * _llama2c_float_count(cfg) != size:
        return None
    return cfg


def _llama2c_layout(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in file order (llama2.c export version 0)."""
    d, h, L, v = cfg["dim"], cfg["hidden"], cfg["n_layers"], cfg["vocab"]
    head = d // cfg["n_heads"]
    kv_dim = cfg["n_kv"] * head
    layout = [("tok", (v, d)), ("rms_att", (L, d)), ("wq", (L, d, d)), ("wk", (L, kv_dim, d)),
              ("wv", (L, kv_dim, d)), ("wo", (L, d, d)), ("rms_ffn", (L, d)), ("w1", (L, h, d)),
              ("w2", (L, d, h)), ("w3", (L, h, d)), ("rms_final", (d,)),
              ("freq_real", (cfg["seq_len"], head // 2)), ("freq_imag", (cfg["seq_len"], head // 2))]
    if not cfg["shared"]:
        layout.append(("wcls", (v, d)))
    return layout


def _llama2c_float_count(cfg: dict) -> int:
    return sum(int(np.prod(shape)) for _, shape in _llama2c_layout(cfg))


def read_llama2c(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(header dict, name -> fp32 array) of a llama2.c checkpoint, memory-mapped."""
    path = Path(path)
    cfg = _read_llama2c_header(path)
    if cfg is None:
        raise TtfscError(f"{path}: not a llama2.c checkpoint (header and file size disagree). "
                         "Export it with llama2.c's export.py --version 0.")
    flat = np.memmap(path, dtype="<f4", mode="r", offset=LLAMA2C_HEADER.size)
    tensors, offset = {}, 0
    for name, shape in _llama2c_layout(cfg):
        count = int(np.prod(shape))
        tensors[name] = flat[offset:offset + count].reshape(shape)
        offset += count
    tensors.setdefault("wcls", tensors["tok"])
    return cfg, tensors


def interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute q/k projection rows from llama2.c's interleaved-pair rotary to HF's half split.

    llama2.c rotates pairs (2i, 2i+1) of each head; HF rotates (i, i + head_dim/2). Reordering
    the rows of wq/wk per head makes the HF model compute the same attention scores.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def llama2c_hf_config(cfg: dict):
    """The transformers LlamaConfig equivalent of a llama2.c header."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["dim"], intermediate_size=cfg["hidden"],
                       num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
                       num_key_value_heads=cfg["n_kv"], max_position_embeddings=cfg["seq_len"],
                       rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=LLAMA2C_BOS,
                       eos_token_id=LLAMA2C_EOS, tie_word_embeddings=cfg["shared"],
                       ttfsc_tokenizer=LLAMA2C_TOKENIZER)


def llama2c_state_dict(cfg: dict, t: dict[str, np.ndarray]) -> dict:
    """HF LlamaForCausalLM state dict (torch tensors) from llama2.c arrays."""
    import torch

    def tt(a: np.ndarray) -> "torch.Tensor":
        return torch.from_numpy(np.array(a, dtype=np.float32))

    sd = {"model.embed_tokens.weight": tt(t["tok"]), "model.norm.weight": tt(t["rms_final"]),
          "lm_head.weight": tt(t["wcls"])}
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = tt(t["rms_att"][i])
        sd[p + "post_attention_layernorm.weight"] = tt(t["rms_ffn"][i])
        sd[p + "self_attn.q_proj.weight"] = tt(interleaved_to_halves(t["wq"][i], cfg["n_heads"]))
        sd[p + "self_attn.k_proj.weight"] = tt(interleaved_to_halves(t["wk"][i], cfg["n_kv"]))
        sd[p + "self_attn.v_proj.weight"] = tt(t["wv"][i])
        sd[p + "self_attn.o_proj.weight"] = tt(t["wo"][i])
        sd[p + "mlp.gate_proj.weight"] = tt(t["w1"][i])
        sd[p + "mlp.down_proj.weight"] = tt(t["w2"][i])
        sd[p + "mlp.up_proj.weight"] = tt(t["w3"][i])
    return sd


def llama2c_to_hf(src: str | os.PathLike, hf_dir: str | os.PathLike) -> None:
    """Write a llama2.c checkpoint as an fp32 Hugging Face LlamaForCausalLM folder."""
    from transformers import GenerationConfig, LlamaForCausalLM
    cfg, tensors = read_llama2c(src)
    config = llama2c_hf_config(cfg)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(llama2c_state_dict(cfg, tensors), strict=False)
    missing = [m for m in missing if not (cfg["shared"] and m == "lm_head.weight")]
    if missing or unexpected:
        raise TtfscError(f"{src}: llama2.c conversion mismatch (missing {missing}, unexpected {unexpected}).")
    if cfg["shared"]:
        model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=LLAMA2C_BOS, eos_token_id=LLAMA2C_EOS)
    model.save_pretrained(str(hf_dir))


def _find_llama2c_tokenizer(src: Path, tokenizer: str | os.PathLike | None) -> Path:
    """--tokenizer, else tokenizer.bin or tok*.bin beside the checkpoint."""
    if tokenizer is not None:
        tok = Path(tokenizer)
        if not tok.is_file():
            raise TtfscError(f"{tok}: no such tokenizer file. Give llama2.c's tokenizer.bin with --tokenizer.")
        return tok
    candidates = [src.parent / "tokenizer.bin"] + sorted(p for p in src.parent.glob("tok*.bin") if p != src)
    for c in candidates:
        if c.is_file():
            return c
    raise TtfscError(f"{src}: no tokenizer.bin or tok*.bin beside it. Pass the llama2.c tokenizer with --tokenizer.")
