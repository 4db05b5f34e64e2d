"""Model files are untrusted input: external data stays inside the model's folder, checked before any read.

A crafted model can name ``../../etc/passwd``, an absolute path or a symlink out of its folder as
a tensor's data file, or give an offset/length past the file or at odds with the shape. Every
command that loads a model must refuse it with one ``ttfsc: error:`` line (exit 2) naming the
file, before reading a byte: the secret's bytes never reach any output, and nothing is written.
Missing and truncated data files get the same one line, with the fix.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP, helper as h, numpy_helper as nh

from ttfsc import modelio
from ttfsc.errors import TtfscError

sys.path.insert(0, str(Path(__file__).parent))
from graphs import quantized_linear_model  # noqa: E402

SECRET = b"TOPSECRET!" * 4096  # 40 KB: enough for any crafted tensor below to read it whole


# ---------------------------------------------------------------- crafting

def _save_external(model: onnx.ModelProto, path: Path) -> None:
    """Every tensor (and Constant attribute) in ``<path>.data``, as onnx.save writes external data.

    onnx.save turns the tensors it saves external in place, so it is given a copy.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0, convert_attribute=True)


def qdq_folder(root: Path) -> Path:
    """A 6-bit QDQ linear model (compiles with -T 64) saved with external data in ``root/m``."""
    folder = root / "m"
    folder.mkdir(parents=True)
    model, _ = quantized_linear_model(bits=6, I=64, O=48)
    _save_external(model, folder / "q.onnx")
    return folder / "q.onnx"


