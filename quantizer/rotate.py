"""Function-preserving weight transforms of an FP LLaMA ONNX decoder that ease activation quantization.

Why: SmolLM2-class models carry massive activations and a few outlier channels in the residual
stream, so a per-tensor n-bit activation grid wastes nearly all its codes on a handful of values.
Two offline transforms change which *coordinates* the network computes in, never what it computes:

* ``rotate_model`` (QuaRot-style): every RMSNorm gain gamma is folded into the linear weights that
  read the normalised tensor (gamma becomes ones), then the residual stream is rotated by an
  orthogonal Q: embeddings ``E' = E Q``, residual readers (q/k/v, gate/up, lm_head)
  ``W' = Q^T W``, residual writers (o_proj, down_proj) ``W' = W Q``. RMSNorm without gain commutes
  with Q (it only uses the vector's norm), so logits are unchanged in exact arithmetic, while an
  outlier channel is spread over all channels of the rotated stream.
* ``smooth_model`` (SmoothQuant-style): per input channel j of a linear layer,
  ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; X is divided by s (through the norm gain or the
  preceding up_proj) and the weight rows are multiplied by s.

Both work on ONNX initializers only (no torch), so any Optimum-style export works: linear layers
are ``MatMul(x, W[in, out])`` with a float initializer, RMSNorm is decomposed
(Pow, ReduceMean, Add, Sqrt, Div, Mul, Mul(gamma)), embeddings are a Gather. The structure is
recognised by following the residual stream from the embedding Gather, not by node names; any
consumer that would see rotated values without being accounted for raises TtfscError naming it.

Weights are read one at a time (memory-mapped), transformed in blocks and spilled to a temporary
file that ``modelio.save_model`` streams into the output, so memory stays bounded.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ttfsc import modelio
from ttfsc.errors import TtfscError
from ttfsc.graph import GraphIndex, set_metadata, with_outputs
from ttfsc.quantizer.config import ROTATIONS
from ttfsc.quantizer.weights import col_blocks, row_blocks

ONLINE_TRANSFORM_SUFFIX = ".online_hadamard"  # in the names of inserted float rotation nodes (not linear layers)
PASS_THROUGH = ("Cast", "Identity")  # ops that carry a residual/normalised tensor unchanged
STATS_OPS = ("Pow",)  # residual consumers that only compute the (rotation-invariant) RMS


# ---------------------------------------------------------------- structure

@dataclass
class Norm:
    """One RMSNorm feeding linear layers: its gain Mul (None if absent) and the readers."""
    apply: onnx.NodeProto                   # the Mul/Div that applies 1/rms to the residual
    gamma_node: onnx.NodeProto | None       # Mul(gamma, .) or None
    gamma: str | None                       # gamma initializer name
    output: str                             # tensor the readers consume
    readers: list[onnx.NodeProto] = field(default_factory=list)


@dataclass
class Structure:
    """What rotation needs: embedding, norms with their readers, residual writers."""
    embed_node: onnx.NodeProto
    embed: str
    hidden: int
    norms: list[Norm]
    writers: list[onnx.NodeProto]


def _users(g: GraphIndex, tensor: str) -> list[onnx.NodeProto]:
    """Readers of a residual-stream tensor; a graph output there would change under rotation."""
    if tensor in g.graph_outputs:
        raise TtfscError(f"tensor {tensor} is a graph output inside the residual stream; rotating would "
                         "change it. Export without hidden-state outputs (`ttfsc export`).")
    return g.consumers.get(tensor, [])


def initializer_behind(g: GraphIndex, tensor: str) -> tuple[str | None, bool]:
    """(initializer behind ``tensor`` through Identity/Transpose chains, True if transposed).

    Exports deduplicate equal tensors (e.g. all-ones RMSNorm gains) into Identity nodes and
    tie lm_head to the embedding through a Transpose; both are followed here.
    """
    transposed = False
    while tensor not in g.inits:
        prod = g.producer.get(tensor)
        if prod is None or prod.op_type not in ("Identity", "Transpose"):
            return None, False
        if prod.op_type == "Transpose":
            perm = next((list(a.ints) for a in prod.attribute if a.name == "perm"), [1, 0])
            if perm != [1, 0]:
                return None, False
            transposed = not transposed
        tensor = prod.input[0]
    return tensor, transposed


def weight_of(g: GraphIndex, node: onnx.NodeProto) -> str | None:
    """The float 2-D weight initializer of a MatMul (directly or through Identity/Transpose), else None."""
    if node.op_type != "MatMul" or len(node.input) != 2:
        return None
    name, _ = initializer_behind(g, node.input[1])
    if name is None:
        return None
    t = g.inits.by_name[name]
    return name if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT else None


def _find_embedding(g: GraphIndex) -> tuple[onnx.NodeProto, str]:
    table = g.inits.by_name
    hits = [n for n in g.model.graph.node if n.op_type == "Gather" and n.input[0] in table
            and len(table[n.input[0]].dims) == 2 and table[n.input[0]].data_type == TensorProto.FLOAT]
    if len(hits) != 1:
        raise TtfscError(f"expected one embedding Gather on a 2-D float initializer, found {len(hits)} "
                         f"({[n.name for n in hits]}); give an Optimum LLaMA export (`ttfsc export`).")
    return hits[0], hits[0].input[0]


def _follow_pass_through(g: GraphIndex, tensor: str) -> tuple[str, list[onnx.NodeProto]]:
    """Skip Cast/Identity chains with a single consumer; return the tensor reached and its users."""
    users = _users(g, tensor)
    while len(users) == 1 and users[0].op_type in PASS_THROUGH:
        tensor = users[0].output[0]
        users = _users(g, tensor)
    return tensor, users


def _gamma_of(g: GraphIndex, node: onnx.NodeProto, hidden: int) -> str | None:
    if node.op_type != "Mul":
        return None
    for i in node.input:
        name, _ = initializer_behind(g, i)
        t = g.inits.by_name.get(name) if name else None
        if t is not None and list(t.dims) == [hidden] and t.data_type == TensorProto.FLOAT:
            return i
    return None


def _norm_from_apply(g: GraphIndex, apply: onnx.NodeProto, hidden: int) -> Norm:
    """From the 1/rms Mul follow Cast chains to the gamma Mul and then to the linear readers."""
    tensor, users = _follow_pass_through(g, apply.output[0])
    gamma_node, gamma = None, None
    if len(users) == 1 and _gamma_of(g, users[0], hidden):
        gamma_node, gamma = users[0], _gamma_of(g, users[0], hidden)
        tensor, users = _follow_pass_through(g, gamma_node.output[0])
    norm = Norm(apply, gamma_node, gamma, tensor)
    for u in users:
        if u.op_type == "Shape":
            continue
        if weight_of(g, u) is None or u.input[0] != tensor:
            raise TtfscError(f"node {u.name} ({u.op_type}) reads the normalised tensor {tensor} but is not a "
                             "MatMul with a weight initializer; rotation cannot account for it. Give an "
                             "Optimum LLaMA export, or fold this op by hand first.")
        norm.readers.append(u)
    if not norm.readers:
        raise TtfscError(f"RMSNorm at {apply.name} feeds no linear layer; unrecognised structure.")
    return norm


def _residual_writer(g: GraphIndex, add: onnx.NodeProto, stream: set[str]) -> onnx.NodeProto:
    other = [i for i in add.input if i not in stream]
    prod = g.producer.get(other[0]) if len(other) == 1 else None
    if prod is None or weight_of(g, prod) is None or len(g.consumers.get(prod.output[0], [])) != 1:
        raise TtfscError(f"residual Add {add.name} adds a tensor not produced by a linear layer (MatMul with "
                         "a weight initializer, used only there); unrecognised structure.")
    return prod


def _walk_residual(g: GraphIndex, start: str, hidden: int) -> tuple[list[Norm], list[onnx.NodeProto]]:
    """Visit every consumer of the residual stream; classify it or raise."""
    stream, todo, norms, writers, seen = {start}, [start], [], [], set()
    while todo:
        t = todo.pop()
        for u in _users(g, t):
            if id(u) in seen:
                continue
            seen.add(id(u))
            if u.op_type in PASS_THROUGH or u.op_type == "Add":
                if u.op_type == "Add":
                    writers.append(_residual_writer(g, u, stream))
                stream.add(u.output[0])
                todo.append(u.output[0])
            elif u.op_type in STATS_OPS or u.op_type == "Shape" or (u.op_type == "Mul" and u.input[0] == u.input[1]):
                continue
            elif u.op_type in ("Mul", "Div") and u.input[0] == t and g.producer.get(u.input[1]) is not None:
                norms.append(_norm_from_apply(g, u, hidden))
            elif u.op_type == "Mul" and u.input[1] == t and g.producer.get(u.input[0]) is not None:
                norms.append(_norm_from_apply(g, u, hidden))
            else:
                raise TtfscError(f"node {u.name} ({u.op_type}) consumes the residual stream ({t}) in a way "
                                 "rotation cannot preserve (expected RMSNorm, residual Add, Cast or Shape). "
                                 "Give an Optimum LLaMA export with RMSNorm (`ttfsc export`).")
    return norms, writers


def analyse(model: onnx.ModelProto) -> Structure:
    """Recognise embedding, RMSNorms + readers and residual writers, or raise TtfscError."""
    g = GraphIndex.live(model)
    embed_node, embed = _find_embedding(g)
    hidden = int(g.inits.by_name[embed].dims[1])
    norms, writers = _walk_residual(g, embed_node.output[0], hidden)
    if not norms or not writers:
        raise TtfscError(f"found {len(norms)} RMSNorms and {len(writers)} residual writers after "
                         f"{embed_node.name}; unrecognised structure (expected a LLaMA decoder).")
    return Structure(embed_node, embed, hidden, norms, writers)


# ---------------------------------------------------------------- rotations

def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign of R's diagonal fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def hadamard_factors(n: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """(signs, factors) of the randomized Hadamard diag(signs) kron(*factors) of order n.

    n = 2^k m: the Sylvester H_{2^k} is itself kron(H_{2^a}, H_{2^b}), so the factors are two
    Hadamards of about sqrt(2^k) and, when m > 1, a Haar-random R_m. Applying them one axis at a
    time costs n (2^a + 2^b + m) multiplies instead of n^2 (online rotation, rotate_down_inputs).
    """
    rng = np.random.default_rng(seed)
    p = n & -n  # largest power-of-two factor
    signs = rng.choice([-1.0, 1.0], size=n)
    k = p.bit_length() - 1
    factors = [_sylvester(1 << (k // 2)), _sylvester(1 << (k - k // 2))]
    if p != n:
        factors.append(random_orthogonal(n // p, rng))
    return signs, [f for f in factors if f.shape[0] > 1]


def rotation(n: int, seed: int = 0, kind: str = "random") -> np.ndarray:
    """Orthogonal [n, n] float64 matrix.

    ``random``: Haar-random. ``hadamard``: randomized Walsh-Hadamard diag(±1) H / sqrt(n) when n is a
    power of two; otherwise H_{2^k} kron R_m with n = 2^k m and R_m Haar-random (576 = 64 x 9), which
    keeps most of Hadamard's even spreading (hadamard_factors).
    """
    if kind not in ROTATIONS:
        raise TtfscError(f"rotation kind {kind!r} is unknown; use one of {ROTATIONS}.")
    if kind == "random":
        return random_orthogonal(n, np.random.default_rng(seed))
    signs, factors = hadamard_factors(n, seed)
    h = np.ones((1, 1))
    for f in factors:
        h = np.kron(h, f)
    return signs[:, None] * h


# ---------------------------------------------------------------- weight I/O

class WeightWriter:
    """Replaces initializers by transformed copies, untying weights that are shared."""

    def __init__(self, model: onnx.ModelProto, spill: modelio.SpillFile):
        self.model, self.spill = model, spill
        self.inits = modelio.Initializers(model)
        self.claimed: set[str] = set()
        self.untied: list[str] = []

    def value(self, name: str) -> np.ndarray:
        return self.inits.value(name)

    def replace(self, name: str, array: np.ndarray) -> None:
        """Overwrite initializer ``name`` in place (its only user is being transformed)."""
        array = np.asarray(array, dtype=np.float32)
        t = self.spill.put(name, array) if array.nbytes > modelio.INLINE_LIMIT else numpy_helper.from_array(array, name)
        self.inits.by_name[name].CopyFrom(t)
        self.claimed.add(name)

    def new(self, base: str, array: np.ndarray) -> str:
        name, k = f"{base}.untied", 1
        while name in self.inits:
            name, k = f"{base}.untied{k}", k + 1
        self.model.graph.initializer.append(self.spill.put(name, np.asarray(array, dtype=np.float32)))
        self.inits.by_name[name] = self.model.graph.initializer[-1]
        self.claimed.add(name)
        self.untied.append(name)
        return name


def _left(q_t: np.ndarray, w: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """q_t @ diag(scale) @ w, column block by column block, in float64."""
    out = np.empty(w.shape, dtype=np.float32)
    for c in col_blocks(w):
        block = np.asarray(w[:, c], dtype=np.float64)
        if scale is not None:
            block = block * scale[:, None]
        out[:, c] = q_t @ block
    return out


def _right(w: np.ndarray, q: np.ndarray) -> np.ndarray:
    """w @ q, row block by row block, in float64."""
    out = np.empty(w.shape, dtype=np.float32)
    for r in row_blocks(w):
        out[r] = np.asarray(w[r], dtype=np.float64) @ q
    return out


# ---------------------------------------------------------------- rotate

def _matmul_weight(g: GraphIndex, node: onnx.NodeProto) -> tuple[str, bool]:
    """(initializer name, True if it arrives through Identity/Transpose and must be untied)."""
    w = node.input[1]
    return (w, False) if w in g.inits else (initializer_behind(g, w)[0], True)


def _set_weight(wr: WeightWriter, g: GraphIndex, node: onnx.NodeProto, array: np.ndarray, shared: bool) -> None:
    """Give ``node`` its transformed weight: in place if only it uses the initializer, else a new one."""
    name, indirect = _matmul_weight(g, node)
    if indirect or shared or name in wr.claimed:
        node.input[1] = wr.new(name, array)
    else:
        wr.replace(name, array)


def _read_weight(wr: WeightWriter, g: GraphIndex, node: onnx.NodeProto) -> np.ndarray:
    name, transposed = initializer_behind(g, node.input[1])
    w = wr.value(name)
    return w.T if transposed else w


def _use_count(g: GraphIndex, name: str) -> int:
    return len(g.consumers.get(name, []))


def _fold_and_rotate_readers(s: Structure, g: GraphIndex, wr: WeightWriter, q: np.ndarray | None) -> int:
    """W' = Q^T diag(gamma) W for every reader; gamma := 1. Returns the number of gammas folded."""
    folded = 0
    q_t = q.T if q is not None else None
    for norm in s.norms:
        gamma = gamma_value(wr, g, norm) if norm.gamma else None
        for node in norm.readers:
            w = _read_weight(wr, g, node)
            if q_t is None:
                out = (w * gamma[:, None]).astype(np.float32) if gamma is not None else np.asarray(w, np.float32)
            else:
                out = _left(q_t, w, gamma)
            name, _ = _matmul_weight(g, node)
            _set_weight(wr, g, node, out, _use_count(g, name) > 1)
        if norm.gamma:
            _set_gamma(wr, g, norm, np.ones(s.hidden, dtype=np.float32))
            folded += 1
    return folded


