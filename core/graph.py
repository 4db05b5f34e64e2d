"""The graph toolkit: producer/consumer maps of an ONNX graph and the edits that keep them current.

The one place where passes, the quantizer's transforms and the analysis tools look up who
produces and who reads a tensor, so no module walks ``graph.node`` with its own maps.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterable, Iterator, Sequence

import onnx

from ttfsc.modelio import Initializers


class GraphIndex:
    """Producer/consumer maps of a graph, kept current by the edit helpers below.

    ``detached`` (the default, for passes): the index holds copies of the nodes, edits them and
    writes the list back with ``commit``, so a rule that gives up leaves the model untouched.
    ``detached=False`` (``GraphIndex.live``, for the quantizer): the index hands out the model's
    own nodes, for code that rewires inputs in place and adds nodes to the graph itself; such an
    index must not ``replace_node``, ``remove_nodes`` or ``commit``.
    """

    def __init__(self, model: onnx.ModelProto, detached: bool = True):
        self.model = model
        self.graph = model.graph
        self.inits = Initializers(model)
        self.graph_outputs = {o.name for o in self.graph.output}
        nodes = self.graph.node
        self._nodes: list[onnx.NodeProto] = [copy_node(n) for n in nodes] if detached else list(nodes)
        # edits are recorded and applied in one sweep when the node list is next read: rewriting
        # every quantizer of a real model would otherwise search and rebuild the list per edit
        self._pending: dict[int, tuple[onnx.NodeProto, list[onnx.NodeProto]]] = {}  # id -> (node, what it became)
        self.rebuild()

    @classmethod
    def live(cls, model: onnx.ModelProto) -> "GraphIndex":
        """An index over the graph's own nodes, not detached copies (see the class docstring)."""
        return cls(model, detached=False)

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        """The current node list, in graph order, with every recorded edit applied."""
        if self._pending:
            self._nodes = [m for n in self._nodes for m in self._expand(n)]
            self._pending.clear()
        return self._nodes

    def _expand(self, node: onnx.NodeProto) -> list[onnx.NodeProto]:
        """What ``node`` became: itself, its replacements (recursively), or nothing if removed."""
        edit = self._pending.get(id(node))
        if edit is None:
            return [node]
        return [m for n in edit[1] for m in self._expand(n)]

    def commit(self) -> None:
        """Write the edited node list back into the graph."""
        nodes = self.nodes
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def rebuild(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            self._link(node)

    def _link(self, node: onnx.NodeProto) -> None:
        for o in node.output:
            self.producer[o] = node
        for i in node.input:
            if i:
                self.consumers[i].append(node)

    def _unlink(self, node: onnx.NodeProto) -> None:
        for o in node.output:
            if self.producer.get(o) is node:
                del self.producer[o]
        for i in node.input:
            if i:
                self.consumers[i] = [c for c in self.consumers[i] if c is not node]

    def is_const(self, name: str) -> bool:
        return name in self.inits

    def const(self, name: str):
        return self.inits.value(name)

    def used(self, name: str) -> bool:
        return bool(self.consumers.get(name)) or name in self.graph_outputs

    def replace_node(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        """Put ``new`` where ``old`` was (keeps topological order when inputs precede old).

        The maps are updated at once; the node list when it is next read.
        """
        self._pending[id(old)] = (old, list(new))  # the node is kept alive, so its id stays its own
        self._unlink(old)
        for n in new:
            self._link(n)

    def remove_nodes(self, dead: list[onnx.NodeProto]) -> None:
        for n in dead:
            self._pending[id(n)] = (n, [])
            self._unlink(n)

    def readers(self, name: str) -> list[onnx.NodeProto]:
        """Consumers that use the values of ``name`` (a Shape reads only its dimensions)."""
        return [u for u in self.consumers.get(name, []) if u.op_type != "Shape"]

    def reachable(self, seeds: Iterable[str], skip: Sequence[str] = ("Shape",)) -> set[str]:
        """``seeds`` and every tensor computed from them, in node order; ops in ``skip`` stop the walk.

        With the token embedding and the past KV as seeds this is a decoder's activation set (a
        Shape's output is an integer about the tensor, not a value computed from it).
        """
        out = set(seeds)
        for node in self.nodes:
            if node.op_type not in skip and any(i in out for i in node.input):
                out.update(node.output)
        return out

    def carrier_source(self, name: str, values: set[str]) -> str:
        """``name`` traced back through VALUE_CARRIERS ops that carry exactly one tensor of ``values``.

        Where a value was computed, seen from a reader behind reshapes and transposes.
        """
        while name in self.producer:
            node = self.producer[name]
            carried = [i for i in node.input if i in values]
            if node.op_type not in VALUE_CARRIERS or len(carried) != 1:
                break
            name = carried[0]
        return name

    def carrier_sink(self, name: str, targets: set[str]) -> str:
        """Follow single-reader VALUE_CARRIERS ops forward from ``name`` to one of ``targets``.

        Returns the target reached, or ``name`` itself when the chain branches, ends in another
        op or passes a graph output first.
        """
        t = name
        while t not in targets:
            users = self.readers(t)
            if len(users) != 1 or users[0].op_type not in VALUE_CARRIERS or t in self.graph_outputs:
                return name
            t = users[0].output[0]
        return t


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    """A detached copy, to edit without touching the node it came from.

    The index keeps such copies so their identity stays stable while it edits the list around
    them; passes copy a node they rewire into new names the same way.
    """
    c = onnx.NodeProto()
    c.CopyFrom(node)
    return c


# ---------------------------------------------------------------- op vocabularies

#: onnxruntime's contrib domain: its QuantizeLinear/DequantizeLinear take 16-bit codes, which opset 18's do not
MS_DOMAIN = "com.microsoft"

#: ops that only move or reshape data: no arithmetic on values, so a code or a spike time crosses them unchanged
DATA_MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Expand", "Cast", "Identity",
                           "Slice", "Shape", "Gather", "Constant", "Flatten", "Split", "ConstantOfShape", "Range"})

