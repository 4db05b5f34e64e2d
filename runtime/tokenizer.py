"""Tokenizers found beside an exported model.

``ttfsc export`` saves the tokenizer next to ``model.onnx``; every later command (quantize's
self-generated calibration text, verify --text, run) calls :func:`load_tokenizer` on the model
path and gets one small interface: ``encode(text, bos=True)``, ``decode(ids)``, ``bos_id``,
``eos_id`` and ``stop_ids`` (tokens that end generation). Text files the user gives to be
tokenized (verify --text, --calib, eval's corpora and tasks) are read by :func:`read_text_file`.

Two kinds exist: a Hugging Face tokenizer (folder with tokenizer.json / tokenizer_config.json)
and llama2.c's ``tokenizer.bin``, re-implemented here so that llama2.c models need no
sentencepiece model and encode exactly as llama2.c's run.c does.
"""
from __future__ import annotations

import heapq
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Protocol

from ttfsc.errors import TtfscError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
LLAMA2C_FILE = "tokenizer.bin"
_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")  # not text: C0 controls but \t \n \v \f \r, and DEL
BINARY_SHARE = 0.1  # a text with more control characters than this is binary (real texts have ~0)


class Tokenizer(Protocol):
    """What the rest of ttfsc needs from a tokenizer."""

    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]

    def encode(self, text: str, bos: bool = True) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


# ---------------------------------------------------------------- text files

def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The text of the UTF-8 file ``path`` that the user gave as ``what``, newlines as "\\n".

    ``what`` names the argument in messages: "--text" reads "--text story.txt: ...", and one
    ending in "=" ("--ppl wiki=") is joined to the path as the user wrote it.

    Why strict: reading with errors="replace" turned a Latin-1 or binary file into replacement
    characters that tokenize into nonsense without a word, and a plain read raised a decoding error
    the CLI could only call internal. Each fault is one TtfscError naming the file and the fix.
    Newlines are translated as text mode does ("\\r\\n" and "\\r" to "\\n"), so a valid file reads
    exactly as before.
    """
    p = Path(path)
    name = f"{what}{p}" if what.endswith("=") else f"{what} {p}"
    if not p.is_file():
        raise TtfscError(f"{name}: no such file. Give the path of a plain-text (UTF-8) file.")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise TtfscError(f"{name}: cannot read it ({exc.strerror}); check its permissions.") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise TtfscError(f"{name}: a binary file (NUL byte at offset {nul}), not text; give a plain-text UTF-8 file.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TtfscError(f"{name}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         f"convert it, e.g. `iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8{p.suffix}`.") from None
    controls = len(_CONTROL.findall(text))
    if controls > BINARY_SHARE * len(text):
        raise TtfscError(f"{name}: looks binary ({controls} of {len(text)} characters are control characters), "
                         "not text; give a plain-text UTF-8 file.")
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------- discovery

def load_tokenizer(model_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer saved beside an .onnx model (or inside a folder); TtfscError if none."""
    p = Path(model_path)
    folder = p if p.is_dir() else p.parent
    marker = _config_marker(folder)
    if marker and (folder / marker).is_file():
        return Llama2cTokenizer(folder / marker)
    if any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
        return HFTokenizer(folder)
    if (folder / LLAMA2C_FILE).is_file():
        return Llama2cTokenizer(folder / LLAMA2C_FILE)
    raise TtfscError(f"{folder}: no tokenizer beside the model (tokenizer.json, tokenizer_config.json or "
                     "tokenizer.bin). Re-export with `ttfsc export`, or copy the tokenizer files there.")


def _config_marker(folder: Path) -> str | None:
    """config.json's ``ttfsc_tokenizer`` entry, written by the llama2.c export."""
    try:
        return json.loads((folder / "config.json").read_text()).get("ttfsc_tokenizer")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------- Hugging Face

class HFTokenizer:
    """Adapter over a transformers tokenizer; BOS is added explicitly so both kinds behave alike."""

    def __init__(self, folder: str | os.PathLike):
        from transformers import AutoTokenizer
        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
            raise TtfscError(f"{folder}: cannot load the tokenizer ({exc.__class__.__name__}: {exc}). "
                             "Re-export the model with `ttfsc export`.") from None
        self.bos_id = self.hf.bos_token_id
        self.eos_id = self.hf.eos_token_id
        self.stop_ids = frozenset(i for i in (self.eos_id,) if i is not None)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = list(self.hf.encode(text, add_special_tokens=False))
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


