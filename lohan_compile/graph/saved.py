"""The values forward saves for backward, paired with backward's placeholders.

AOTAutograd's layout after partitioning: the forward graph returns the user
outputs, then the saved tensors, then saved opaque objects, then saved
symbolic sizes; the backward graph takes the saved symbolic sizes first, then
the opaque objects, then the saved tensors, then the tangents (and backward
RNG state or tokens). Tensors pair with tensors in order, sizes with sizes.

``SavedValues`` reads that layout and edits both sides together (replace
the forward value of a slot, remove a slot, add a slot), keeping the output
descriptors consistent, so a rewrite never has to count positions itself.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch._functorch._aot_autograd.descriptors import SavedForBackwardsAOTOutput

from .aot import is_backward_only_input, output_descs, output_kind
from .meta import Kind


def _is_sym(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


class SavedValues:
    def __init__(self, fw: fx.GraphModule, bw: fx.GraphModule):
        self.fw, self.bw = fw, bw
        self._read()
        # (``grouped_by``: backward placeholders by a key of their forward value, kept by the edits)
        self._key: Any = None
        self._groups: dict[Any, list[fx.Node]] = {}
        self._key_of: dict[fx.Node, Any] = {}

    def _read(self) -> None:
        out = self.fw.graph.output_node()
        values = list(out.args[0])
        kinds = [output_kind(d) for d in output_descs(self.fw)]
        self.first_saved = next((i for i, k in enumerate(kinds) if k is Kind.SAVED), len(values))
        saved = [(i, v) for i, (v, k) in enumerate(zip(values, kinds)) if k is Kind.SAVED]
        self.fw_tensor_slots = [i for i, v in saved if isinstance(v, fx.Node) and _is_tensor(v)]
        fw_syms = [i for i, v in saved if isinstance(v, fx.Node) and _is_sym(v)]
        self.fw_sym_slots = fw_syms
        # (find_nodes reads fx's index of nodes by op: no walk over the whole graph)
        placeholders = [
            n for n in self.bw.graph.find_nodes(op="placeholder")
            if not is_backward_only_input(n.meta.get("desc"))
        ]
        self.bw_tensors = [n for n in placeholders if _is_tensor(n)]
        self.bw_syms = [n for n in placeholders if _is_sym(n)]
        if len(self.fw_tensor_slots) != len(self.bw_tensors) or len(fw_syms) != len(self.bw_syms):
            raise ValueError(
                f"forward saves {len(self.fw_tensor_slots)} tensors and {len(fw_syms)} sizes, backward takes "
                f"{len(self.bw_tensors)} tensors and {len(self.bw_syms)} sizes"
            )

    def tensor_pairs(self) -> list[tuple[fx.Node, fx.Node]]:
        """(forward value, backward placeholder) for every saved tensor, in order."""
        values = self.fw.graph.output_node().args[0]
        return [(values[i], p) for i, p in zip(self.fw_tensor_slots, self.bw_tensors)]

    def sym_pairs(self) -> list[tuple[fx.Node, fx.Node]]:
        """(forward value, backward placeholder) for every saved symbolic size."""
        values = self.fw.graph.output_node().args[0]
        return [(values[i], p) for i, p in zip(self.fw_sym_slots, self.bw_syms)]

    def grouped_by(self, key: Callable[[fx.Node], Any], value: Any) -> list[tuple[int, fx.Node, fx.Node]]:
        """(slot, forward value, backward placeholder) of the saved tensors whose forward value
        has ``key(v) == value``, in slot order. The groups are made once for ``key`` (asked
        for every value of a rewrite, a scan of all saved values each time would make it
        quadratic) and kept by the edits below."""
        if self._key is not key:
            self._key, self._groups, self._key_of = key, {}, {}
            for v, p in self.tensor_pairs():
                self._group(v, p)
        values = self.fw.graph.output_node().args[0]
        slots = sorted(self.bw_tensors.index(p) for p in self._groups.get(value, ()))
        return [(k, values[self.fw_tensor_slots[k]], self.bw_tensors[k]) for k in slots]

    def _group(self, v: fx.Node, p: fx.Node) -> None:
        if self._key is not None:
            k = self._key(v)
            self._key_of[p] = k
            self._groups.setdefault(k, []).append(p)

    def _ungroup(self, p: fx.Node) -> None:
        if self._key is not None and p in self._key_of:
            self._groups[self._key_of.pop(p)].remove(p)

    def in_backward(self, fw_value: fx.Node) -> fx.Node | None:
        """The backward placeholder that receives ``fw_value``, if forward saves it."""
        for v, p in self.tensor_pairs() + self.sym_pairs():
            if v is fw_value:
                return p
        return None

    def _set_outputs(self, values: list) -> None:
        out = self.fw.graph.output_node()
        descs = output_descs(self.fw)
        # saved slots are numbered 0.. in order, after the user outputs
        out.args = (tuple(values),)
        out.meta["desc"] = descs[: self.first_saved] + _saved_descs(len(values) - self.first_saved)

    # The edits below update the slot lists themselves: reading the layout again walks the
    # outputs' descriptors and the placeholders, for every edit of a rewrite that edits one saved
    # value at a time.

    def replace_forward_value(self, k: int, node: fx.Node) -> None:
        """The k-th saved tensor now comes from ``node`` (a swap-out's waited host tensor, say)."""
        values = list(self.fw.graph.output_node().args[0])
        values[self.fw_tensor_slots[k]] = node
        self._set_outputs(values)
        self._ungroup(self.bw_tensors[k])
        self._group(node, self.bw_tensors[k])

    def remove(self, k: int) -> None:
        """Stop saving the k-th tensor; its backward placeholder must have no users left."""
        p = self.bw_tensors[k]
        if p.users:
            raise ValueError(f"backward placeholder {p.name} is still used by {list(p.users)}")
        values = list(self.fw.graph.output_node().args[0])
        at = self.fw_tensor_slots[k]
        del values[at]
        self._set_outputs(values)
        self.bw.graph.erase_node(p)
        self._ungroup(p)
        del self.bw_tensors[k]
        self.fw_tensor_slots = [i - (i > at) for i in self.fw_tensor_slots if i != at]
        self.fw_sym_slots = [i - (i > at) for i in self.fw_sym_slots]

    def add(self, fw_value: fx.Node, name: str) -> fx.Node:
        """Save ``fw_value`` too; returns its new backward placeholder (after the other saved tensors)."""
        if not _is_tensor(fw_value):
            raise ValueError(f"{fw_value.name} is not a tensor: only saved tensors can be added")
        values = list(self.fw.graph.output_node().args[0])
        at = (self.fw_tensor_slots[-1] + 1) if self.fw_tensor_slots else self.first_saved
        values.insert(at, fw_value)
        self._set_outputs(values)
        # backward takes saved sizes, then saved tensors: the new one goes after both
        anchors = self.bw_syms + self.bw_tensors
        if anchors:
            with self.bw.graph.inserting_after(max(anchors)):  # (fx nodes compare by graph order)
                p = self.bw.graph.placeholder(name)
        else:
            first = next(iter(self.bw.graph.find_nodes(op="placeholder")))
            with self.bw.graph.inserting_before(first):
                p = self.bw.graph.placeholder(name)
        p.meta.update({k: v for k, v in fw_value.meta.items() if k in ("val", "tensor_meta", "lohan")})
        self.fw_sym_slots = [i + (i >= at) for i in self.fw_sym_slots]
        self.fw_tensor_slots.append(at)
        self.bw_tensors.append(p)
        self._group(fw_value, p)
        return p


_SAVED_DESCS: tuple[SavedForBackwardsAOTOutput, ...] = ()


def _saved_descs(n: int) -> list[SavedForBackwardsAOTOutput]:
    """The descriptors of saved slots 0..n-1 (frozen, so shared between graphs and edits; the
    cache is replaced whole, never appended to, so a concurrent compile sees a correct one)."""
    global _SAVED_DESCS
    cached = _SAVED_DESCS
    if len(cached) < n:
        cached = tuple(SavedForBackwardsAOTOutput(idx=j) for j in range(max(n, 2 * len(cached))))
        _SAVED_DESCS = cached
    return list(cached[:n])
