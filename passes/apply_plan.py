"""apply_plan: rewrite the forward and backward graphs as the plan says.

Requires: the plan of ``plan_memory`` (its report), forward and backward
graphs with roles and saved storages.
Ensures:
- RECOMPUTE: forward no longer saves the storage; backward runs again the
  candidate's ``recompute_ops`` (its producer, and the cheap forward ops
  between it and what backward already has: graph inputs and other saved
  values, swapped ones included, then from the swapped-in storage, after its
  wait), just before the first backward use, and rebuilds any saved views
  of it from the recomputed value.
- SWAP: forward copies the storage to the host tier right after it is
  produced (``lohan::swap_out``) and waits for the copy after the planned
  release point, saving the host tensor instead; backward issues
  ``lohan::swap_in`` before the planned prefetch point and waits
  (``lohan::wait_tensor``, which returns the tensor, so order is a data edge)
  just before the first use. Saved views are rebuilt from the swapped-in
  storage.
- every inserted node records ``made_by="apply_plan"`` and the action.
Forward and backward still agree on the saved values (``SavedValues``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.fx as fx

from lohan_compile.graph.fxutil import is_view, storage_base, view_chain, view_parent
from lohan_compile.graph.meta import NodeInfo, Role, get_info, set_info
from lohan_compile.graph.pipeline import CompileFacts, Graphs, NodeError
from lohan_compile.ops import with_rows_per_chunk
from lohan_compile.plan.problem import Action, OpRef, Plan, Problem, Transfer
from lohan_compile.plan.program import program_for
from lohan_compile.graph.saved import SavedValues
from lohan_compile.graph.shapes import expr_of

NAME = "apply_plan"


def _set_rows_per_chunk(fw: fx.GraphModule, bw: fx.GraphModule, chosen: dict[tuple[str, str], int]) -> None:
    """The chunked loss's ops with the rows per chunk the plan chose (first: a recomputation
    copies the op as it is)."""
    for phase, gm in (("fw", fw), ("bw", bw)):
        changed = False
        for node in gm.graph.nodes:
            if (phase, node.name) in chosen:
                node.args = with_rows_per_chunk(node.target._opname, node.args, chosen[(phase, node.name)])
                changed = True
        if changed:
            gm.recompile()


def apply_plan(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    report = facts.pass_reports.get("plan_memory") if facts.pass_reports else None
    if report is None:
        raise RuntimeError("apply_plan needs the plan of plan_memory")
    plan: Plan = report["plan"]
    problem: Problem = report["problem"]
    fw, bw = graphs.fw, graphs.bw
    _set_rows_per_chunk(fw, bw, report.get("loss_rows_per_chunk") or {})
    # resolve the plan's op indices to nodes before the graphs change
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    bw_nodes = {n.name: n for n in bw.graph.nodes}
    node_at = [
        (fw_nodes if op.phase == "fw" else bw_nodes)[op.name] for op in problem.ops
    ]
    recomputed = swapped = moved = 0
    transfers: dict[tuple[str, str], fx.Node] = {}
    bases = functools.partial(_forward_base, {})  # storage_base of forward values, remembered
    host_vals: dict[tuple, torch.Tensor] = {}  # fake values of host copies, by shape and dtype
    saved = SavedValues(fw, bw)  # edited in place by every rewrite below
    # Recomputations first: one reads saved values (``recompute_needs``) through their
    # backward placeholders, and a swap of such a value then hands every reader of them,
    # the recomputation included, the swapped-in storage or a view replayed on it. Swapped
    # first, the value would no longer be saved, and the recomputation would find nothing.
    for c in problem.candidates:
        if plan.decisions[c.key].action is Action.RECOMPUTE:
            _recompute(saved, [fw_nodes[name] for name in c.recompute_ops or (c.name,)], bases)
            recomputed += 1
    for c in problem.candidates:
        decision = plan.decisions[c.key]
        if decision.action is Action.SWAP:
            release = node_at[max(decision.release_at or c.last_fw_use, c.last_fw_use)]
            prefetch = node_at[decision.prefetch_at] if decision.prefetch_at is not None else None
            out, host, dev, ready = _swap(saved, fw_nodes[c.name], release, prefetch, bases, host_vals)
            transfers[("Issue", Transfer("swap_out", c.key))] = out
            transfers[("Wait", Transfer("swap_out", c.key))] = host
            transfers[("Issue", Transfer("swap_in", c.key))] = dev
            transfers[("Wait", Transfer("swap_in", c.key))] = ready
            swapped += 1
    if transfers:
        moved = _order_as_planned(program_for(problem, plan.decisions, report["rates"]), node_at, transfers, bw)
    fw.graph.eliminate_dead_code()
    fw.recompile()
    bw.recompile()
    # moved: recomputations put after the wait of a swapped value they read
    return graphs, {"recomputed": recomputed, "swapped": swapped, "recomputations_after_waits": moved}


def _order_as_planned(
    program: list, node_at: list[fx.Node], transfers: dict[tuple[str, Transfer], fx.Node], bw: fx.GraphModule
) -> int:
    """Put the transfer nodes in exactly the plan's order: between two consecutive ops of
    the program, its issues and waits go right after the first op, in program order.
    (Prefetches into backward before its first op go right after backward's placeholders.)
    Nodes apply_plan built on a waited value (replayed views, recomputations) sit before
    the op that needs them, so they stay after the wait they read. Returns how many
    recomputations moved after the wait of a value they read (``_views_after_their_waits``)."""
    last_placeholder = [n for n in bw.graph.nodes if n.op == "placeholder"][-1]
    cursor: fx.Node | None = None
    pending: list[fx.Node] = []

    def flush(next_op: fx.Node | None) -> None:
        nonlocal cursor
        for n in pending:
            if cursor is None or cursor.graph is not n.graph:
                cursor = last_placeholder if n.graph is bw.graph else None
            if cursor is None:
                raise RuntimeError(f"no place for {n.name} before the first forward op")
            cursor.append(n)
            cursor = n
        pending.clear()

    for op in program:
        kind = type(op).__name__
        if kind == "Compute":
            if not isinstance(op.name, OpRef):
                continue  # a recomputation: not a node of its own in this order
            flush(node_at[op.name.index])
            cursor = node_at[op.name.index]
        elif (kind, getattr(op, "name", None)) in transfers:
            pending.append(transfers[(kind, op.name)])
    flush(None)
    return _views_after_their_waits(bw, set(transfers.values()))


def _views_after_their_waits(bw: fx.GraphModule, transfers: set[fx.Node]) -> int:
    """The plan counts a view of a swapped tensor as no use of its data, so its wait may be
    planned after a backward view that reads it (a ``transpose`` right before the matmul
    that is the real first use). Likewise a recomputation that reads it: the plan recomputes
    just before the first real use of the recomputed value, where ``_recompute`` put it before
    the value's first reader, a view. Move such views and recomputations (and what reads them
    before the wait) right after the wait, in their order; anything else that reads a value
    before it exists is a planning error. Returns how many recomputations moved."""
    recomputations = 0
    for wait in [n for n in bw.graph.nodes if n in transfers and n.target is torch.ops.lohan.wait_tensor.default]:
        early: set[fx.Node] = set()
        frontier = [wait]
        while frontier:
            node = frontier.pop()
            for u in node.users:
                if u < wait and u not in early:  # (fx nodes compare by graph order)
                    if not is_view(u) and not _recomputed_here(u):
                        raise NodeError(u, f"reads {wait.name} before the plan waits for it")
                    early.add(u)
                    frontier.append(u)
        cursor = wait
        for n in sorted(early):
            cursor.append(n)
            cursor = n
        recomputations += sum(1 for n in early if _recomputed_here(n))
    return recomputations


def _recomputed_here(node: fx.Node) -> bool:
    info = get_info(node)
    return info is not None and info.made_by == NAME and info.action == "recompute"


def _mark(node: fx.Node, role: Role, action: str, storage: str | None = None) -> None:
    set_info(node, NodeInfo(role=role, made_by=NAME, action=action, storage_of=storage))


def _saved_with_storage(saved: SavedValues, base: fx.Node, bases: Callable[[fx.Node], fx.Node | None]) -> list[tuple[int, fx.Node, fx.Node]]:
    """(slot, forward value, backward placeholder) of every saved tensor sharing ``base``'s storage.
    ``bases`` remembers ``storage_base`` of forward values for the whole pass (asked again for every
    candidate, the view chains of all saved values would be walked once per candidate)."""
    return saved.grouped_by(bases, base)


def _forward_base(bases: dict[fx.Node, fx.Node], v: fx.Node) -> fx.Node | None:
    """The storage a forward value is a view of (None for a graph input's: never planned)."""
    if v.op == "placeholder":
        return None
    if v not in bases:
        bases[v] = storage_base(v)
    return bases[v]


def _first_user(bw: fx.GraphModule, placeholders: list[fx.Node]) -> fx.Node:
    users = [u for p in placeholders for u in p.users]
    return min(users) if users else bw.graph.output_node()  # (fx nodes compare by graph order)


def _replay_view(bw: fx.GraphModule, base_value: fx.Node, view: fx.Node, base: fx.Node, saved: SavedValues) -> fx.Node:
    """Rebuild the forward view chain base -> ... -> view on top of ``base_value`` in backward.
    Other arguments of the views (symbolic sizes) are taken from what forward saves."""
    chain = view_chain(view, base)
    if chain is None:
        raise NodeError(view, "saved view does not lead back to its storage")
    current = base_value
    for v in chain:
        src = view_parent(v)

        def in_bw(a: fx.Node, src=src, cur=current) -> fx.Node:
            if a is src:
                return cur
            p = saved.in_backward(a)
            if p is None:
                raise NodeError(v, f"replaying this view in backward needs {a.name}, which forward does not save")
            return p

        new = bw.graph.call_function(v.target, *fx.node.map_arg((v.args, v.kwargs), in_bw))
        _copy_meta(new, v)
        _mark(new, Role.BACKWARD, "view")
        current = new
    return current


def _remove_slots(saved: SavedValues, placeholders: list[fx.Node]) -> None:
    """Stop saving the values whose backward placeholders are given (now unused)."""
    doomed = set(placeholders)
    for k in reversed([k for k, p in enumerate(saved.bw_tensors) if p in doomed]):
        saved.remove(k)


def _recompute(saved: SavedValues, chain: list[fx.Node], bases: Callable[[fx.Node], fx.Node | None]) -> None:
    """Backward runs ``chain`` (forward ops, the saved storage's producer last: the candidate's
    ``recompute_ops``) again before the first use of what forward saved of the storage, on
    what backward has (saved values, graph inputs), and reads the result instead."""
    bw = saved.bw
    base = chain[-1]
    slots = _saved_with_storage(saved, base, bases)
    if not slots:
        raise NodeError(base, "planned for recomputation but not saved for backward")
    anchor = _first_user(bw, [p for _, _, p in slots])
    in_bw: dict[fx.Node, fx.Node] = {}

    def have(a: fx.Node) -> fx.Node:
        """What backward has of a forward value the chain reads from outside itself."""
        p = saved.in_backward(a)
        if p is None and not isinstance(a.meta.get("val"), torch.Tensor):
            raise NodeError(base, f"recomputation needs the size {a.name}, which forward does not save")
        if p is None:
            root = storage_base(a)
            if root.op != "placeholder":
                raise NodeError(base, f"recomputation needs {a.name}, which backward does not have")
            # a graph input (or a view of one): save the input itself and replay the view
            root_in_bw = next((p for v, p in saved.tensor_pairs() if v is root), None)
            if root_in_bw is None:
                root_in_bw = saved.add(root, f"{root.name}_for_recompute")
            p = root_in_bw if a is root else _replay_view(bw, root_in_bw, a, root, saved)
        return p

    with bw.graph.inserting_before(anchor):
        for node in chain:
            for a in node.all_input_nodes:
                if a not in in_bw:
                    in_bw[a] = have(a)
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: in_bw[a])
            value = bw.graph.call_function(node.target, args, kwargs)
            _copy_meta(value, node)
            _mark(value, Role.FORWARD, "recompute", node.name)
            in_bw[node] = value
        replacements = [(p, value if v is base else _replay_view(bw, value, v, base, saved)) for _, v, p in slots]
    for p, new in replacements:
        p.replace_all_uses_with(new)
    _remove_slots(saved, [p for p, _ in replacements])