def gamma_value(wr: WeightWriter, g: GraphIndex, norm: Norm) -> np.ndarray:
    """The gain the norm's Mul reads now (through Identity chains of deduplicated gains)."""
    name = norm.gamma if norm.gamma in wr.inits else initializer_behind(g, norm.gamma)[0]
    return np.asarray(wr.value(name), dtype=np.float64)


def _set_gamma(wr: WeightWriter, g: GraphIndex, norm: Norm, value: np.ndarray) -> None:
    """New gamma value; a gamma shared with other nodes (or reached through Identity) is untied first."""
    direct = norm.gamma in wr.inits
    if direct and (norm.gamma in wr.claimed or _use_count(g, norm.gamma) == 1):
        wr.replace(norm.gamma, value)
        return
    new, k = f"{norm.gamma}.untied", 1
    while new in wr.inits:
        new, k = f"{norm.gamma}.untied{k}", k + 1
    wr.model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), new))
    wr.inits.by_name[new] = wr.model.graph.initializer[-1]
    norm.gamma_node.input[list(norm.gamma_node.input).index(norm.gamma)] = new
    norm.gamma = new
    wr.claimed.add(new)


def _rotate_writers(s: Structure, g: GraphIndex, wr: WeightWriter, q: np.ndarray) -> None:
    for node in s.writers:
        name, _ = _matmul_weight(g, node)
        _set_weight(wr, g, node, _right(_read_weight(wr, g, node), q), _use_count(g, name) > 1)


