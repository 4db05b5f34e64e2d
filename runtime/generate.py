"""Text generation with a KV cache over an onnxruntime session of an exported decoder.

The exported graph (``ttfsc export``) serves prefill and decode: it takes ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key/value`` and returns
``logits`` and ``present.{i}.key/value``. The same loop drives the float model, the QDQ model
and the spiking model, so their outputs can be compared token by token (verify) and shown (run).

Prefixed outliers (PrefixQuant). A few tokens (BOS, sometimes "\\n" or ".") become attention sinks
with hidden states thousands of times larger than the rest, which ruins per-tensor static
activation ranges. ``ttfsc quantize`` therefore puts a fixed prefix of those tokens in front of
every sequence and saves its KV cache, computed once by the *float* model, as ``prefix.npz``
beside the quantized model. The quantized activations then never see the outliers. A Generator
applies that prefix transparently: every sequence starts from the prefix's cache (positions and
attention mask cover it) and only the logits of the given tokens are returned.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ttfsc.errors import TtfscError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}

Past = list[tuple[np.ndarray, np.ndarray]]
PREFIX_FILE = "prefix.npz"
PREFIX_META = "ttfsc.prefix"  # model metadata: the prefix's token ids ("" = quantized without prefix)


@dataclass(frozen=True)
class Prefix:
    """Fixed leading tokens, their float KV cache ([1, kv_heads, P, head_dim] per layer) and last logits.

    The last logits let generation start right after the prefix (an empty prompt is allowed).
    """

    ids: tuple[int, ...]
    past: Past
    last_logits: np.ndarray

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def kv_bytes(self) -> int:
        """Memory the cache takes per sequence: the whole cost of the prefix at run time."""
        return sum(k.nbytes + v.nbytes for k, v in self.past)

    def save(self, path: str | Path) -> None:
        """Write ``ids``, ``last_logits`` and ``present.{i}.key/value`` (float32) to an .npz file."""
        arrays = {"ids": np.asarray(self.ids, dtype=np.int64), "last_logits": self.last_logits.astype(np.float32)}
        for i, (k, v) in enumerate(self.past):
            arrays[f"present.{i}.key"], arrays[f"present.{i}.value"] = k.astype(np.float32), v.astype(np.float32)
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Prefix":
        try:
            with np.load(path) as z:
                layers = sum(1 for k in z.files if k.endswith(".key"))
                past = [(z[f"present.{i}.key"], z[f"present.{i}.value"]) for i in range(layers)]
                return cls(tuple(int(t) for t in z["ids"]), past, z["last_logits"])
        except (OSError, KeyError, ValueError) as exc:
            raise TtfscError(f"{path}: not a readable prefix cache ({exc}); re-run `ttfsc quantize` to rewrite it, "
                             "or delete it to run without a prefix.") from None


class Generator:
    """KV-cache decoding loop; the cache geometry comes from the graph inputs or config.json."""

    def __init__(self, session: Any, model_dir: str | Path | None = None, prefix: Prefix | None | str = "auto"):
        """``prefix``: "auto" loads ``prefix.npz`` from ``model_dir`` when there is one; None runs without."""
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.input_names = set(inputs)
        # only what decoding needs: extra outputs (calibration/verify probes) are fetched explicitly
        self.output_names = [o.name for o in session.get_outputs() if o.name == "logits" or o.name.startswith("present.")]
        if "input_ids" not in inputs or "logits" not in self.output_names:
            raise TtfscError("model has no input_ids input or logits output; export it with `ttfsc export`.")
        self.config = _read_config(model_dir)
        self.num_layers = _count_layers(inputs)
        self.kv_heads, self.head_dim, self.past_dtype = self._cache_geometry(inputs)
        self.max_positions = self.config.get("max_position_embeddings")
        self.stop_ids = frozenset(_as_list(self.config.get("eos_token_id")))
        self.prefix = self._load_prefix(model_dir) if isinstance(prefix, str) else prefix
        if self.prefix is not None:
            self._check_prefix(self.prefix)

    def _load_prefix(self, model_dir: str | Path | None) -> Prefix | None:
        """``prefix.npz`` beside the model, only when the model's metadata says it was quantized with it.

        A model that declares no prefix (a float model, a QDQ model from another quantizer, one
        quantized without a prefix) runs without one even when a sibling's prefix.npz sits in the
        same folder: a float baseline that silently carried the quantized model's prefix measured
        30.39 instead of 26.74 on one SmolLM2 window (issue 11).
        """
        path = Path(model_dir) / PREFIX_FILE if model_dir is not None else None
        wanted = _metadata(self.session).get(PREFIX_META)
        if not wanted:
            return None
        if path is None or not path.is_file():
            raise TtfscError(f"the model was quantized with prefix tokens [{wanted}] but {PREFIX_FILE} is not beside it"
                             f"{f' in {model_dir}' if model_dir is not None else ''}; copy the model's own "
                             f"{PREFIX_FILE} beside it (or re-run `ttfsc quantize`).")
        prefix = Prefix.load(path)
        if wanted != format_ids(prefix.ids):
            raise TtfscError(f"{path} holds prefix tokens [{format_ids(prefix.ids)}] but the model was quantized with "
                             f"[{wanted}]; copy the model's own prefix.npz beside it (or re-run `ttfsc quantize`).")
        return prefix

    def _check_prefix(self, prefix: Prefix) -> None:
        shape = (1, self.kv_heads, prefix.length, self.head_dim)
        if len(prefix.past) != self.num_layers or any(k.shape != shape or v.shape != shape for k, v in prefix.past):
            raise TtfscError(f"the prefix cache does not fit this model ({len(prefix.past)} layers of "
                             f"{prefix.past[0][0].shape if prefix.past else ()}, model needs {self.num_layers} of {shape}); "
                             f"delete the stale {PREFIX_FILE} or re-run `ttfsc quantize`.")

    def prefix_cost(self) -> dict[str, int]:
        """What the prefix costs per sequence: its tokens and the bytes of its KV cache."""
        p = self.prefix
        return {"tokens": p.length if p else 0, "kv_bytes": p.kv_bytes if p else 0}

    def compute_prefix(self, ids: Sequence[int]) -> Prefix:
        """The KV cache and last logits of ``ids`` run by this (float) model from an empty cache."""
        logits, present = self.forward(np.asarray([list(ids)], dtype=np.int64), self.empty_past())
        return Prefix(tuple(int(t) for t in ids), present, logits[0, -1].astype(np.float32))

    def strip_bos(self, ids: Sequence[int]) -> list[int]:
        """``ids`` without a leading token the prefix already starts with (BOS), to avoid a double BOS."""
        ids = list(ids)
        return ids[1:] if self.prefix is not None and ids and ids[0] == self.prefix.ids[0] else ids

    def _cache_geometry(self, inputs: dict) -> tuple[int, int, np.dtype]:
        """(kv heads, head dim, dtype) from the first past input, else from config.json."""
        if not self.num_layers:
            return 0, 0, np.dtype(np.float32)
        arg = inputs["past_key_values.0.key"]
        dtype = np.dtype(_ORT_TYPES.get(arg.type, np.float32))
        shape = list(arg.shape)
        heads, dim = (shape[1], shape[3]) if len(shape) == 4 else (None, None)
        if not isinstance(heads, int):
            heads = self.config.get("num_key_value_heads") or self.config.get("num_attention_heads")
        if not isinstance(dim, int):
            dim = self.config.get("head_dim") or _config_head_dim(self.config)
        if not heads or not dim:
            raise TtfscError("cannot tell the KV-cache shape: graph inputs are symbolic and no config.json "
                             "is beside the model. Copy the exported config.json next to it.")
        return int(heads), int(dim), dtype

    # ------------------------------------------------------------ one step

    def empty_past(self, batch: int = 1) -> Past:
        """Zero-length cache: [batch, kv_heads, 0, head_dim] per layer."""
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.past_dtype)
        return [(z, z) for _ in range(self.num_layers)]

    def start_past(self, batch: int = 1) -> Past:
        """Where every sequence starts: the prefix's cache (repeated per batch row), else empty."""
        if self.prefix is None:
            return self.empty_past(batch)
        return [(np.repeat(k, batch, 0).astype(self.past_dtype), np.repeat(v, batch, 0).astype(self.past_dtype))
                for k, v in self.prefix.past]

    def feeds(self, input_ids: np.ndarray, past: Past | None = None) -> dict[str, np.ndarray]:
        """Graph inputs for ``input_ids`` [batch, seq] (or [seq]) after ``past`` (the prefix if None)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        batch, seq = ids.shape
        past = past if past is not None else self.start_past(batch)
        past_len = past[0][0].shape[2] if past else 0
        feeds = {"input_ids": ids}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((batch, past_len + seq), dtype=np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
        return feeds

    def forward(self, input_ids: np.ndarray, past: Past | None = None) -> tuple[np.ndarray, Past]:
        """Run the graph on ``input_ids`` [batch, seq] after ``past`` (the prefix if None); return (logits, present).

        The logits are those of ``input_ids`` only; ``present`` includes the prefix.
        """
        outs = dict(zip(self.output_names, self.session.run(self.output_names, self.feeds(input_ids, past))))
        present = [(outs[f"present.{i}.key"], outs[f"present.{i}.value"]) for i in range(self.num_layers)]
        return outs["logits"], present

    def logits(self, input_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits of a whole sequence after the prefix, if any ([seq, vocab] for 1-D input), for perplexity."""
        ids = np.asarray(input_ids, dtype=np.int64)
        out, _ = self.forward(ids, None)
        return out[0] if ids.ndim == 1 else out

    # ------------------------------------------------------------ the loop

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                 stop_ids: Iterable[int] | None = None) -> list[int]:
        """New tokens after ``prompt_ids`` (the stop token itself is not returned).

        Greedy when ``temperature == 0``; otherwise nucleus sampling with a seeded numpy RNG so
        runs are reproducible. ``stop_ids`` defaults to config.json's eos_token_id. With a prefix,
        a leading BOS it already holds is dropped and the prompt may be empty.
        """
        check_sampling(max_new_tokens, temperature, top_p)
        prompt = self.strip_bos(prompt_ids)
        if not prompt and self.prefix is None:
            raise TtfscError("empty prompt: pass at least the BOS token.")
        if max_new_tokens == 0:
            return []
        self.check_prompt(len(prompt))
        stops = frozenset(stop_ids) if stop_ids is not None else self.stop_ids
        rng = np.random.default_rng(seed)
        limit = self._token_limit(len(prompt), max_new_tokens)
        if prompt:
            logits, past = self.forward(np.asarray([prompt], dtype=np.int64), None)
            last = logits[0, -1]
        else:
            last, past = self.prefix.last_logits, self.start_past()
        out: list[int] = []
        while len(out) < limit:
            token = pick_token(last, temperature, top_p, rng)
            if stop_at_eos and token in stops:
                break
            out.append(token)
            if len(out) == limit:
                break
            logits, past = self.forward(np.asarray([[token]], dtype=np.int64), past)
            last = logits[0, -1]
        return out

    def prompt_room(self) -> int | None:
        """Prompt tokens (after the prefix) that still leave room for one new token; None: no limit known."""
        if not self.max_positions:
            return None
        return int(self.max_positions) - self.prefix_cost()["tokens"] - 1

    def check_prompt(self, prompt_len: int, what: str = "the prompt") -> None:
        """TtfscError when a prompt of ``prompt_len`` tokens leaves no room in the context to generate.

        The policy is to refuse, not to truncate: a prompt past the context used to generate
        nothing and exit 0, and a very long one ran onnxruntime out of memory, neither saying why;
        silently cutting the user's text would hide the same fact. Generation itself stops where
        the context ends (``_token_limit``).
        """
        room = self.prompt_room()
        if room is not None and prompt_len > room:
            held = self.prefix_cost()["tokens"]
            by_prefix = f", {held} of them held by the quantizer's prefix" if held else ""
            raise TtfscError(f"{what} is {prompt_len} tokens but the model's context is {self.max_positions} "
                             f"tokens (max_position_embeddings in config.json{by_prefix}); shorten it to at most "
                             f"{max(room, 0)} tokens.")

    def _token_limit(self, prompt_len: int, max_new_tokens: int) -> int:
        """Never run past the model's context length (the prefix takes its share)."""
        if self.max_positions:
            used = prompt_len + self.prefix_cost()["tokens"]
            return max(0, min(max_new_tokens, int(self.max_positions) - used))
        return max(0, max_new_tokens)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """TtfscError for settings that used to be accepted and give nonsense (named as ``ttfsc run``'s flags).

    A negative token count generated nothing, a negative temperature was taken as greedy, and top-p 0
    kept only the likeliest token; NaN passes every ``<`` test, so the checks are written to fail it.
    """
    if max_new_tokens < 0:
        raise TtfscError(f"--max-new-tokens {max_new_tokens}: give 0 or more tokens to generate.")
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise TtfscError(f"--temperature {temperature}: give 0 (greedy) or a positive temperature such as 0.8.")
    if not 0.0 < top_p <= 1.0:
        raise TtfscError(f"--top-p {top_p}: give a probability in (0, 1], e.g. 0.9; 1 keeps every token.")