def _swap(saved: SavedValues, base: fx.Node, release: fx.Node, prefetch: fx.Node | None,
          bases: Callable[[fx.Node], fx.Node | None], host_vals: dict[tuple, torch.Tensor]) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
    ops = torch.ops.lohan
    fw, bw = saved.fw, saved.bw
    slots = _saved_with_storage(saved, base, bases)
    if not slots:
        raise NodeError(base, "planned for swapping but not saved for backward")
    first = _first_user(bw, [p for _, _, p in slots])
    if prefetch is None or prefetch > first:  # (fx nodes compare by graph order)
        prefetch = first
    # forward: copy out right after the producer; wait for the copy after the release point
    with fw.graph.inserting_after(base):
        out = fw.graph.call_function(ops.swap_out.default, (base,))
        out.meta["val"] = _host_like(base.meta["val"], host_vals)
        _mark(out, Role.FORWARD, "swap_out", base.name)
    with fw.graph.inserting_after(out if release is base else release):
        host = fw.graph.call_function(ops.wait_tensor.default, (out,))
        host.meta["val"] = out.meta["val"]
        _mark(host, Role.FORWARD, "swap_out_wait", base.name)
    # forward saves the host copy; backward rebuilds saved views of the storage
    base_slot = next((k for k, v, _ in slots if v is base), None)
    if base_slot is not None:
        saved.replace_forward_value(base_slot, host)
        host_in_bw = saved.bw_tensors[base_slot]
    else:
        host_in_bw = saved.add(host, f"{base.name}_host")
    host_in_bw.meta["val"] = host.meta["val"]
    set_info(host_in_bw, NodeInfo(role=Role.SAVED, made_by=NAME, storage_of=base.name))
    old_users = list(host_in_bw.users)
    # backward: issue the copy in at the prefetch point, wait just before the first use
    with bw.graph.inserting_before(prefetch):
        # the device the value was on (a GPU's); on the CPU stand-in swap_in's default
        target = base.meta["val"].device
        args = (host_in_bw,) if target.type in ("cpu", "meta") else (host_in_bw, target)
        dev = bw.graph.call_function(ops.swap_in.default, args)
        _copy_meta(dev, base)
        _mark(dev, Role.BACKWARD, "swap_in", base.name)
    with bw.graph.inserting_before(first):
        ready = bw.graph.call_function(ops.wait_tensor.default, (dev,))
        _copy_meta(ready, base)
        _mark(ready, Role.BACKWARD, "swap_in_wait", base.name)
        views = [(p, _replay_view(bw, ready, v, base, saved)) for _, v, p in slots if v is not base]
    for u in old_users:
        u.replace_input_with(host_in_bw, ready)
    for p, new in views:
        p.replace_all_uses_with(new)
    _remove_slots(saved, [p for p, _ in views])
    return out, host, dev, ready


def _copy_meta(dst: fx.Node, src: fx.Node) -> None:
    dst.meta.update({k: v for k, v in src.meta.items() if k in ("val", "tensor_meta", "stack_trace")})


def _host_like(val: torch.Tensor, made: dict[tuple, torch.Tensor]) -> torch.Tensor:
    """Fake value of a host-tier copy: same shape and dtype, contiguous, on the CPU. Copies of
    the same shape share one (as a copy's nodes share theirs): a fake tensor with symbolic
    sizes takes milliseconds to make, and a deep model swaps the same shapes in every layer."""
    key = (tuple(expr_of(s) for s in val.shape), val.dtype)
    if key not in made:
        made[key] = val.new_empty(val.shape, device="cpu")
    return made[key]