def _entries(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _set_entries(t: onnx.TensorProto, **entries: str) -> None:
    info = {**_entries(t), **entries}
    del t.external_data[:]
    for k, v in info.items():
        e = t.external_data.add()
        e.key, e.value = k, v


def _external_constant(name: str, location: str) -> onnx.TensorProto:
    t = TP(name=name, data_type=TP.FLOAT, dims=[4], data_location=TP.EXTERNAL)
    _set_entries(t, location=location, offset="0", length="16")
    return t


def _largest(model: onnx.ModelProto) -> onnx.TensorProto:
    external = [t for t in model.graph.initializer if t.data_location == TP.EXTERNAL]
    return max(external, key=lambda t: int(_entries(t)["length"]))


def craft(model_path: Path, case: str, secret: Path) -> None:
    """Edit the saved model at ``model_path`` into the hostile or broken ``case``."""
    folder = model_path.parent
    data = folder / (model_path.name + ".data")
    model = onnx.load(str(model_path), load_external_data=False)
    target = _largest(model)
    info = _entries(target)
    up = os.path.relpath(secret, folder)  # ../secret
    if case == "parent":
        _set_entries(target, location=up, offset="0")
    elif case == "deep_parent":  # the ../../../../etc/passwd form
        _set_entries(target, location="../" * 30 + str(secret).lstrip("/"), offset="0")
    elif case == "absolute":
        _set_entries(target, location=str(secret), offset="0")
    elif case == "symlink_file":
        (folder / "evil.data").symlink_to(secret)
        _set_entries(target, location="evil.data", offset="0")
    elif case == "symlink_dir":
        (folder / "up").symlink_to(secret.parent, target_is_directory=True)
        _set_entries(target, location=f"up/{secret.name}", offset="0")
    elif case == "offset_past_end":
        _set_entries(target, offset=str(data.stat().st_size))
    elif case == "negative_offset":
        _set_entries(target, offset="-64")
    elif case == "length_not_shape":
        _set_entries(target, length=str(int(info["length"]) - 1))
    elif case == "negative_dim":
        target.dims[0] = -target.dims[0]
    elif case == "truncated":
        with open(data, "r+b") as f:
            f.truncate(int(info["offset"]) + int(info["length"]) // 2)
    elif case == "missing":
        data.unlink()
    elif case in ("constant", "sparse_constant", "subgraph", "neuron_body"):
        _add_hostile_node(model, case, up)
    else:
        raise AssertionError(case)
    model_path.write_bytes(model.SerializeToString())


def _add_hostile_node(model: onnx.ModelProto, case: str, location: str) -> None:
    """A node whose tensor attribute (or a Constant in its subgraph) reads ``location``."""
    c = _external_constant("leak", location)
    if case == "constant":
        node = h.make_node("Constant", [], ["leak_out"], name="leak", value=c)
    elif case == "sparse_constant":
        indices = nh.from_array(np.arange(4, dtype=np.int64), "leak_idx")
        node = h.make_node("Constant", [], ["leak_out"], name="leak",
                           sparse_value=h.make_sparse_tensor(c, indices, [8]))
    else:
        body = h.make_graph([h.make_node("Constant", [], ["b"], name="leak", value=c)], "body", [],
                            [h.make_tensor_value_info("b", TP.FLOAT, [4])])
        if case == "subgraph":
            node = h.make_node("If", ["cond"], ["leak_out"], name="if_leak", then_branch=body, else_branch=body)
        else:
            node = h.make_node("TTFSNeuron", ["x"], ["leak_out"], name="neuron_leak", domain="ai.ttfsc", body=body)
    model.graph.node.append(node)


HOSTILE = ["parent", "deep_parent", "absolute", "symlink_file", "symlink_dir", "constant", "sparse_constant",
           "subgraph", "neuron_body"]
BROKEN = ["offset_past_end", "negative_offset", "length_not_shape", "negative_dim", "truncated", "missing"]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the model's folder that no command may read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "secret"
    path.write_bytes(SECRET)
    return path


# ---------------------------------------------------------------- in process: load_model and the reads

@pytest.mark.parametrize("case", HOSTILE + BROKEN)
def test_load_model_refuses(tmp_path: Path, secret: Path, case: str):
    src = qdq_folder(tmp_path)
    craft(src, case, secret)
    with pytest.raises(TtfscError) as err:
        modelio.load_model(src)
    msg = str(err.value)
    assert msg.startswith(f"{src}: ") and "\n" not in msg, msg
    assert "TOPSECRET" not in msg


def test_messages_say_what_to_do(tmp_path: Path, secret: Path):
    for case, needle in (("parent", "outside the model's folder"), ("absolute", "absolute path"),
                         ("symlink_file", "link that leads outside"), ("missing", "does not exist"),
                         ("truncated", "truncated"), ("length_not_shape", "needs")):
        src = qdq_folder(tmp_path / case)
        craft(src, case, secret)
        with pytest.raises(TtfscError) as err:
            modelio.load_model(src)
        msg = str(err.value)
        assert needle in msg and "tensor '" in msg, msg
        if case in ("missing", "truncated", "parent"):
            assert "copy its .data file beside it" in msg, msg


def test_valid_external_model_loads_as_before(tmp_path: Path):
    model, _ = quantized_linear_model(bits=6, I=64, O=48)
    src = tmp_path / "q.onnx"
    _save_external(model, src)
    loaded = modelio.load_model(src)
    inits = modelio.Initializers(loaded)
    for t in model.graph.initializer:
        assert np.array_equal(inits.value(t.name), nh.to_array(t))


def test_constant_inside_the_folder_is_read(tmp_path: Path):
    """A Constant's external value beside the model is fine, and read from the model's folder (not the cwd)."""
    from ttfsc.graph import GraphIndex
    from ttfsc.passes.neuron_groups import constant_value
    value = np.arange(4, dtype=np.float32)
    (tmp_path / "c.bin").write_bytes(value.tobytes())
    model, _ = quantized_linear_model(bits=6)
    model.graph.node.append(h.make_node("Constant", [], ["c"], name="c", value=_external_constant("c", "c.bin")))
    src = tmp_path / "q.onnx"
    src.write_bytes(model.SerializeToString())
    loaded = modelio.load_model(src)
    assert np.array_equal(constant_value(GraphIndex(loaded), "c"), value)


def test_sub_byte_tensor_is_unpacked(tmp_path: Path):
    """int4 external data is packed two to a byte: its length is half the element count."""
    codes = np.array([-7, 3, 0, 7, -1], dtype=np.int8)
    raw = nh.from_array(nh.to_array(h.make_tensor("w4", TP.INT4, [5], codes.tolist())), "w4").raw_data
    assert len(raw) == 3
    (tmp_path / "w.bin").write_bytes(raw)
    ext = TP(name="w4", data_type=TP.INT4, dims=[5], data_location=TP.EXTERNAL)
    _set_entries(ext, location="w.bin", offset="0", length="3")
    assert np.array_equal(modelio.tensor_value(ext, str(tmp_path)).astype(np.int8), codes)


def test_absolute_locations_only_for_own_spill_files(tmp_path: Path, secret: Path):
    with modelio.SpillFile(tmp_path, "t") as spill:
        t = spill.put("w", np.arange(300, dtype=np.float32))
        assert np.array_equal(modelio.tensor_value(t, str(tmp_path / "elsewhere")), np.arange(300))
    with pytest.raises(TtfscError, match="absolute path"):
        modelio.tensor_value(t, str(tmp_path))  # closed: no longer ttfsc's own
    foreign = _external_constant("leak", str(secret))
    with pytest.raises(TtfscError, match="absolute path"):
        modelio.tensor_value(foreign, str(tmp_path))


def test_reads_without_a_model_folder_are_refused():
    with pytest.raises(TtfscError, match="no model folder"):
        modelio.tensor_value(_external_constant("c", "c.bin"), None)


def test_save_model_copies_only_checked_extents(tmp_path: Path, secret: Path):
    """save_model re-checks what it streams, for models built in memory rather than loaded."""
    model, _ = quantized_linear_model(bits=6)
    t = model.graph.initializer.add()
    t.CopyFrom(_external_constant("leak", os.path.relpath(secret, tmp_path / "m")))
    (tmp_path / "m").mkdir()
    modelio.set_model_dir(model, tmp_path / "m")
    out = tmp_path / "out" / "o.onnx"
    with pytest.raises(TtfscError, match="outside the model's folder"):
        modelio.save_model(model, out)
    assert not out.exists() and not (tmp_path / "out" / "o.onnx.data").exists()


# ---------------------------------------------------------------- the commands, in subprocesses

def _cli(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ttfsc.cli", *map(str, argv)], capture_output=True, cwd=cwd,
                          env=env, timeout=300)


def _files(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file() and not p.is_symlink()}


def _assert_refused(argv: list, src: Path, secret: Path, out_dir: Path, cwd: Path) -> str:
    """Exit 2, one `ttfsc: error:` line naming the model, no secret anywhere, nothing written."""
    before = _files(src.parent, out_dir)
    r = _cli(*argv, cwd=cwd)
    err = r.stderr.decode(errors="replace").strip()
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert err.startswith("ttfsc: error:") and len(err.splitlines()) == 1, err
    assert src.name in err, err
    assert b"TOPSECRET" not in r.stdout + r.stderr
    assert _files(src.parent, out_dir) == before  # no output, no temporaries, inputs untouched
    assert secret.read_bytes() == SECRET
    return err


@pytest.mark.parametrize("case", HOSTILE + ["offset_past_end", "length_not_shape", "truncated", "missing"])
def test_compile_refuses(tmp_path: Path, secret: Path, case: str):
    src = qdq_folder(tmp_path)
    craft(src, case, secret)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_refused(["compile", src, "-T", "64", "-o", out_dir / "o.onnx"], src, secret, out_dir, tmp_path)


@pytest.mark.parametrize("case", ["parent", "symlink_file", "missing"])
def test_verify_and_inspect_refuse(tmp_path: Path, secret: Path, case: str):
    src = qdq_folder(tmp_path)
    craft(src, case, secret)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_refused(["verify", src, src], src, secret, out_dir, tmp_path)
    _assert_refused(["inspect", src, "--neurons"], src, secret, out_dir, tmp_path)


@pytest.fixture
def float_model(tiny_llama_onnx: Path, tmp_path: Path) -> Path:
    """A copy of the tiny exported float model (tokenizer and config beside it) in ``tmp_path/m``."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_onnx.parent, folder)
    return folder / tiny_llama_onnx.name


@pytest.mark.parametrize("case", ["deep_parent", "truncated"])
def test_commands_on_a_float_model_refuse(float_model: Path, tmp_path: Path, secret: Path, case: str):
    """quantize, compile, run, eval and report all load the model before reading a weight."""
    craft(float_model, case, secret)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    text = tmp_path / "outside" / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    secret_text = text.read_bytes()
    commands = [["quantize", float_model, "-o", out_dir / "q.onnx"],
                ["compile", float_model, "-T", "64", "-o", out_dir / "o.onnx"],
                ["run", float_model, "--prompt", "hello", "--max-new-tokens", "2"],
                ["eval", float_model, "--ppl", f"w={text}"],
                ["report", float_model, "--text", text, "--out", out_dir / "report"]]
    for argv in commands:
        _assert_refused(argv, float_model, secret, out_dir, tmp_path)
    assert text.read_bytes() == secret_text
