"""classify_saved: which forward values backward keeps, and what storage they hold.

Requires: forward and backward graphs from the partitioner, roles from
``classify_roles``.
Ensures: each forward node whose value is saved for backward, and the
matching backward placeholder, has role ``SAVED`` with ``storage_of`` (the
node whose storage the value shares: itself, or the base it is a view of) and
``saved_input_view`` (that base is a graph input, a parameter say, so saving it
costs no activation memory). Saved graph inputs keep their input role. The
report adds up the bytes of distinct activation storages kept for backward,
and of the forward values the backward graph recomputes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from lohan_compile.graph.aot import output_descs, output_kind
from lohan_compile.graph.fxutil import storage_base
from lohan_compile.graph.meta import NodeInfo, Role, get_info, set_info
from lohan_compile.graph.pipeline import CompileFacts, Graphs, NodeError
from lohan_compile.graph.saved import SavedValues
from lohan_compile.graph.shapes import nbytes_expr, nbytes_hint, sum_exprs

NAME = "classify_saved"


def classify_saved(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    fw, bw = graphs.fw, graphs.bw
    out = fw.graph.output_node()
    kinds = tuple(output_kind(desc) for desc in output_descs(fw))
    set_info(out, NodeInfo(role=Role.OUTPUT, made_by=NAME, outputs=kinds))
    bw_out = bw.graph.output_node()
    set_info(bw_out, NodeInfo(role=Role.OUTPUT, made_by=NAME, outputs=tuple(output_kind(d) for d in output_descs(bw))))
    try:
        pairs = SavedValues(fw, bw).tensor_pairs()
    except ValueError as e:
        raise NodeError(out, str(e)) from None

    storages: dict[fx.Node, None] = {}  # ordered set of activation storages
    input_views = 0
    for value, placeholder in pairs:
        if value.op == "placeholder":
            continue  # a graph input saved as is keeps its role
        base = storage_base(value)
        info = get_info(value)
        if info is None:
            raise NodeError(value, "saved value has no role (classify_roles did not run?)")
        new = info.with_(
            role=Role.SAVED, made_by=NAME, storage_of=base.name, saved_input_view=base.op == "placeholder"
        )
        set_info(value, new)
        set_info(placeholder, new)
        if base.op == "placeholder":
            input_views += 1
        elif isinstance(base.meta.get("val"), torch.Tensor):
            storages[base] = None

    kept = sum_exprs(nbytes_expr(b.meta["val"]) for b in storages)
    # The partitioner copies forward ops it chose to recompute (around the
    # model's own checkpointed regions) into backward with their forward role.
    recomputed = [
        n for n in bw.graph.nodes
        if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
        and getattr(get_info(n), "role", None) is Role.FORWARD
    ]
    report = {
        "saved_values": len(pairs),
        "saved_activation_storages": len(storages),
        "saved_input_views": input_views,
        "kept_bytes_expr": kept,
        "kept_bytes_hint": sum(nbytes_hint(b.meta["val"]) for b in storages),
        "recomputed_values": len(recomputed),
        "recomputed_bytes_expr": sum_exprs(nbytes_expr(n.meta["val"]) for n in recomputed),
    }
    return graphs, report