def pick_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """argmax for temperature 0, else a sample from the top-p nucleus of softmax(logits/T)."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


# ---------------------------------------------------------------- helpers

def _read_config(model_dir: str | Path | None) -> dict:
    if model_dir is None:
        return {}
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def format_ids(ids: Sequence[int]) -> str:
    """Token ids as the metadata value ``ttfsc.prefix`` stores them: "1,198"."""
    return ",".join(str(int(t)) for t in ids)


def _metadata(session: Any) -> dict[str, str]:
    """The model's metadata_props, or {} for session stand-ins that have none."""
    try:
        return dict(session.get_modelmeta().custom_metadata_map)
    except AttributeError:
        return {}


def _config_head_dim(config: dict) -> int | None:
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if hidden and heads else None


def _count_layers(inputs: dict) -> int:
    layers = {int(m.group(1)) for name in inputs if (m := _PAST.match(name))}
    if layers and layers != set(range(len(layers))):
        raise TtfscError(f"model's past_key_values inputs skip layers ({sorted(layers)}).")
    return len(layers)


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in x] if isinstance(x, (list, tuple)) else [int(x)]


def open_model_session(path: str | Path) -> Any:
    """A session for a plain or spiking model (runtime.session lowers TTFS ops when present)."""
    p = Path(path)
    if not p.is_file():
        raise TtfscError(f"{p}: no such model file. Give the path of an .onnx model.")
    try:
        from ttfsc.runtime.session import open_session
    except ImportError:
        import onnxruntime as ort
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    return open_session(p)