#: the data-movement ops that carry one value tensor through (what a chain of plumbing may be followed along):
#: the rest make new tensors (Shape, Constant, Range, ConstantOfShape) or several (Split)
VALUE_CARRIERS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Slice", "Concat", "Cast",
                            "Identity", "Flatten", "Gather"})


# ---------------------------------------------------------------- whole-model edits

def with_outputs(model: onnx.ModelProto, names: list[str] | tuple[str, ...]) -> onnx.ModelProto:
    """A copy of ``model`` that also exposes ``names`` as (type-less) graph outputs.

    Probing intermediate tensors this way lets onnxruntime infer their types, and leaves the
    caller's model untouched (verify and report compare two models' internals).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in have)
    return out


@contextlib.contextmanager
def extra_outputs(model: onnx.ModelProto, names: Sequence[str]) -> Iterator[None]:
    """Expose ``names`` as graph outputs of ``model`` itself while the block runs.

    The in-place variant of ``with_outputs`` for models too large to copy (calibration runs on
    the float model); names already outputs or inputs are left alone.
    """
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    n_before = len(model.graph.output)
    for n in dict.fromkeys(names):
        if n not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
    try:
        yield
    finally:
        del model.graph.output[n_before:]


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's metadata_props as a dict (ttfsc keeps its facts about a model there)."""
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set metadata entries, replacing any earlier value of the same key in place."""
    for key, value in entries.items():
        prop = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add()
        prop.key, prop.value = key, str(value)


def drop_metadata(model: onnx.ModelProto, keys: Sequence[str]) -> None:
    """Remove metadata entries (a compiled model must not inherit stale facts of its source)."""
    keep = [p for p in model.metadata_props if p.key not in set(keys)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
