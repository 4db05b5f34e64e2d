"""Model I/O that never holds all weights in memory.

Models are loaded without their external data. Tensor values are read one at a time
(memory-mapped from the external file), and saving streams every external tensor into the new
data file one by one. Output files are staged in the target folder and moved in only when the
command succeeds (``ttfsc.transaction``), so a failed command leaves nothing half-written behind.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from ttfsc.errors import TtfscError
from ttfsc.transaction import current as current_transaction
from ttfsc.transaction import output_block, same_file, work_folder, writing

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
    check_tensors(model, p)
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


# ---------------------------------------------------------------- external data is untrusted input

FIX_DATA = "re-export the model, or copy its .data file beside it"
CORRUPT = "the model file is corrupt: re-export it"
_SUB_BYTE_BITS = {getattr(TensorProto, n): bits for n, bits in
                  (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(TensorProto, n)}
_OWN_FILES: set[str] = set()  # real paths of live SpillFiles: the only absolute locations ttfsc reads


@dataclass(frozen=True)
class Extent:
    """Where an external tensor's bytes lie, once checked: a regular file inside the model's folder
    (or one of this process's spill files), ``offset + length`` within it, ``length`` the tensor's size."""

    path: str
    offset: int
    length: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise TtfscError(f"{self.path}: external data ends early (truncated); {FIX_DATA}.")
        return data


def check_tensors(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Refuse a model with a malformed tensor or external data outside its folder, before any weight is read.

    A model file is untrusted input: an external ``location`` can name ``../../etc/passwd``, an
    absolute path or a symlink out of the folder, and offset/length can point past the file or
    disagree with the shape. onnxruntime refuses such models; ttfsc must not copy those bytes into
    an output either. Every tensor is checked (initializers, Constant values, subgraphs, functions),
    so any later read of the model, by ttfsc or by onnxruntime, only meets checked entries.
    """
    base_dir = str(Path(path).parent.resolve())
    files: dict[str, tuple[str, int]] = {}
    for t, what in model_tensors(model):
        if _is_external(t):
            external_extent(t, base_dir, f"{path}: {what}", files)
        elif any(d < 0 for d in t.dims):
            raise TtfscError(f"{path}: {what} has a negative dimension in its shape {list(t.dims)}; {CORRUPT}.")


def model_tensors(model: onnx.ModelProto) -> Iterator[tuple[TensorProto, str]]:
    """Every TensorProto of the model, with words naming it: wherever external data may appear."""
    yield from _graph_tensors(model.graph)
    for f in model.functions:
        for a in f.attribute_proto:
            yield from _attribute_tensors(a, f"function '{f.name}'")
        for node in f.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[TensorProto, str]]:
    for t in graph.initializer:
        yield t, f"tensor '{t.name}'"
    for s in graph.sparse_initializer:
        yield s.values, f"sparse tensor '{s.values.name}' (values)"
        yield s.indices, f"sparse tensor '{s.values.name}' (indices)"
    for node in graph.node:
        for a in node.attribute:  # _node_tensors inlined: this loop sees every node of the model
            if a.type not in _PLAIN_ATTRIBUTES or _holds_tensors(a):
                yield from _attribute_tensors(a, f"node '{node.name or node.op_type}'")


def _node_tensors(node: onnx.NodeProto) -> Iterator[tuple[TensorProto, str]]:
    for a in node.attribute:
        if a.type not in _PLAIN_ATTRIBUTES or _holds_tensors(a):  # the owner's name is built only when needed
            yield from _attribute_tensors(a, f"node '{node.name or node.op_type}'")


_PLAIN_ATTRIBUTES = {onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING,
                     onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRINGS}


def _holds_tensors(a: onnx.AttributeProto) -> bool:
    """A plain attribute can still carry tensor fields (a crafted model can lie about its type)."""
    return (a.HasField("t") or a.HasField("g") or a.HasField("sparse_tensor")
            or bool(a.tensors) or bool(a.graphs) or bool(a.sparse_tensors))