def _out_of_memory(exc: Exception, model: str, prompt_len: int) -> Exception:
    """onnxruntime's failure to allocate, as the one line a user can act on; any other error as it was.

    Without config.json the context is unknown, so a very long prompt reaches onnxruntime, whose
    attention then asks for more memory than there is.
    """
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if type(exc).__module__.startswith("onnxruntime") and ("alloc" in text.lower() or "memory" in text.lower()):
        return TtfscError(f"{model}: onnxruntime ran out of memory on a prompt of {prompt_len} tokens ({text}); "
                          "give a shorter --prompt or fewer --max-new-tokens.")
    return exc


def run_cli(args: argparse.Namespace) -> int:
    """``ttfsc run``: encode the prompt with BOS, generate, print prompt + continuation."""
    from ttfsc.runtime.tokenizer import load_tokenizer
    check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    tok = load_tokenizer(args.model)
    gen = Generator(open_model_session(args.model), Path(args.model).parent)
    prompt = tok.encode(args.prompt, bos=True)
    if not prompt:
        raise TtfscError(f"{args.model}: the tokenizer has no BOS token; give a non-empty --prompt.")
    if args.max_new_tokens:
        gen.check_prompt(len(gen.strip_bos(prompt)), f"--prompt ({len(args.prompt)} characters)")
    t0 = time.perf_counter()
    try:
        new = gen.generate(prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                           stop_ids=set(tok.stop_ids) | gen.stop_ids)
    except Exception as exc:  # noqa: BLE001 - only onnxruntime's out-of-memory becomes a user error
        raise _out_of_memory(exc, args.model, len(prompt)) from None
    dt = time.perf_counter() - t0
    print(tok.decode(prompt + new))
    if getattr(args, "stats", False):
        rate = len(new) / dt if dt > 0 else float("inf")
        print(f"{len(new)} tokens in {dt:.2f} s ({rate:.1f} tok/s)", file=sys.stderr)
        cost = gen.prefix_cost()
        if cost["tokens"]:
            print(f"prefix: {cost['tokens']} tokens, KV cache {cost['kv_bytes'] / 1024:.0f} KiB (float, computed once)",
                  file=sys.stderr)
    return 0
