"""The planning problem of one training graph, read from its forward and backward graphs.

``build_problem`` reads the graphs once and produces a ``Problem``
(``lohan_compile.plan.problem``): the ops in execution order with their estimated
times, every storage the step allocates with when it is allocated and freed, and the
*candidates*: activation storages the forward keeps for backward, with where they are
produced and used and what recomputing them would cost. Everything after this (solver,
simulator, report) works on the ``Problem`` alone and never looks at a graph.

A candidate is recomputed by a chain of forward ops (``_recompute_chain``): its producer and the
cheap ops between it and what backward has (graph inputs, saved values), so a value made by
an elementwise chain from a matmul's output (GELU's ``tanh``) is recomputable from that output
alone; the chain's time is the fused one under Inductor.

See ``lohan_compile.plan.problem`` for the indices and the outputs the user drops.

``profile`` is the one place a graph's ``Problem`` is made for planning (``plan_memory``, and
``partition_graph`` weighing torch's min-cut partition): the op times from the cost model (or
what an earlier plan of the graph measured), the outputs the step drops, and what is resident
on the device when the graph starts.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.fx as fx

from ..plan.problem import Buffer, Candidate, Collective, OpInfo, Problem
from ..hardware import resolve
from ..plan.problem import Rates
from ..plan.profile import HardwareProfile
from .costmodel import CostModel, node_flops
from .fxutil import (ALL_REDUCE, ALL_REDUCE_COALESCED, COLLECTIVE_WAIT, aliased_input, is_dense, is_view,
                     results_bytes, storage_base, tensor_val, view_chain, view_parent)
from .meta import Kind, Role, get_info
from .scratch import estimated, fused_away
from .shapes import nbytes_expr, nbytes_hint


def _recomputable(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False  # a random op recomputed would draw new numbers
    return not target._schema.is_mutable


# a recomputation runs at most this many ops (views not counted)
RECOMPUTE_CHAIN_MAX = 12


@dataclass
class _Chain:
    """How backward rebuilds a saved value: the forward ``nodes`` it runs again (each after
    what it reads, the value's own producer last), reading ``needs`` (keys of saved storages)
    and the graph's inputs."""

    nodes: list[fx.Node]
    needs: list[str]

    def seconds(self, cost: CostModel, seconds_of: Callable[[fx.Node], float], fused: bool) -> float:
        """One op by one (the fx executor; ``seconds_of``: each op's); fused (Inductor): the
        chain reads what it needs and writes its value once, and each op that is no elementwise
        one is a kernel of its own whose result exists."""
        one_by_one = sum(seconds_of(n) for n in self.nodes)
        if not fused or len(self.nodes) == 1:
            return one_by_one
        inside = set(self.nodes)
        read = {a for n in self.nodes for a in n.all_input_nodes if a not in inside}
        materialized = [n for n in self.nodes[:-1] if not _elementwise(n)]
        boundary = (sum(nbytes_hint(v) for a in read if (v := tensor_val(a)) is not None)
                    + sum(_owned_bytes(n) for n in materialized + self.nodes[-1:]))
        flops = sum(node_flops(n) for n in self.nodes)
        return cost.fused_seconds(flops, boundary, 1 + len(materialized), one_by_one)

    def scratch_bytes(self, fused: bool, scratch_of: Callable[[fx.Node], int]) -> int:
        """The most bytes the chain's intermediate results hold at once, each storage until the
        last reader in the chain of it or of a view of it has run, with what an op allocates
        inside itself (``scratch_of``) while it runs; fused (Inductor), elementwise results
        never exist. (The last op's result and scratch are the recomputation's own, which the
        plan holds apart.)"""
        position = {n: i for i, n in enumerate(self.nodes)}
        owner: dict[fx.Node, fx.Node | None] = {}  # the chain node whose storage each one is
        for n in self.nodes:
            parent = n.args[0] if n.target is operator.getitem else aliased_input(n)
            owner[n] = owner.get(parent) if parent is not None else n
        last_read = dict(position)
        for n in self.nodes:
            for u in n.users:
                if u in position and owner[n] is not None:
                    last_read[owner[n]] = max(last_read[owner[n]], position[u])
        held = {n: 0 if fused and _elementwise(n) else _owned_bytes(n) for n in self.nodes[:-1]}
        return max((sum(b for n, b in held.items() if position[n] < i <= last_read[n]) + held.get(node, 0)
                    + (scratch_of(node) if node is not self.nodes[-1] else 0)
                    for i, node in enumerate(self.nodes)), default=0)


def _owned_bytes(node: fx.Node) -> int:
    """The bytes of the storage a node makes: none for a view or a ``getitem`` (its op's)."""
    if is_view(node) or node.target is operator.getitem:
        return 0
    if isinstance(node.meta.get("val"), (list, tuple)):
        return results_bytes(node)
    val = tensor_val(node)
    return nbytes_hint(val) if val is not None else 0


def _elementwise(node: fx.Node) -> bool:
    target = node.target
    return is_view(node) or (isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags)


def _chainable(node: fx.Node, cost: CostModel) -> bool:
    """A forward op a recomputation may run again on the way to the value it rebuilds: cheap
    (a view, or memory-bound: elementwise ops, norms, reductions) and deterministic; a
    ``getitem`` of such an op's results."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and _chainable(source, cost)
    # (aten's own ops: a custom op's or a collective's cost the model does not know)
    if not isinstance(node.target, torch._ops.OpOverload) or node.target.namespace not in ("aten", "prims"):
        return False
    return _recomputable(node) and (is_view(node) or cost.memory_bound(node))


def _ops_in(node: fx.Node) -> int:
    """What a node counts against ``RECOMPUTE_CHAIN_MAX``: views and ``getitem`` nothing."""
    return 0 if is_view(node) or node.target is operator.getitem else 1


def _views_replayable(base: fx.Node, nodes: Iterable[fx.Node], saved_nodes: set[fx.Node],
                      saved_syms: set[fx.Node]) -> bool:
    """Whether every saved view of ``base``'s storage can be made again in backward on top of
    the storage: each view on the way reads nothing but its parent and what forward saves."""
    for v in nodes:
        if v is base or v not in saved_nodes:
            continue
        chain = view_chain(v, base)
        if chain is None:
            return False
        for node in chain:
            parent = view_parent(node)
            if any(a is not parent and a not in saved_nodes and a not in saved_syms for a in node.all_input_nodes):
                return False
    return True


def _recompute_chain(base: fx.Node, key: str, key_of: dict[fx.Node, str | None], saved_nodes: set[fx.Node],
                     saved_syms: set[fx.Node], chainable: Callable[[fx.Node], bool],
                     recomputable: Callable[[fx.Node], bool]) -> _Chain | None:
    """How backward can rebuild ``base`` (None: it cannot). Backward has the graph's inputs and
    the values forward saves; from those it runs again the ops between them and ``base``,
    where these are cheap (``chainable``) and at most ``RECOMPUTE_CHAIN_MAX``. A saved cheap
    value on the way is run again too where the chain can still reach what it needs within
    that many ops, else read as saved: the chain then reads none of the values a
    recomputation of its own could make (GELU's ``tanh`` and the ``add`` after it both rebuilt
    from the matmul's output), so each saved value is recomputed or not on its own. The search
    never holds more than that many ops, so it stays as small as the chain."""
    if not (recomputable(base) or chainable(base)):
        return None
    nodes: list[fx.Node] = []
    needs: list[str] = []
    reached: set[fx.Node] = set()
    # ops in ``nodes``, and ops on the way down that will join them (the base's first)
    count = {"ops": 0, "pending": _ops_in(base)}

    def need(value: fx.Node) -> bool:
        if key_of[value] == key:
            return False
        needs.append(key_of[value])
        return True

    def reach(value: fx.Node) -> bool:
        if value in reached:
            return True
        reached.add(value)
        val = value.meta.get("val")
        if not isinstance(val, (torch.Tensor, tuple, list)):
            return value in saved_syms  # a size: backward has it only if forward saves it
        if isinstance(val, torch.Tensor) and key_of.get(value) is None:
            return True  # a graph input or a view of one
        saved = value in saved_nodes
        if saved and (is_view(value) or not chainable(value)):
            return need(value)  # (a saved view: running it again would rebuild nothing)
        ops = _ops_in(value)
        if not chainable(value) or count["ops"] + count["pending"] + ops > RECOMPUTE_CHAIN_MAX:
            return saved and need(value)
        before = len(nodes), len(needs), set(reached), count["ops"]
        count["pending"] += ops
        reached_inputs = all(reach(a) for a in value.all_input_nodes)
        count["pending"] -= ops
        if reached_inputs:
            nodes.append(value)
            count["ops"] += ops
            return True
        if not saved:
            return False
        del nodes[before[0]:], needs[before[1]:]
        reached.clear()
        reached.update(before[2])
        count["ops"] = before[3]
        return need(value)

    if not all(reach(a) for a in base.all_input_nodes):
        return None
    return _Chain(nodes + [base], list(dict.fromkeys(needs)))


_COLLECTIVES = (ALL_REDUCE, ALL_REDUCE_COALESCED)


def _collective_waits(bw: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    """The collectives of a backward (``passes/reduce_grads.py``) in graph order, each with the
    waits of its results (an ``all_reduce_coalesced``'s through its ``getitem`` nodes)."""
    out = []
    for n in bw.graph.nodes:
        if n.op != "call_function" or n.target not in _COLLECTIVES:
            continue
        results = [u for u in n.users if u.target is operator.getitem] if n.target is ALL_REDUCE_COALESCED else [n]
        waits = [w for r in results for w in r.users if w.target is COLLECTIVE_WAIT]
        if waits:
            out.append((n, waits))
    return out


def _hold_collective_buffers(bw: fx.GraphModule, index: dict[fx.Node, int], key_of: dict[fx.Node, str | None],
                             last_use: dict[str, int]) -> None:
    """A collective's buffers (a data-parallel gradient's average, ``passes/reduce_grads.py``)
    are planned as held until the next collective's first wait (the last one's until backward
    ends): the process group's worker thread keeps its own reference until it has finished with
    the collective, and drops it after the graph's wait may already have returned; the next
    wait returns once the worker has gone on to the next collective."""
    collectives = _collective_waits(bw)
    end = max(index.values(), default=0)
    for i, (_, waits) in enumerate(collectives):
        until = min(index[w] for w in collectives[i + 1][1]) if i + 1 < len(collectives) else end
        for wait in waits:
            key = key_of.get(wait)
            if key is not None:
                last_use[key] = max(last_use.get(key, -1), until)


def build_problem(fw: fx.GraphModule, bw: fx.GraphModule, cost: CostModel,
                  scratch: Callable[[fx.Node], int] | None = None,
                  fused: Callable[[str, fx.Node], bool] | None = None, world: int = 1) -> Problem:
    """``scratch(node)``: the device bytes the op allocates inside itself (``graph/scratch.py``);
    None: none. ``fused(phase, node)``: the executor fuses the node's result into its readers
    (Inductor): it never exists in memory, and its buffer has no bytes. ``world``: the devices
    a data-parallel step's collectives run among."""
    ops: list[OpInfo] = []
    index: dict[fx.Node, int] = {}
    for phase, gm in (("fw", fw), ("bw", bw)):
        for n in gm.graph.nodes:
            if n.op == "call_function":
                index[n] = len(ops)
                ops.append(OpInfo(n.name, cost.node_seconds(n), phase, scratch(n) if scratch is not None else 0,
                                  results_bytes(n)))
    n_fw = sum(1 for o in ops if o.phase == "fw")

    key_of: dict[fx.Node, str | None] = {}
    buffers: dict[str, Buffer] = {}
    last_use: dict[str, int] = {}
    survives: set[str] = set()

    def add_buffer(key: str, nbytes: int, alloc: int) -> None:
        if key not in buffers:
            buffers[key] = Buffer(key, nbytes, alloc, None)

    # forward: each storage belongs to the node that created it; views share it,
    # and views of inputs (parameters, ...) own nothing
    for n in fw.graph.nodes:
        if n.op == "placeholder":
            key_of[n] = None
        elif n.op == "call_function":
            base = storage_base(n)
            if base.op == "placeholder":
                key_of[n] = None
                continue
            key = f"fw:{base.name}"
            key_of[n] = key
            val = tensor_val(base)
            if val is not None:
                add_buffer(key, 0 if fused is not None and fused("fw", base) else nbytes_hint(val), index[base])
    # backward: saved activations continue their forward storage; tangents arrive at its start
    for n in bw.graph.nodes:
        info = get_info(n)
        if n.op == "placeholder":
            if info is not None and info.role is Role.SAVED and not info.saved_input_view:
                key_of[n] = f"fw:{info.storage_of}"
            elif info is not None and info.role is Role.TANGENT and tensor_val(n) is not None:
                key_of[n] = f"bw:{n.name}"
                add_buffer(key_of[n], nbytes_hint(tensor_val(n)), n_fw)
            else:
                key_of[n] = None
        elif n.op == "call_function":
            base = storage_base(n)
            if base.op == "placeholder":
                key_of[n] = key_of.get(base)
                continue
            key = f"bw:{base.name}"
            key_of[n] = key
            val = tensor_val(base)
            if val is not None:
                add_buffer(key, 0 if fused is not None and fused("bw", base) else nbytes_hint(val), index[base])

    for gm in (fw, bw):
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            for a in n.all_input_nodes:
                k = key_of.get(a)
                if k is not None:
                    last_use[k] = max(last_use.get(k, -1), index[n])
            k = key_of.get(n)
            if k is not None:
                last_use[k] = max(last_use.get(k, -1), index[n])

    _hold_collective_buffers(bw, index, key_of, last_use)

    saved_keys: dict[str, fx.Node] = {}
    saved_nodes: set[fx.Node] = set()
    fw_out = fw.graph.output_node()
    saved_syms = {
        v for v, kind in zip(fw_out.args[0], (getattr(get_info(fw_out), "outputs", ()) or ()))
        if isinstance(v, fx.Node) and kind.value == "saved" and not isinstance(v.meta.get("val"), torch.Tensor)
    }
    out_info = get_info(fw_out)
    kinds = out_info.outputs if out_info is not None else ()
    outputs_at: dict[int, str] = {}
    for pos, (value, kind) in enumerate(zip(fw_out.args[0], kinds)):
        if not isinstance(value, fx.Node):
            continue
        k = key_of.get(value)
        if k is None:
            continue
        if kind.value == "saved":
            saved_keys.setdefault(k, storage_base(value))
            saved_nodes.add(value)
        else:
            survives.add(k)  # the user holds forward outputs (logits, the loss) through the step
            if kind in (Kind.USER_OUTPUT, Kind.MUTATION):
                outputs_at[pos] = k
    grads = set()
    for value in bw.graph.output_node().args[0]:
        if isinstance(value, fx.Node) and key_of.get(value) is not None:
            grads.add(key_of[value])  # gradients outlive the backward graph
    survives |= grads
    # a dropped output's storage goes when forward ends, or after backward's last read of it
    user_outputs = {
        pos: (k, max(last_use.get(k, n_fw - 1), n_fw - 1)) for pos, k in outputs_at.items() if k not in grads
    }

    for key, buf in buffers.items():
        buf.free = None if key in survives else last_use.get(key, buf.alloc)

    # the nodes of each storage (the value and its views), by phase
    fw_nodes_of: dict[str, list[fx.Node]] = {}
    for n in fw.graph.nodes:
        if n.op == "call_function" and key_of.get(n) is not None:
            fw_nodes_of.setdefault(key_of[n], []).append(n)
    bw_nodes_of: dict[str, list[fx.Node]] = {}
    for n in bw.graph.nodes:
        if n.op in ("placeholder", "call_function") and key_of.get(n) is not None:
            bw_nodes_of.setdefault(key_of[n], []).append(n)
    candidates = []
    chainable = functools.cache(lambda node: _chainable(node, cost))  # (asked for a node by many chains)
    for key, base in saved_keys.items():
        if key in survives or key not in buffers:
            continue
        uses_fw = [index[u] for n in fw_nodes_of.get(key, ()) for u in n.users if u in index]
        uses_bw = [
            index[u]
            for n in bw_nodes_of.get(key, ())
            for u in n.users
            if u in index and key_of.get(u) != key  # a view of it is not a use of its data
        ]
        if not uses_bw:
            continue
        produced = buffers[key].alloc
        # moved or recomputed, the storage's saved views are made again in backward from what
        # forward saves (apply_plan): a view of sizes forward does not save can only be kept
        movable = _views_replayable(base, fw_nodes_of.get(key, ()), saved_nodes, saved_syms)
        chain = (_recompute_chain(base, key, key_of, saved_nodes, saved_syms, chainable, _recomputable)
                 if movable else None)
        recompute = None if chain is None else chain.seconds(cost, lambda n: ops[index[n]].seconds, fused is not None)
        candidates.append(
            Candidate(
                key=key,
                name=base.name,
                bytes=buffers[key].bytes,
                produced_at=produced,
                last_fw_use=max(uses_fw, default=produced),
                first_bw_use=min(uses_bw),
                last_bw_use=max(uses_bw),
                recompute_seconds=recompute,
                recompute_needs=tuple(chain.needs) if chain is not None else (),
                swappable=movable and is_dense(tensor_val(base)),
                bytes_expr=nbytes_expr(tensor_val(base)),
                recompute_ops=tuple(n.name for n in chain.nodes) if chain is not None else (),
                recompute_scratch_bytes=chain.scratch_bytes(fused is not None, scratch or (lambda n: 0)) if chain is not None else 0,
            )
        )
    input_uses, grad_at, input_bytes = _input_facts(fw, bw, index)
    params = tuple(sorted(
        info.input_index for n in fw.graph.nodes
        if n.op == "placeholder" and (info := get_info(n)) is not None and info.role is Role.PARAM
        and info.input_index is not None
    ))
    grad_key = {}
    for n in bw.graph.nodes:
        info = get_info(n)
        if n.op == "call_function" and info is not None and info.grad_of:
            for idx in info.grad_of:
                grad_key[idx] = key_of.get(n) or f"bw:{storage_base(n).name}"
    fw_seconds = sum(o.seconds for o in ops[:n_fw])
    return Problem(
        input_uses=input_uses,
        grad_at=grad_at,
        input_bytes=input_bytes,
        params=params,
        grad_key=grad_key,
        ops=ops,
        n_fw=n_fw,
        buffers=buffers,
        candidates=candidates,
        fw_seconds=fw_seconds,
        bw_seconds=sum(o.seconds for o in ops[n_fw:]),
        user_outputs=user_outputs,
        saved_outputs=frozenset(pos for pos, (k, _) in user_outputs.items() if k in saved_keys),
        collectives=_collectives(bw, index, world),
    )


def _collectives(bw: fx.GraphModule, index: dict[fx.Node, int], world: int) -> list[Collective]:
    """The all-reduces of a data-parallel backward (``reduce_grads``), each with its first wait:
    in a ring all-reduce each of ``world`` devices sends (and receives) 2 (world - 1) / world
    times the tensors' bytes."""
    if world <= 1:
        return []
    out = []
    for n, waits in _collective_waits(bw):
        tensors = n.meta["val"] if isinstance(n.meta["val"], (list, tuple)) else [n.meta["val"]]
        sent = 2 * (world - 1) * sum(nbytes_hint(t) for t in tensors) // world
        out.append(Collective(f"bw:{n.name}", index[n], min(index[w] for w in waits), sent))
    return out


def _input_facts(
    fw: fx.GraphModule, bw: fx.GraphModule, index: dict[fx.Node, int]
) -> tuple[dict[int, list[int]], dict[int, int], dict[int, int]]:
    """Which ops read each example input (through views too), and where each gradient is made."""
    uses: dict[int, set[int]] = {}
    nbytes: dict[int, int] = {}
    input_of: dict[str, int] = {}  # forward placeholder name -> example-input index
    for n in fw.graph.nodes:
        info = get_info(n)
        if n.op == "placeholder" and info is not None and info.input_index is not None:
            input_of[n.name] = info.input_index
            val = tensor_val(n)
            if val is not None:
                nbytes[info.input_index] = nbytes_hint(val)

    def walk(node: fx.Node, idx: int) -> None:
        for u in node.users:
            if u in index:
                uses.setdefault(idx, set()).add(index[u])
            if u.op == "call_function" and is_view(u):
                walk(u, idx)  # a view of the input: its readers read the input

    for n in fw.graph.nodes:
        if n.name in input_of and n.op == "placeholder":
            walk(n, input_of[n.name])
    for n in bw.graph.nodes:
        info = get_info(n)
        if n.op != "placeholder" or info is None:
            continue
        if info.saved_input_view and info.storage_of in input_of:
            walk(n, input_of[info.storage_of])
        elif info.input_index is not None and info.role in (Role.PARAM, Role.INPUT, Role.BUFFER):
            walk(n, info.input_index)  # an input saved as it is
    grad_at: dict[int, int] = {}
    for n in bw.graph.nodes:
        info = get_info(n)
        if info is None or not info.grad_of or n.op != "call_function":
            continue
        base = storage_base(n)
        for idx in info.grad_of:
            grad_at[idx] = index.get(base, index.get(n, max(index.values(), default=0)))
    return {k: sorted(v) for k, v in uses.items()}, grad_at, nbytes


@dataclass
class Profile:
    """A graph's planning problem, the links' rates and the hardware they come from."""

    problem: Problem
    rates: Rates
    hardware: HardwareProfile


def resident_input_bytes(fw: fx.GraphModule) -> int:
    """Device bytes of the graph's own inputs (parameters, buffers, the batch)."""
    return sum(nbytes_hint(tensor_val(n)) for n in fw.graph.nodes if n.op == "placeholder" and tensor_val(n) is not None)


# outputs at least this large are planned released when forward ends where no plan fits holding
# them (``CompileFacts.assume_outputs_dropped``)
ASSUME_DROPPED_MIN_BYTES = 1 << 20


def droppable_outputs(problem: Problem) -> frozenset[int]:
    """The forward's outputs a first plan may release (when forward ends; one saved for
    backward, after backward's last read of it) where none fits holding them: those of at
    least ``ASSUME_DROPPED_MIN_BYTES``."""
    return frozenset(pos for pos, (key, _) in problem.user_outputs.items()
                     if key in problem.buffers and problem.buffers[key].bytes >= ASSUME_DROPPED_MIN_BYTES)


def profile(fw: fx.GraphModule, bw: fx.GraphModule, facts) -> Profile:
    """The ``Profile`` of a partition whose saved values are classified (``classify_saved``),
    planned with what ``facts`` (a ``CompileFacts``) says: hardware, measured op times, outputs
    dropped before backward, device bytes held outside the graph and above an earlier plan."""
    hw = resolve(facts.options.hardware)
    cost = CostModel(hw, facts.measured_seconds)
    scratch = facts.op_scratch or estimated(facts.options.executor)
    fused = None
    if facts.options.executor == "inductor":
        def fused(phase: str, node: fx.Node) -> bool:
            key = (phase, node.name)
            if key in facts.materialized or not fused_away(node):
                return False
            if facts.assume_fused or key in facts.fused:
                return True
            facts.unseen_fused.add(key)  # (held: the compile says so where no plan fits)
            return False
    world = facts.data_parallel.world if facts.data_parallel is not None else 1
    problem = build_problem(fw, bw, cost, scratch, fused, world)
    dropped = facts.dropped_outputs
    if facts.assume_outputs_dropped:  # (the large ones: a loss or a metric the user keeps anyway)
        dropped = droppable_outputs(problem)
    problem = (problem.without_outputs(dropped).with_outside(facts.outside_bytes)
               .with_scratch(facts.segment_scratch))
    problem.resident_bytes = resident_input_bytes(fw) + facts.resident_outside_bytes + facts.executor_excess_bytes
    rates = Rates(
        d2h_seconds_per_byte=cost.transfer_seconds(1, "d2h"),
        h2d_seconds_per_byte=cost.transfer_seconds(1, "h2d"),
        sharing=hw.sharing,
        net_seconds_per_byte=1 / hw.allreduce_bandwidth,
    )
    return Profile(problem, rates, hw)
