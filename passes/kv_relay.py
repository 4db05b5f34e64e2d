"""Pass: the KV-cache stage ``Q(Concat(past, DQ(k)))`` on k's own grid ==> a relay, no stage.

quantize --full quantizes the concatenated cache with *the same* scale and zero point as the
k (or v) quantizer it extends, so the new key's code passes through unchanged: Q(DQ(q)) = q.
A neuron there would cost a whole window on the key path (k -> rotary -> cache -> Q.K^T) for
nothing. Instead the new key's spike times are wired straight into the concatenation, and the
past (a float graph input holding values of this grid: the ``present`` the caller fed back, or
a PrefixQuant prefix) is encoded by an emission of the same grid, in parallel, off the
critical path. Bit-exact: the cache codes are the QANN's, and the past's emission is the very
quantizer the QANN applies to it. Saves one window of latency per attention layer.

The past encoder has no tensor of its own in the QANN (it is part of the cache tensor), so it is
marked ``role="kv_past"`` and ``ttfsc verify`` does not probe it; the cache codes are checked
through everything that reads them (Q.K^T, P.V, the ``present`` outputs and the logits).
"""
from __future__ import annotations

from onnx import helper

from ttfsc.graph import DATA_MOVEMENT, GraphIndex, copy_node
from ttfsc.passes.base import Match, Pass
from ttfsc.passes.neuron_groups import Group, NeuronRule
from ttfsc.dialect import EmitSpec, emit_spec

ROLE_KV_PAST = "kv_past"


class KvCacheRelay(NeuronRule):
    name = "KvCacheRelay"
    kind = "relay"

    def accepts(self, grp: Group) -> bool:
        return (len(grp.spikes) == 1 and "Concat" in grp.op_types and set(grp.op_types) <= DATA_MOVEMENT
                and self.past(grp) is not None)

    @staticmethod
    def past(grp: Group) -> str | None:
        """The side input the Concat reads: the fed-back cache (other side inputs are shapes)."""
        cat = next(n for n in grp.nodes if n.op_type == "Concat")
        past = [x for x in cat.input if x in grp.sides]
        return past[0] if len(past) == 1 else None

    def check(self, g: GraphIndex, m: Match) -> str | None:
        grp: Group = m.nodes["group"]
        src = g.producer.get(grp.spikes[0][1])
        mine, theirs = EmitSpec.from_node(grp.emit), emit_spec(src) if src is not None else None
        if not isinstance(theirs, EmitSpec) or (mine.T, mine.t_ref, mine.step, mine.tie_rule) != \
                (theirs.T, theirs.t_ref, theirs.step, theirs.tie_rule):
            return "the cache is quantized on another grid than the tensor it extends: it stays a neuron"
        return None

    def rewrite(self, g: GraphIndex, m: Match) -> None:
        grp: Group = m.nodes["group"]
        e, out = grp.emit, grp.emit.output[0]
        base = (e.name or out).removesuffix("/emit")
        spec = EmitSpec.from_node(e)
        past_t = f"{out}/past_t"
        past = self.past(grp)
        enc = spec.make_node(past, past_t, f"{base}/encode_past")
        enc.attribute.extend([helper.make_attribute("role", ROLE_KV_PAST)])
        for a in enc.attribute:
            if a.name == "qann_tensor":
                a.s = b""
        rename = {grp.spikes[0][0]: grp.spikes[0][1], past: past_t, grp.root: out}
        wired = []
        for n in grp.nodes:
            c = copy_node(n)
            c.name = f"{n.name or n.output[0]}/times"
            c.input[:] = [rename.get(x, x) for x in c.input]
            c.output[:] = [rename.get(x, f"{x}/times") for x in c.output]
            for x, y in zip(n.output, c.output):
                rename.setdefault(x, y)
            c.input[:] = [rename.get(x, x) for x in n.input]
            wired.append(c)
        g.replace_node(e, [enc] + wired)


class KvRelay(Pass):
    name = "kv_relay"
    rule_types = (KvCacheRelay,)