def _rotate_embedding(s: Structure, g: GraphIndex, wr: WeightWriter, q: np.ndarray) -> None:
    e = _right(wr.value(s.embed), q)
    if _use_count(g, s.embed) > 1 and not _only_dead_users(g, s.embed, s.embed_node):
        s.embed_node.input[0] = wr.new(s.embed, e)
    else:
        wr.replace(s.embed, e)


def _only_dead_users(g: GraphIndex, name: str, keep: onnx.NodeProto) -> bool:
    """True if every other user of ``name`` is a Transpose/Identity whose output nobody reads any more."""
    live = {i for n in g.model.graph.node for i in n.input}
    return all(u is keep or (u.op_type in ("Transpose", "Identity") and u.output[0] not in live)
               for u in g.consumers[name])


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove Transpose/Identity nodes left without readers (ties, shared gains) and unused initializers."""
    outputs = {o.name for o in model.graph.output}
    while True:
        live = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type in ("Transpose", "Identity") and n.output[0] not in live]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    live = {i for n in model.graph.node for i in n.input} | outputs
    for t in [t for t in model.graph.initializer if t.name not in live]:
        model.graph.initializer.remove(t)


def _save(model: onnx.ModelProto, model_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    _drop_dead(model)
    modelio.save_model(model, out_path)
    modelio.copy_sidecars(str(Path(model_path).resolve().parent), str(Path(out_path).resolve().parent))


@contextlib.contextmanager
def _transforming(model_path: str | os.PathLike,
                  out_path: str | os.PathLike) -> Iterator[tuple[onnx.ModelProto, GraphIndex, WeightWriter]]:
    """Load ``model_path`` for an in-place weight transform; save it to ``out_path`` if the block ends normally.

    Yields the model, a live index of it and a weight writer. Every transform here (rotation,
    smoothing, online Hadamard) edits the loaded model in place, spills its new weights beside the
    output and saves once; the spill file goes however the block ends.
    """
    model = modelio.load_model(model_path)
    with modelio.SpillFile.beside(out_path, "rotate") as spill:
        yield model, GraphIndex.live(model), WeightWriter(model, spill)
        _save(model, model_path, out_path)


def _head_dim(model_path: str | os.PathLike) -> int | None:
    """head_dim from config.json beside the model (explicit, or hidden_size / num_attention_heads)."""
    cfg = Path(model_path).resolve().parent / "config.json"
    if not cfg.exists():
        return None
    c = json.loads(cfg.read_text())
    if c.get("head_dim"):
        return int(c["head_dim"])
    if c.get("hidden_size") and c.get("num_attention_heads"):
        return int(c["hidden_size"]) // int(c["num_attention_heads"])
    return None


def _value_output_pairs(g: GraphIndex) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(v_proj, o_proj) MatMuls of each attention block, matched by their export names' scope."""
    by_scope: dict[str, dict[str, onnx.NodeProto]] = {}
    for node in g.model.graph.node:
        for role in ("v_proj", "o_proj"):
            if f"/{role}/" in node.name and weight_of(g, node) is not None:
                by_scope.setdefault(node.name.split(f"/{role}/")[0], {})[role] = node
    return [(d["v_proj"], d["o_proj"]) for d in by_scope.values() if len(d) == 2]


