"""offload_grads: each parameter's gradient leaves the device as soon as backward makes it.

Requires: forward and backward graphs with roles (``classify_roles``), and a
``CPUAdamW`` (``facts.optimizer``: the ``optimizer`` option, or one that owns the
graph's parameters), with which parameters it updates and their keys (``facts.inputs``).
Ensures, for every parameter the optimizer updates and the graph computes a
gradient for:
- right after the gradient is computed: on the CPU stand-in, its sum of squares and
  inf/NaN flag (``lohan::grad_stats``, the kernel the host would run on it), and
  ``h = lohan::swap_out(grad)``;
  small gradients (under ``SMALL_GRAD_BYTES``) of one dtype are bucketed, as
  DDP does: once the last of a run of them is computed, they are flattened into
  one device buffer of at most ``BUCKET_BYTES`` (and at most a sixteenth of all
  the offloaded gradient bytes, so that what buckets hold back on the device
  stays small beside the step's peak) and leave in one copy
  (``lohan::grads_ready(h, keys)`` hands each its slice), so a model of many
  small tensors does not pay a copy's fixed cost per tensor;
- the copy is waited for (``lohan::wait_tensor``, which frees the device
  gradient) where the next offloaded gradient is produced (so that copy
  overlaps that computation), and then handed to the optimizer runtime
  (``lohan::grad_ready(h, key, stats)``), which updates the parameter on CPU threads
  (the statistics spare it reading a gradient back from SSD for the global norm; on CUDA
  none are computed yet: the host computes them, as it does for a gradient added to an
  earlier micro-batch's);
- after the parameter's last use in backward (and after its gradient left):
  ``lohan::weight_ready(key)``: from there the updated weight may be written;
- the backward graph returns no gradient for it, so ``param.grad`` stays None.
Parameters the optimizer does not own keep normal autograd behaviour.

The report says what the runtime must take on (``offloaded_inputs``: input index -> key;
``forward_order``: keys in the order forward first reads them): the backend binds it once
the pipeline has run. The pass itself registers nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from lohan_compile.graph.aot import grad_input_index, output_descs
from lohan_compile.graph.fxutil import storage_base
from lohan_compile.graph.meta import NodeInfo, Role, get_info, set_info
from lohan_compile.graph.pipeline import CompileFacts, Graphs
from lohan_compile.graph.shapes import definitely_contiguous, hint_int
from lohan_compile.ops import swap_ops

NAME = "offload_grads"

SMALL_GRAD_BYTES = 64 * 1024  # gradients below this travel in buckets
BUCKET_BYTES = 1024 * 1024  # a bucket closes once it reaches this (device bytes held back stay small)


def offload_grads(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    opt = facts.optimizer
    if opt is None:
        return graphs, {"optimizer": None, "offloaded": 0}
    bw = graphs.bw
    out = bw.graph.output_node()
    values = list(out.args[0])
    swap_out, _, wait_tensor = swap_ops()
    ops = torch.ops.lohan
    order = {n: i for i, n in enumerate(bw.graph.nodes)}
    managed = []  # (position in outputs, gradient node, input index, key)
    for j, (value, desc) in enumerate(zip(values, output_descs(bw))):
        idx = grad_input_index(desc)
        if idx is None or not isinstance(value, fx.Node) or facts.inputs[idx].kind != "param":
            continue
        if not facts.inputs[idx].optimizer_owns:
            continue
        managed.append((j, value, idx, facts.inputs[idx].key))
    if not managed:
        return graphs, {"optimizer": type(opt).__name__, "offloaded": 0}
    managed.sort(key=lambda m: order[m[1]])

    swaps = []  # (host node, [(input index, key)], grad nodes)
    for group in _buckets(managed):
        last = group[-1][1]
        grads = [m[1] for m in group]
        for j, *_ in group:
            values[j] = None
        if len(group) == 1:
            with bw.graph.inserting_after(last):
                stats = _stats(bw, last)
                h = bw.graph.call_function(swap_out, (last,))
            h.meta["val"] = _fake_call(swap_out, last.meta["val"])
            _mark(h, "grad_out")
        else:
            with bw.graph.inserting_before(last.next):  # in order, right after the last member
                flats = []
                for g in grads:
                    flat = bw.graph.call_function(torch.ops.aten.reshape.default, (g, [-1]))
                    flat.meta["val"] = _fake_call(lambda v: v.reshape(-1), g.meta["val"])
                    _mark(flat, "grad_bucket")
                    flats.append(flat)
                cat = bw.graph.call_function(torch.ops.aten.cat.default, (flats,))
                cat.meta["val"] = _fake_call(lambda *v: torch.cat(v), *[f.meta["val"] for f in flats])
                _mark(cat, "grad_bucket")
                stats = _stats(bw, *grads)
                h = bw.graph.call_function(swap_out, (cat,))
            h.meta["val"] = _fake_call(swap_out, cat.meta["val"])
            _mark(h, "grad_out")
        swaps.append((h, [(m[2], m[3]) for m in group], stats))
    # each copy is waited for where the next gradient leaves (its copy overlaps that
    # gradient's computation); the last ones just before backward returns
    for n, (h, members, stats) in enumerate(swaps):
        anchor = swaps[n + 1][0] if n + 1 < len(swaps) else out
        with bw.graph.inserting_before(anchor):
            host = bw.graph.call_function(wait_tensor, (h,))
            host.meta["val"] = h.meta["val"]
            _mark(host, "grad_out_wait")
            if len(members) == 1:
                ready = bw.graph.call_function(ops.grad_ready.default, (host, members[0][1], stats))
            else:
                ready = bw.graph.call_function(ops.grads_ready.default, (host, [k for _, k in members], stats))
            ready.meta["val"] = None
            _mark(ready, "grad_ready")
        for idx, key in members:
            with bw.graph.inserting_after(_last_use_of_param(graphs.fw, bw, idx, ready)):
                done = bw.graph.call_function(ops.weight_ready.default, (key,))
                done.meta["val"] = None
                _mark(done, "weight_ready")
    out.args = (tuple(values),)
    bw.recompile()
    fw_order = _wait_for_weights_in_forward(graphs.fw, {idx: key for _, _, idx, key in managed})
    return graphs, {
        "optimizer": type(opt).__name__,
        "offloaded": len(managed),
        "offloaded_inputs": {idx: key for _, _, idx, key in sorted(managed, key=lambda m: m[0])},  # output order
        "forward_order": fw_order,
        "grad_copies": len(swaps),
        "offloaded_grad_bytes": sum(int(m[1].meta["val"].numel()) * m[1].meta["val"].element_size() for m in managed),
    }


def _stats(bw: fx.GraphModule, *grads: fx.Node) -> fx.Node | None:
    """Each gradient's sum of squares and inf/NaN flag (``lohan::grad_stats``, one row per
    gradient, at the insertion point), where they are contiguous CPU tensors (the stand-in; a
    transposed gradient is read in the host tier); None elsewhere."""
    vals = [g.meta["val"] for g in grads]
    if any(v.device.type != "cpu" or not definitely_contiguous(v) for v in vals):
        return None
    rows = []
    for g in grads:
        row = bw.graph.call_function(torch.ops.lohan.grad_stats.default, ([g],))
        row.meta["val"] = _fake_call(lambda v: torch.ops.lohan.grad_stats.default([v]), g.meta["val"])
        _mark(row, "grad_stats")
        rows.append(row)
    if len(rows) == 1:
        return rows[0]
    stats = bw.graph.call_function(torch.ops.aten.stack.default, (rows,))
    stats.meta["val"] = _fake_call(lambda *v: torch.stack(v), *[r.meta["val"] for r in rows])
    _mark(stats, "grad_stats")
    return stats


def _nbytes(node: fx.Node) -> int:
    val = node.meta["val"]
    return hint_int(val.numel()) * val.element_size()


def _buckets(managed: list) -> list[list]:
    """Gradients in production order, grouped: a large one alone, small ones of a dtype together."""
    cap = min(BUCKET_BYTES, sum(_nbytes(m[1]) for m in managed) // 16)
    groups: list[list] = []
    open_: dict[torch.dtype, list] = {}
    for m in managed:
        size = _nbytes(m[1])
        if size >= SMALL_GRAD_BYTES:
            groups.append([m])
            continue
        dtype = m[1].meta["val"].dtype
        run = open_.setdefault(dtype, [])
        run.append(m)
        if sum(_nbytes(x[1]) for x in run) >= cap:
            groups.append(open_.pop(dtype))
    groups.extend(run for run in open_.values() if run)
    # each group leaves after its last member is computed: keep groups in that order
    order = {id(m[1]): i for i, m in enumerate(managed)}
    groups.sort(key=lambda g: order[id(g[-1][1])])
    return groups


def _wait_for_weights_in_forward(fw: fx.GraphModule, keys: dict[int, int]) -> list[int]:
    """Before forward first reads an offloaded weight, ``lohan::weight_wait``: a deferred
    optimizer step may still be updating it. Returns the keys in first-read order."""
    ops = torch.ops.lohan
    order = []
    for n in list(fw.graph.nodes):
        info = get_info(n)
        if n.op != "placeholder" or info is None or info.input_index not in keys:
            continue
        users = [u for u in n.users if u.op == "call_function"]
        if not users:
            continue
        first = min(users, key=lambda u: _position(fw)[u])
        key = keys[info.input_index]
        with fw.graph.inserting_before(first):
            w = fw.graph.call_function(ops.weight_wait.default, (n, key))
        w.meta["val"] = _fake_call_key(ops.weight_wait.default, n.meta["val"], key)
        _mark(w, "weight_wait")
        for u in users:
            u.replace_input_with(n, w)
        order.append((_position(fw)[w], key))
    fw.recompile()
    return [k for _, k in sorted(order)]


def _position(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def _fake_call_key(op: Any, val: torch.Tensor, key: int) -> torch.Tensor:
    with val.fake_mode:
        return op(val, key)


def _mark(node: fx.Node, action: str) -> None:
    set_info(node, NodeInfo(role=Role.BACKWARD, made_by=NAME, action=action))


def _fake_call(op: Any, *vals: torch.Tensor) -> torch.Tensor:
    """The fake value ``op`` gives for ``vals`` (its fake kernel decides the layout)."""
    with vals[0].fake_mode:
        return op(*vals)


def _last_use_of_param(fw: fx.GraphModule, bw: fx.GraphModule, input_index: int, floor: fx.Node) -> fx.Node:
    """The last backward node reading the parameter (or a view of it), and not before ``floor``."""
    order = {n: i for i, n in enumerate(bw.graph.nodes)}
    fw_param = next(
        (n.name for n in fw.graph.nodes if n.op == "placeholder" and getattr(get_info(n), "input_index", None) == input_index),
        None,
    )
    roots = set()
    for n in bw.graph.nodes:
        if n.op != "placeholder":
            continue
        info = get_info(n)
        if info is None:
            continue
        if info.input_index == input_index or (info.saved_input_view and info.storage_of == fw_param):
            roots.add(n)
    last = floor
    for n in bw.graph.nodes:
        if n.op in ("call_function", "placeholder") and storage_base(n) in roots:
            for u in n.users:
                if u.op != "output" and order[u] > order[last]:
                    last = u
    return last