def _attribute_tensors(a: onnx.AttributeProto, owner: str) -> Iterator[tuple[TensorProto, str]]:
    """Tensors of one attribute, whatever its declared type says."""
    what = f"attribute '{a.name}' of {owner}"
    if a.HasField("t"):
        yield a.t, f"tensor '{a.t.name}' in {what}" if a.t.name else f"the tensor in {what}"
    for t in a.tensors:
        yield t, f"tensor '{t.name}' in {what}"
    sparse = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
    for s in sparse:
        yield s.values, f"the sparse tensor in {what} (values)"
        yield s.indices, f"the sparse tensor in {what} (indices)"
    for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
        yield from _graph_tensors(g)


def external_extent(t: TensorProto, base_dir: str | None, where: str | None = None,
                    files: dict[str, tuple[str, int]] | None = None) -> Extent:
    """The checked extent of an external tensor: every read of external bytes goes through here.

    ``where`` starts each message (default: the folder and the tensor's name); ``files`` caches
    (real path, size) per relative location over the reads of one model, so a data file is
    resolved once, not once per weight.
    """
    where = where or f"{base_dir or 'a graph with no model folder'}: tensor '{t.name}'"
    info = _checked_info(t, where)
    nbytes = _byte_size(t, where)
    offset = _count(info.get("offset", "0"), "offset", where)
    length = _count(info["length"], "length", where) if "length" in info else nbytes
    if length != nbytes:
        raise TtfscError(f"{where} of shape {list(t.dims)} needs {nbytes} bytes but its external data says "
                         f"length {length}; {CORRUPT}.")
    location = info["location"]
    found = files.get(location) if files is not None else None
    if found is None:
        found = _locate(location, base_dir, where)
        if files is not None and not os.path.isabs(location):  # a spill file (absolute) still grows
            files[location] = found
    path, size = found
    if offset + length > size:
        raise TtfscError(f"{where} needs bytes {offset}..{offset + length} of {path}, which has only {size} "
                         f"(truncated or not its data file); {FIX_DATA}.")
    return Extent(path, offset, length)


def _checked_info(t: TensorProto, where: str) -> dict[str, str]:
    info: dict[str, str] = {}
    for e in t.external_data:
        if e.key in info:  # readers disagree on which entry wins: refuse rather than guess
            raise TtfscError(f"{where} lists its external data key '{e.key}' twice; {CORRUPT}.")
        info[e.key] = e.value
    if not info.get("location"):
        raise TtfscError(f"{where} is marked external but names no data file; {CORRUPT}.")
    return info


def _count(value: str, key: str, where: str) -> int:
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise TtfscError(f"{where} has external data {key} '{value[:40]}', not a non-negative integer; {CORRUPT}.")
    return int(value)


def _byte_size(t: TensorProto, where: str) -> int:
    """Bytes the tensor's shape and type need (what its external length must say)."""
    if any(d < 0 for d in t.dims):
        raise TtfscError(f"{where} has a negative dimension in its shape {list(t.dims)}; {CORRUPT}.")
    count = math.prod(t.dims)
    if t.data_type in _SUB_BYTE_BITS:
        return (count * _SUB_BYTE_BITS[t.data_type] + 7) // 8
    itemsize = _itemsize(t.data_type)
    if not itemsize:  # strings (and unknown types) have no fixed size: ONNX stores none externally
        raise TtfscError(f"{where} stores data type {t.data_type} externally, which ONNX does not allow; {CORRUPT}.")
    return count * itemsize


@functools.cache
def _itemsize(data_type: int) -> int:
    """Bytes per element of an ONNX data type; 0 for strings and unknown types."""
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    except (KeyError, ValueError):
        return 0
    return 0 if dtype == np.dtype(object) else dtype.itemsize


