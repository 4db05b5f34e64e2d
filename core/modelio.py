"""Model I/O that never holds all weights in memory.

Models are loaded without their external data. Tensor values are read one at a time
(memory-mapped from the external file), and saving streams every external tensor into the new
data file one by one. Output files are written to temporaries in the target folder and renamed
only on success, so a failed command leaves nothing half-written behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from ttfsc.errors import TtfscError

INLINE_LIMIT = 1024  # bytes; larger tensors go to the external data file on save


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load the graph only (external weights stay on disk); clear errors for bad files."""
    p = Path(path)
    if not p.exists():
        raise TtfscError(f"{p}: no such file. Give the path of an .onnx model.")
    if p.is_dir():
        raise TtfscError(f"{p}: is a folder. Give the path of an .onnx model file inside it.")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as exc:
        raise TtfscError(f"{p}: not a valid ONNX model ({exc.__class__.__name__}). "
                         "Export one with `ttfsc export`.") from None
    if not model.graph.node:
        raise TtfscError(f"{p}: not a valid ONNX model (no graph nodes). Export one with `ttfsc export`.")
    set_model_dir(model, p.parent.resolve())
    return model


DIR_KEY = "ttfsc.source_dir"  # in-memory only: stripped before any save


def set_model_dir(model: onnx.ModelProto, directory: str | os.PathLike) -> None:
    """Remember where the model's external data lives (protobuf messages take no attributes)."""
    _pop_dir(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = DIR_KEY, str(directory)


def _pop_dir(model: onnx.ModelProto) -> str | None:
    for i, e in enumerate(model.metadata_props):
        if e.key == DIR_KEY:
            value = e.value
            del model.metadata_props[i]
            return value
    return None


def model_dir(model: onnx.ModelProto) -> str:
    for e in model.metadata_props:
        if e.key == DIR_KEY:
            return e.value
    return "."


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def tensor_value(t: TensorProto, base_dir: str) -> np.ndarray:
    """The tensor's array; an external tensor is memory-mapped, not read into RAM."""
    if not _is_external(t):
        return numpy_helper.to_array(t)
    info = _external_info(t)
    path = os.path.join(base_dir, info["location"])
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    offset = int(info.get("offset", 0))
    shape = tuple(t.dims)
    count = int(np.prod(shape)) if shape else 1
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(shape)


class Initializers:
    """Name -> TensorProto index of a graph, with value access that respects external data."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.base_dir = model_dir(model)
        self.by_name = {t.name: t for t in model.graph.initializer}

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def value(self, name: str) -> np.ndarray:
        return tensor_value(self.by_name[name], self.base_dir)

    def add(self, array: np.ndarray, name: str) -> str:
        t = numpy_helper.from_array(np.asarray(array), name)
        self.model.graph.initializer.append(t)
        self.by_name[name] = t
        return name


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike) -> Iterator[list[str]]:
    """Yield temporary paths next to each target; rename all on success, delete all on failure."""
    tmps = []
    for p in paths:
        p = Path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        os.close(fd)
        tmps.append(tmp)
    try:
        yield tmps
    except BaseException:
        for t in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(t)
        raise
    mode = 0o666 & ~_umask()
    for t, p in zip(tmps, paths):
        os.chmod(t, mode)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(t, p)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def data_file_name(out_path: str | os.PathLike) -> str:
    return Path(out_path).name + ".data"


def save_model(model: onnx.ModelProto, out_path: str | os.PathLike, new_tensors: dict | None = None) -> None:
    """Write ``model`` to ``out_path`` and its large tensors to ``<out>.data``, atomically.

    External tensors of the source are copied chunk by chunk from their files; in-memory tensors
    above INLINE_LIMIT bytes are moved out as well, so the .onnx stays small and any model size
    works (the 2 GB protobuf limit never applies).
    """
    out_path = Path(out_path)
    src_dir = model_dir(model)
    data_name = data_file_name(out_path)
    with atomic_outputs(out_path, out_path.parent / data_name) as (tmp_model, tmp_data):
        offset = 0
        with open(tmp_data, "wb") as data:
            for t in _all_tensors(model):
                raw = _tensor_bytes(t, src_dir)
                if raw is None:
                    continue
                pad = (-offset) % 64
                data.write(b"\0" * pad)
                offset += pad
                length = _copy_into(raw, data)
                _set_external(t, data_name, offset, length)
                offset += length
        has_data = offset > 0
        _write_proto(model, tmp_model)
    if not has_data:
        os.unlink(out_path.parent / data_name)
    set_model_dir(model, out_path.parent.resolve())


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.ByteSize() > INLINE_LIMIT:
                yield a.t


def _tensor_bytes(t: TensorProto, src_dir: str):
    """What to copy for tensor t: a (file, offset, length) for external, bytes for large inline."""
    if _is_external(t):
        info = _external_info(t)
        return (os.path.join(src_dir, info["location"]), int(info.get("offset", 0)), int(info["length"]))
    if t.ByteSize() <= INLINE_LIMIT:
        return None
    arr = numpy_helper.to_array(t)
    return np.ascontiguousarray(arr).tobytes()


def _copy_into(raw, out) -> int:
    if isinstance(raw, bytes):
        out.write(raw)
        return len(raw)
    path, offset, length = raw
    with open(path, "rb") as src:
        src.seek(offset)
        remaining = length
        while remaining:
            chunk = src.read(min(remaining, 64 << 20))
            if not chunk:
                raise TtfscError(f"{path}: external data ends early; the model's data file is truncated.")
            out.write(chunk)
            remaining -= len(chunk)
    return length


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def serialize(model: onnx.ModelProto) -> bytes:
    """Bytes of the model without ttfsc's in-memory bookkeeping."""
    directory = _pop_dir(model)
    try:
        return model.SerializeToString()
    finally:
        if directory is not None:
            set_model_dir(model, directory)


def _write_proto(model: onnx.ModelProto, path: str) -> None:
    with open(path, "wb") as f:
        f.write(serialize(model))


class SpillFile:
    """A temporary file that receives transformed weights one at a time, deleted on close.

    Tensors in it are referenced by absolute path; ``save_model`` then streams them into the
    output's data file like any other external tensor, so a transform (quantize, rotate) never
    holds all new weights in memory.
    """

    def __init__(self, folder: Path, tag: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix=f".ttfsc-{tag}.", suffix=".tmp", dir=folder)
        self.file = os.fdopen(fd, "wb")
        self.offset = 0

    @classmethod
    def beside(cls, out_path: str | os.PathLike, tag: str) -> "SpillFile":
        """A spill file in the folder ``out_path`` will be written to (created if needed).

        Use it as ``with SpillFile.beside(out, tag) as spill:``: it is deleted however the block ends,
        after the ``save_model`` inside the block has streamed its tensors into the output.
        """
        return cls(Path(out_path).resolve().parent, tag)

    def __enter__(self) -> "SpillFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def begin(self) -> int:
        """Align and return where the next tensor starts."""
        pad = (-self.offset) % 64
        self.file.write(b"\0" * pad)
        self.offset += pad
        return self.offset

    def write(self, chunk: np.ndarray) -> None:
        raw = np.ascontiguousarray(chunk).tobytes()
        self.file.write(raw)
        self.offset += len(raw)

    def tensor(self, name: str, dtype: int, dims, start: int) -> TensorProto:
        """The external TensorProto for what was written since ``start``."""
        self.file.flush()
        t = TensorProto(name=name, data_type=dtype, dims=list(dims))
        _set_external(t, os.path.abspath(self.path), start, self.offset - start)
        return t

    def put(self, name: str, array: np.ndarray) -> TensorProto:
        start = self.begin()
        self.write(array)
        return self.tensor(name, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype), np.shape(array), start)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# Tokenizer/config files that travel with a model (never weights).
SIDECAR_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                 "added_tokens.json", "chat_template.jinja", "tokenizer.bin",
                 "prefix.npz")  # prefix.npz: the float KV cache of quantize's outlier-token prefix


def copy_sidecars(src_dir: str, out_dir: str) -> None:
    """Carry the tokenizer and config files next to a derived model, so later commands find them."""
    for name in SIDECAR_NAMES:
        src = os.path.join(src_dir, name)
        dst = os.path.join(out_dir, name)
        if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(dst) and not os.path.exists(dst):
            shutil.copy2(src, dst)