def rotate_value_heads(g: GraphIndex, wr: WeightWriter, head_dim: int, seed: int) -> int:
    """Rotate every value head by one Hadamard H: W_v' = W_v (I kron H), W_o' = (I kron H)^T W_o.

    Attention mixes value rows by the probabilities only, so (P V) H = P (V H): the rotation passes
    through attention and cancels in o_proj exactly (the same H for every head keeps GQA's shared
    heads consistent). It spreads o_proj's input outliers over each head like QuaRot's offline
    W_v/W_o rotation, which the residual rotation cannot reach.
    """
    h = rotation(head_dim, seed + 1, "hadamard")
    pairs = _value_output_pairs(g)
    for v, o in pairs:
        w_v, w_o = _current_weight(wr, g, v), _current_weight(wr, g, o)
        if w_v.shape[1] % head_dim or w_o.shape[0] % head_dim:
            raise TtfscError(f"nodes {v.name}/{o.name}: widths {w_v.shape[1]}/{w_o.shape[0]} are not multiples of "
                             f"head_dim {head_dim} (config.json); use --rotate none.")
        bd_v = np.kron(np.eye(w_v.shape[1] // head_dim), h)
        bd_o = np.kron(np.eye(w_o.shape[0] // head_dim), h)
        for node, out in ((v, _right(w_v, bd_v)), (o, _left(bd_o.T, w_o, None))):
            if node.input[1] in wr.claimed:  # already a private copy from folding/rotation
                wr.replace(node.input[1], out)
            else:
                name, _ = _matmul_weight(g, node)
                _set_weight(wr, g, node, out, _use_count(g, name) > 1)
    return len(pairs)


def _current_weight(wr: WeightWriter, g: GraphIndex, node: onnx.NodeProto) -> np.ndarray:
    """The weight a MatMul reads now, including copies made earlier in this transform."""
    name = node.input[1]
    return wr.value(name) if name in wr.claimed else _read_weight(wr, g, node)


def rotate_model(model_path: str | os.PathLike, out_path: str | os.PathLike, seed: int = 0,
                 kind: str = "random", fold_only: bool = False, value_heads: bool = True) -> dict[str, Any]:
    """Fold RMSNorm gains into their readers and rotate the residual stream by an orthogonal Q.

    ``fold_only`` stops after gamma folding (no rotation). ``value_heads`` also rotates each value
    head (v_proj columns, o_proj rows) by a Hadamard when head_dim is known. Returns what changed.
    """
    with _transforming(model_path, out_path) as (model, g, wr):
        s = analyse(model)
        q = None if fold_only else rotation(s.hidden, seed, kind)
        folded = _fold_and_rotate_readers(s, g, wr, q)
        heads = 0
        if q is not None:
            _rotate_writers(s, g, wr, q)
            _rotate_embedding(s, g, wr, q)
            hd = _head_dim(model_path) if value_heads else None
            heads = rotate_value_heads(g, wr, hd, seed) if hd else 0
        set_metadata(model, {"ttfsc.rotation": "none" if q is None else f"{kind} seed={seed}"})
    return {"model": str(model_path), "output": str(out_path), "kind": None if fold_only else kind, "seed": seed,
            "hidden": s.hidden, "gammas_folded": folded, "readers": sum(len(n.readers) for n in s.norms),
            "writers": len(s.writers), "embedding": s.embed, "untied": wr.untied, "value_heads_rotated": heads}


# ---------------------------------------------------------------- smoothing

def smoothing_scales(act_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha); 1 where either maximum is 0 (nothing to balance)."""
    a = np.asarray(act_max, dtype=np.float64)
    w = np.asarray(w_max, dtype=np.float64)
    ok = (a > 0) & (w > 0) & np.isfinite(a)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1 - alpha)
    return s


def _row_max(wr: WeightWriter, g: GraphIndex, nodes: Sequence[onnx.NodeProto]) -> np.ndarray:
    return np.max([np.abs(np.asarray(_read_weight(wr, g, n))).max(axis=1) for n in nodes], axis=0)


def _scale_rows(wr: WeightWriter, g: GraphIndex, nodes: Sequence[onnx.NodeProto], s: np.ndarray) -> None:
    for node in nodes:
        w = _read_weight(wr, g, node)
        name, _ = _matmul_weight(g, node)
        _set_weight(wr, g, node, (np.asarray(w, np.float64) * s[:, None]).astype(np.float32), _use_count(g, name) > 1)


def _smooth_norm(norm: Norm, g: GraphIndex, wr: WeightWriter, amax: np.ndarray, alpha: float) -> None:
    if norm.gamma is None:
        raise TtfscError(f"RMSNorm at {norm.apply.name} has no gain Mul to absorb smoothing scales; "
                         "smooth before folding gains, or re-export.")
    s = smoothing_scales(amax, _row_max(wr, g, norm.readers), alpha)
    _set_gamma(wr, g, norm, (gamma_value(wr, g, norm) / s).astype(np.float32))
    _scale_rows(wr, g, norm.readers, s)


def _up_proj_of(g: GraphIndex, linear: onnx.NodeProto) -> onnx.NodeProto:
    """The linear whose output multiplies (SwiGLU) into ``linear``'s input, e.g. up_proj for down_proj."""
    prod = g.producer.get(linear.input[0])
    if prod is not None and prod.op_type == "Mul" and len(g.consumers.get(prod.output[0], [])) == 1:
        for i in prod.input:
            p = g.producer.get(i)
            if p is not None and weight_of(g, p) is not None and len(g.consumers.get(i, [])) == 1:
                return p
    raise TtfscError(f"node {linear.name}: its input is not Mul(act, up_proj(x)) (SwiGLU); cannot move "
                     "smoothing scales into a preceding op. Leave this tensor out of act_max.")


def _smooth_swiglu(linear: onnx.NodeProto, g: GraphIndex, wr: WeightWriter, amax: np.ndarray, alpha: float) -> None:
    up = _up_proj_of(g, linear)
    s = smoothing_scales(amax, _row_max(wr, g, [linear]), alpha)
    w_up = np.asarray(_read_weight(wr, g, up), np.float64)
    name, _ = _matmul_weight(g, up)
    _set_weight(wr, g, up, (w_up / s[None, :]).astype(np.float32), _use_count(g, name) > 1)
    _scale_rows(wr, g, [linear], s)


def smooth_model(model_path: str | os.PathLike, out_path: str | os.PathLike, act_max: dict[str, Any],
                 alpha: float = 0.5) -> dict[str, Any]:
    """SmoothQuant migration for the linear inputs named in ``act_max`` (tensor name -> per-channel max|x|).

    Norm outputs (q/k/v, gate/up inputs; lm_head) absorb 1/s in gamma; SwiGLU products (down_proj
    inputs) absorb it in up_proj's columns. A name that is neither raises TtfscError.
    """
    if not 0.0 <= alpha <= 1.0:
        raise TtfscError(f"alpha {alpha} is outside [0, 1]; SmoothQuant uses 0.5 (0.75 for hard models).")
    done = []
    with _transforming(model_path, out_path) as (model, g, wr):
        by_tensor = {n.output: n for n in analyse(model).norms}
        for name, amax in act_max.items():
            amax = np.asarray(amax, dtype=np.float64).reshape(-1)
            if name in by_tensor:
                _smooth_norm(by_tensor[name], g, wr, amax, alpha)
            else:
                linear = next((u for u in g.consumers.get(name, []) if weight_of(g, u) is not None), None)
                if linear is None:
                    raise TtfscError(f"act_max names {name!r}, which is not the input of a linear layer; "
                                     "use the activation names quantize calibrates (MatMul first inputs).")
                _smooth_swiglu(linear, g, wr, amax, alpha)
            done.append(name)
        set_metadata(model, {"ttfsc.smoothing": f"alpha={alpha} tensors={len(done)}"})
    return {"model": str(model_path), "output": str(out_path), "alpha": alpha, "smoothed": done}


def _down_linears(g: GraphIndex) -> list[onnx.NodeProto]:
    """Linears fed by a SwiGLU product (down_proj), in graph order."""
    out = []
    for node in g.model.graph.node:
        if weight_of(g, node) is not None:
            with contextlib.suppress(TtfscError):
                _up_proj_of(g, node)
                out.append(node)
    return out


def _online_hadamard(model: onnx.ModelProto, wr: WeightWriter, before: onnx.NodeProto, signs: np.ndarray,
                     factors: list[np.ndarray]) -> str:
    """Insert x -> x diag(signs) kron(*factors) before ``before`` as Mul, Reshape, per-axis MatMuls.

    x [..., n] is viewed as [..., f_1, ..., f_r]; each factor multiplies its own axis (moved last by
    a Transpose, then back), so the cost is n * sum(f_i) instead of n^2. Returns the rotated tensor.
    """
    from onnx import helper
    base = f"{before.name}{ONLINE_TRANSFORM_SUFFIX}"
    sizes = [f.shape[0] for f in factors]
    r = len(sizes)
    nodes: list[onnx.NodeProto] = []

    def const(tag: str, array: np.ndarray) -> str:
        name = f"{base}.{tag}"
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        wr.inits.by_name[name] = model.graph.initializer[-1]
        return name

    x = before.input[0]
    cur = f"{base}.signed"
    nodes.append(helper.make_node("Mul", [x, const("signs", signs.astype(np.float32))], [cur], name=f"{base}/Mul"))
    shape_in = const("shape_in", np.array([0, 0] + sizes, dtype=np.int64))
    nodes.append(helper.make_node("Reshape", [cur, shape_in], [f"{base}.split"], name=f"{base}/Reshape"))
    cur = f"{base}.split"
    # axes 2..2+r-1 hold f_1..f_r; rotate the axis of factor i to the end, multiply, rotate back.
    for i in reversed(range(r)):
        axis = 2 + i
        perm = list(range(2 + r))
        perm[axis], perm[-1] = perm[-1], perm[axis]
        mats = const(f"factor{i}", factors[i].astype(np.float32))
        if i == r - 1:
            nodes.append(helper.make_node("MatMul", [cur, mats], [f"{base}.f{i}"], name=f"{base}/MatMul{i}"))
        else:
            nodes.append(helper.make_node("Transpose", [cur], [f"{base}.t{i}"], perm=perm, name=f"{base}/T{i}"))
            nodes.append(helper.make_node("MatMul", [f"{base}.t{i}", mats], [f"{base}.m{i}"], name=f"{base}/MatMul{i}"))
            nodes.append(helper.make_node("Transpose", [f"{base}.m{i}"], [f"{base}.f{i}"], perm=perm, name=f"{base}/B{i}"))
        cur = f"{base}.f{i}"
    out = f"{x}.hadamard"
    shape_out = const("shape_out", np.array([0, 0, int(np.prod(sizes))], dtype=np.int64))
    nodes.append(helper.make_node("Reshape", [cur, shape_out], [out], name=f"{base}/Merge"))
    at = list(model.graph.node).index(before)
    for j, n in enumerate(nodes):
        model.graph.node.insert(at + j, n)
    return out


def rotate_down_inputs(model_path: str | os.PathLike, out_path: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Online Hadamard before every down_proj: x -> x H (a constant MatMul), W_down -> H^T W_down.

    The residual rotation cannot reach down_proj's input (SiLU(gate) * up is not linear in the
    residual), and that tensor has the widest range of all linear inputs; QuaRot handles it with
    an online Hadamard. Function-preserving up to float rounding; it costs one float d_ff x d_ff
    MatMul per block, reported by the caller.
    """
    with _transforming(model_path, out_path) as (model, g, wr):
        downs = _down_linears(g)
        for k, node in enumerate(downs):
            w = _current_weight(wr, g, node)
            signs, factors = hadamard_factors(w.shape[0], seed + 2 + k)
            x_rot = _online_hadamard(model, wr, node, signs, factors)
            h = rotation(w.shape[0], seed + 2 + k, "hadamard")
            if node.input[1] in wr.claimed:
                wr.replace(node.input[1], _left(h.T, w, None))
            else:
                name, _ = _matmul_weight(g, node)
                _set_weight(wr, g, node, _left(h.T, w, None), _use_count(g, name) > 1)
            node.input[0] = x_rot
        set_metadata(model, {"ttfsc.down_rotation": f"online hadamard seed={seed} blocks={len(downs)}"})
    return {"model": str(model_path), "output": str(out_path), "rotated": len(downs)}


# ---------------------------------------------------------------- calibration helper

def linear_inputs(model: onnx.ModelProto) -> list[str]:
    """First inputs of every MatMul with a weight initializer, in graph order, without repeats."""
    g = GraphIndex.live(model)
    names: list[str] = []
    for node in model.graph.node:
        if weight_of(g, node) is not None and node.input[0] not in names and node.input[0] not in g.inits:
            names.append(node.input[0])
    return names


def smoothable_inputs(model: onnx.ModelProto) -> list[str]:
    """Linear inputs ``smooth_model`` can migrate scales out of: RMSNorm outputs (the gain absorbs
    1/s) and SwiGLU products (up_proj absorbs it). o_proj inputs are left out: no op before them
    can absorb a per-channel scale without touching the attention."""
    s = analyse(model)
    g = GraphIndex.live(model)
    names = [n.output for n in s.norms]
    for node in model.graph.node:
        if weight_of(g, node) is None or node.input[0] in names:
            continue
        with contextlib.suppress(TtfscError):
            _up_proj_of(g, node)
            names.append(node.input[0])
    return names


def merge_channel_max(acc: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """Running per-channel (last axis) max|x|; the one reduction channel_max and quantize share."""
    m = np.abs(np.asarray(x).reshape(-1, x.shape[-1])).max(axis=0)
    return m if acc is None else np.maximum(acc, m)


def channel_max(model_path: str | os.PathLike, feeds: Iterable[dict[str, np.ndarray]],
                names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per-channel max|x| of linear-layer inputs over ``feeds`` (the act_max smooth_model wants)."""
    from ttfsc.runtime.session import session_from_model
    model = modelio.load_model(model_path)
    names = list(names) if names is not None else linear_inputs(model)
    sess = session_from_model(with_outputs(model, names))
    out: dict[str, np.ndarray] = {}
    for feed in feeds:
        for n, v in zip(names, sess.run(names, feed)):
            out[n] = merge_channel_max(out.get(n), v)
    return out