# ---------------------------------------------------------------- llama2.c

def read_llama2c_vocab(path: str | os.PathLike) -> tuple[list[bytes], list[float]]:
    """Pieces and scores of a tokenizer.bin: int32 max_len, then (f32 score, i32 len, bytes)*."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise TtfscError(f"{path}: too short for a llama2.c tokenizer.bin.")
    pieces, scores, off = [], [], 4
    while off < len(data):
        if off + 8 > len(data):
            raise TtfscError(f"{path}: truncated llama2.c tokenizer (entry {len(pieces)}).")
        score, n = struct.unpack_from("<fi", data, off)
        off += 8
        if n < 0 or off + n > len(data):
            raise TtfscError(f"{path}: corrupt llama2.c tokenizer (entry {len(pieces)} length {n}).")
        pieces.append(data[off:off + n])
        scores.append(score)
        off += n
    return pieces, scores


def write_llama2c_vocab(path: str | os.PathLike, pieces: list[bytes], scores: list[float]) -> None:
    """Inverse of :func:`read_llama2c_vocab` (tests and tools build tiny tokenizers with it)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max((len(p) for p in pieces), default=0)))
        for piece, score in zip(pieces, scores):
            f.write(struct.pack("<fi", score, len(piece)) + piece)


class Llama2cTokenizer:
    """llama2.c's BPE: byte-fallback ids 3..258, highest-score pair merged first (run.c encode)."""

    bos_id = 1
    eos_id = 2

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.pieces, self.scores = read_llama2c_vocab(self.path)
        self.lookup: dict[bytes, int] = {}
        for i, piece in enumerate(self.pieces):
            self.lookup.setdefault(piece, i)
        # run.c stops generating when the model emits BOS (it marks a new story).
        self.stop_ids = frozenset((self.bos_id, self.eos_id))

    def __len__(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.initial_ids(text)
        ids = self._merge(ids)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def initial_ids(self, text: str) -> list[int]:
        """Dummy-space prefix, then one id per UTF-8 character (or per byte when unknown)."""
        if not text:
            return []
        ids = [self.lookup[b" "]] if b" " in self.lookup else []
        for ch in text:
            raw = ch.encode("utf-8")
            if raw in self.lookup:
                ids.append(self.lookup[raw])
            else:
                ids.extend(b + 3 for b in raw)
        return ids

    def _pair(self, ids: list[int], i: int, j: int) -> tuple[float, int, int, int, int, int] | None:
        """Heap entry for merging positions i and j, or None if the merge is not in the vocab."""
        merged = self.lookup.get(self.pieces[ids[i]] + self.pieces[ids[j]])
        if merged is None:
            return None
        return (-self.scores[merged], i, j, ids[i], ids[j], merged)

    def _merge(self, ids: list[int]) -> list[int]:
        """Repeatedly merge the best-scoring adjacent pair (leftmost on ties), as run.c does.

        A heap with lazy invalidation gives run.c's result in O(n log n) instead of O(n^2), so
        long calibration texts encode quickly.
        """
        ids = list(ids)
        n = len(ids)
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        alive = [True] * n
        heap = [e for i in range(n - 1) if (e := self._pair(ids, i, i + 1)) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, j, left, right, merged = heapq.heappop(heap)
            if not (alive[i] and alive[j] and nxt[i] == j and ids[i] == left and ids[j] == right):
                continue
            ids[i], alive[j] = merged, False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            for a, b in ((prv[i], i), (i, nxt[i])):
                if 0 <= a and b < n and (e := self._pair(ids, a, b)) is not None:
                    heapq.heappush(heap, e)
        return [t for t, ok in zip(ids, alive) if ok]

    def piece_bytes(self, token: int, prev: int | None) -> bytes:
        """run.c decode: drop the leading space after BOS; ``<0xHH>`` pieces are raw bytes."""
        piece = self.pieces[token]
        if prev == self.bos_id and piece.startswith(b" "):
            piece = piece[1:]
        m = _BYTE_PIECE.match(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    def decode(self, ids: Iterable[int]) -> str:
        out, prev = bytearray(), None
        for t in ids:
            t = int(t)
            if t not in (self.bos_id, self.eos_id):
                out += self.piece_bytes(t, prev)
            prev = t
        return out.decode("utf-8", errors="replace")