def _locate(location: str, base_dir: str | None, where: str) -> tuple[str, int]:
    """(real path, size) of a data file, which must be a regular file inside ``base_dir``."""
    if "\0" in location:
        raise TtfscError(f"{where} names an external data file with a NUL byte; {CORRUPT}.")
    if os.path.isabs(location) or location.startswith("\\"):
        real = os.path.realpath(location)
        if real not in _OWN_FILES:
            raise TtfscError(f"{where} names external data by the absolute path '{location}'; ttfsc reads data "
                             f"only from files inside the model's folder: {FIX_DATA}.")
        return real, os.path.getsize(real)
    if ".." in re.split(r"[\\/]", location):
        raise TtfscError(f"{where} names external data at '{location}', outside the model's folder; ttfsc reads "
                         f"data only from files inside it: {FIX_DATA}.")
    if base_dir is None:
        raise TtfscError(f"{where} keeps its value in external data, and no model folder is known here; "
                         "store the value inline (onnx.save without save_as_external_data).")
    root = os.path.realpath(base_dir)
    real = os.path.realpath(os.path.join(root, location))
    if os.path.commonpath([root, real]) != root:
        raise TtfscError(f"{where} names external data at '{location}', a link that leads outside the model's "
                         f"folder {root}; ttfsc reads data only from files inside it: {FIX_DATA}.")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise TtfscError(f"{where} reads its data from {real}, which does not exist; {FIX_DATA}.") from None
    except OSError as exc:
        raise TtfscError(f"{where} reads its data from {real}, which cannot be read ({exc.strerror}); "
                         f"{FIX_DATA}.") from None
    if not stat.S_ISREG(st.st_mode):
        raise TtfscError(f"{where} reads its data from {real}, which is not a regular file; {FIX_DATA}.")
    return real, st.st_size


def tensor_value(t: TensorProto, base_dir: str | None, files: dict[str, tuple[str, int]] | None = None) -> np.ndarray:
    """The tensor's array; an external tensor is memory-mapped, not read into RAM.

    Its bytes are located by ``external_extent``, so nothing outside ``base_dir`` is ever read;
    ``base_dir=None`` (a graph whose model folder is unknown) refuses external tensors. ``files``:
    see ``external_extent``.
    """
    if not _is_external(t):
        return numpy_helper.to_array(t)
    extent = external_extent(t, base_dir, files=files)
    shape = tuple(t.dims)
    if t.data_type in _SUB_BYTE_BITS:  # packed: numpy_helper unpacks them from raw bytes
        inline = TensorProto(name=t.name, data_type=t.data_type, dims=shape, raw_data=extent.read())
        return numpy_helper.to_array(inline)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    count = math.prod(shape)
    if count == 0:  # mmap cannot map zero bytes
        return np.empty(shape, dtype=dtype)
    return np.memmap(extent.path, dtype=dtype, mode="r", offset=extent.offset, shape=(count,)).reshape(shape)


