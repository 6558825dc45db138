"""Small facts about fx nodes that several passes need: aliasing and storage."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule, _make_graph_module

from ..layout import dense_layout
from .shapes import hint_int, nbytes_hint


# torch's functional collectives, which a data-parallel backward calls (``passes/reduce_grads.py``)
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
ALL_REDUCE_COALESCED = torch.ops._c10d_functional.all_reduce_coalesced.default
COLLECTIVE_WAIT = torch.ops._c10d_functional.wait_tensor.default


# ``_unsafe_view`` (what AOTAutograd makes of the reshape after a linear layer's mm) returns a
# view of its input's storage, though its schema does not say so (autograd is told it is a new
# tensor): in memory, it is a view
UNSAFE_VIEW = torch.ops.aten._unsafe_view.default


def aliased_input(node: fx.Node) -> fx.Node | None:
    """The input a view op's output aliases, from the op's schema alias annotations (and a
    collective's wait, which returns the tensor it waited for, and ``_unsafe_view``, which
    returns a view: neither schema says so)."""
    if node.op != "call_function":
        return None
    if node.target is COLLECTIVE_WAIT or node.target is UNSAFE_VIEW:
        return node.args[0]
    if node.target is operator.getitem:
        parent = node.args[0]
        return _returns_alias(parent) if isinstance(parent, fx.Node) else None
    return _returns_alias(node)


def _returns_alias(node: fx.Node) -> fx.Node | None:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return None
    ret = schema.returns[0].alias_info
    if ret is None or ret.is_write:
        return None
    for arg, value in zip(schema.arguments, node.args):
        info = arg.alias_info
        if info is None or info.is_write:
            continue
        # Tensor(a) -> Tensor(a); or Tensor(a -> *) -> Tensor(a)[], whose elements alias the input
        if info.before_set & ret.before_set or (not ret.before_set and "*" in info.after_set):
            return value if isinstance(value, fx.Node) else None
    return None


def view_parent(node: fx.Node) -> fx.Node | None:
    """The node a view is taken of, step by step: ``getitem`` of a split goes to the split."""
    if node.op == "call_function" and node.target is operator.getitem:
        parent = node.args[0]
        if isinstance(parent, fx.Node) and _returns_alias(parent) is not None:
            return parent
        return None
    if node.op == "call_function" and isinstance(node.meta.get("val"), (list, tuple)):
        return _returns_alias(node)  # a multi-output view op (split, unbind, ...)
    return aliased_input(node)


def view_chain(view: fx.Node, base: fx.Node) -> list[fx.Node] | None:
    """The views from ``base`` to ``view``, in the order they are taken (``base`` not among them;
    empty where ``view`` is ``base``); None where ``view`` does not lead back to ``base``."""
    chain = []
    node: fx.Node | None = view
    while node is not base:
        if node is None:
            return None
        chain.append(node)
        node = view_parent(node)
    return chain[::-1]


def storage_base(node: fx.Node) -> fx.Node:
    """Follow view ops back to the node that owns the storage."""
    while True:
        src = aliased_input(node)
        if src is None:
            return node
        node = src


def is_view(node: fx.Node) -> bool:
    return aliased_input(node) is not None


def tensor_val(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def output_tensors(node: fx.Node) -> list[torch.Tensor]:
    """The tensors a node produces (a multi-output op returns a tuple)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def results_bytes(node: fx.Node) -> int:
    """A multi-output op that makes new storages (not a ``split``): the bytes of its results,
    which it allocates while its inputs are alive (the graph's ``getitem`` nodes come after)."""
    if not isinstance(node.meta.get("val"), (list, tuple)) or view_parent(node) is not None:
        return 0
    return sum(nbytes_hint(t) for t in output_tensors(node))


def is_dense(val: torch.Tensor | None) -> bool:
    """``dense_layout`` judged on size hints (no guards on symbolic sizes): what a swap can copy
    as one block and give back with the same strides."""
    if val is None:
        return False
    return dense_layout([hint_int(s) for s in val.shape], [hint_int(s) for s in val.stride()])


def lazy_graph_module(root: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule of ``graph`` whose Python code is generated when first needed (as dynamo
    makes them; torch's private class, reached here only)."""
    return _make_graph_module(root, graph, graph_module_cls=_LazyGraphModule)