class Initializers:
    """Name -> TensorProto index of a graph, with value access that respects external data."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.base_dir = model_dir(model)
        self.by_name = {t.name: t for t in model.graph.initializer}
        self._files: dict[str, tuple[str, int]] = {}  # data files located once per index, not per weight

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def value(self, name: str) -> np.ndarray:
        return tensor_value(self.by_name[name], self.base_dir, self._files)

    def add(self, array: np.ndarray, name: str) -> str:
        t = numpy_helper.from_array(np.asarray(array), name)
        self.model.graph.initializer.append(t)
        self.by_name[name] = t
        return name


@contextlib.contextmanager
def atomic_outputs(*paths: str | os.PathLike) -> Iterator[list[str]]:
    """Yield the path to write each target to; the targets appear together when the command ends, or never.

    Inside a command's transaction (``ttfsc.transaction``) the files are staged and moved in with
    the command's other outputs; outside one (or in a scratch folder) when this block ends. A full
    disk is one clear error naming the file it was writing.
    """
    with output_block(paths[0]) as txn:
        tmps = [txn.stage(p) for p in paths]
        try:
            yield [str(t) for t in tmps]
        except OSError:
            with writing(_latest(paths, tmps)):
                raise


def _latest(targets: tuple, staged: list[Path]) -> str | os.PathLike:
    """The target whose staged file was written last: the one a failing write was writing."""
    times = [(t.stat().st_mtime_ns if t.exists() else -1, i) for i, t in enumerate(staged)]
    return targets[max(times)[1]]


def data_file_name(out_path: str | os.PathLike) -> str:
    return Path(out_path).name + ".data"


def save_model(model: onnx.ModelProto, out_path: str | os.PathLike, new_tensors: dict | None = None) -> None:
    """Write ``model`` to ``out_path`` and its large tensors to ``<out>.data``, as one output.

    External tensors of the source are copied chunk by chunk from their files; in-memory tensors
    above INLINE_LIMIT bytes are moved out as well, so the .onnx stays small and any model size
    works (the 2 GB protobuf limit never applies). The data file is staged first, so it is moved in
    before the model that names it; a model without large tensors removes a stale ``<out>.data``.
    """
    out_path = Path(out_path)
    src_dir = model_dir(model)
    data_name = data_file_name(out_path)
    data_path = out_path.parent / data_name
    with output_block(data_path) as txn:
        tmp_data, tmp_model = txn.stage(data_path), txn.stage(out_path)
        with writing(data_path):
            has_data = _write_data(model, src_dir, tmp_data, data_name)
        with writing(out_path):
            _write_proto(model, str(tmp_model))
        if not has_data:
            txn.remove(data_path)
    set_model_dir(model, out_path.parent.resolve())


def _write_data(model: onnx.ModelProto, src_dir: str, data_path: Path, data_name: str) -> bool:
    """Stream every large tensor into ``data_path`` (64-byte aligned); whether there was any."""
    offset = 0
    with open(data_path, "wb") as data:
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
    return offset > 0


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.ByteSize() > INLINE_LIMIT:
                yield a.t


def _tensor_bytes(t: TensorProto, src_dir: str):
    """What to copy for tensor t: a (file, offset, length) for external, bytes for large inline."""
    if _is_external(t):
        extent = external_extent(t, src_dir)
        return (extent.path, extent.offset, extent.length)
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
        self.folder = folder  # named when the disk fills up
        folder = work_folder(folder)  # inside a command: its stage folder, removed with it however the run ends
        fd, self.path = tempfile.mkstemp(prefix=f".ttfsc-{tag}.", suffix=".tmp", dir=folder)
        self.file = os.fdopen(fd, "wb")
        _OWN_FILES.add(os.path.realpath(self.path))  # its tensors' absolute locations are ttfsc's own
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
        with writing(self.folder, "temporary weights there"):
            self.file.write(b"\0" * pad)
        self.offset += pad
        return self.offset

    def write(self, chunk: np.ndarray) -> None:
        raw = np.ascontiguousarray(chunk).tobytes()
        with writing(self.folder, "temporary weights there"):
            self.file.write(raw)
        self.offset += len(raw)

    def tensor(self, name: str, dtype: int, dims, start: int) -> TensorProto:
        """The external TensorProto for what was written since ``start``."""
        with writing(self.folder, "temporary weights there"):
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
        _OWN_FILES.discard(os.path.realpath(self.path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# Tokenizer/config files that travel with a model (never weights).
SIDECAR_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                 "added_tokens.json", "chat_template.jinja", "tokenizer.bin",
                 "prefix.npz")  # prefix.npz: the float KV cache of quantize's outlier-token prefix


def copy_sidecars(src_dir: str, out_dir: str) -> None:
    """Carry the tokenizer and config files next to a derived model, so later commands find them.

    A file already there is kept (it may belong to another model in that folder; the same folder
    is a no-op), unless it is empty: no sidecar is valid empty, and a 0-byte config.json left by an
    older interrupted run would be trusted forever. The copies are outputs of the running command
    (``atomic_outputs``): they appear with the model, or not at all.
    """
    for name in SIDECAR_NAMES:
        src = os.path.join(src_dir, name)
        dst = os.path.join(out_dir, name)
        if os.path.isfile(src) and not same_file(src, dst) and not _sidecar_present(dst):
            with atomic_outputs(dst) as (tmp,):
                shutil.copy2(src, tmp)


def _sidecar_present(path: str) -> bool:
    """Already there for the model: staged by this command, or a non-empty file (or anything else) on disk."""
    txn = current_transaction()
    if txn is not None and txn.is_staged(path):
        return True
    return os.path.lexists(path) and not (os.path.isfile(path) and os.path.getsize(path) == 0)


def model_files(model: onnx.ModelProto, path: str | os.PathLike) -> dict[Path, str]:
    """The files a command reads with this model, ``{path: what it is}``: the model, its external data
    files and its sidecars but prefix.npz (which only a model declaring a prefix owns). An output
    must never overwrite one of them (``ttfsc.transaction.guard``)."""
    p = Path(path)
    files = {p: "the input model"}
    base = Path(model_dir(model))
    for t, _ in model_tensors(model):
        location = _external_info(t).get("location", "") if _is_external(t) else ""
        if location and not os.path.isabs(location):
            files.setdefault(base / location, "the input's data file")
    for name in SIDECAR_NAMES:
        if name != "prefix.npz" and (p.parent / name).is_file():
            files.setdefault(p.parent / name, f"the input's {name}")
    return files
