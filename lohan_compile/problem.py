"""The planning problem of one training graph, as plain data.

``build_problem`` reads the forward and backward graphs once and produces a
``Problem``: the ops in execution order with their estimated times, every
storage the step allocates with when it is allocated and freed, and the
*candidates*: activation storages the forward keeps for backward, with
where they are produced and used and what recomputing them would cost.
Everything after this (solver, simulator, report) works on the ``Problem``
alone and never looks at a graph.

Indices: ops are numbered in execution order, forward first (``0 ..
n_fw-1``), then backward (``n_fw ..``). A storage is allocated just before
its ``alloc`` op and freed just after its ``free`` op (``None``: it outlives
the step: gradients, the user's outputs).

The forward's outputs are assumed held by the user through the step (the
loss, logits). Often they are not: ``model(**batch).loss.backward()`` drops a
Hugging Face model's logits and key/value cache before backward starts, and
AOTAutograd drops the new value of a mutated input once it has copied it
back. The runtime sees which outputs are gone when backward starts, and
``Problem.without_outputs`` frees those at the end of forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy
import torch
import torch.fx as fx

from .costmodel import CostModel
from .fxutil import is_dense, is_view, storage_base, tensor_val
from .meta import Kind, Role, get_info
from .shapes import nbytes_expr, nbytes_hint


@dataclass(frozen=True)
class OpInfo:
    name: str
    seconds: float
    phase: str  # "fw" or "bw"


@dataclass
class Buffer:
    key: str
    bytes: int
    alloc: int
    free: int | None


@dataclass(frozen=True)
class Candidate:
    key: str  # the storage (its Buffer key)
    name: str  # the forward node that owns it
    bytes: int
    produced_at: int
    last_fw_use: int
    first_bw_use: int
    last_bw_use: int
    recompute_seconds: float | None  # None: cannot be recomputed (random op, mutation, ...)
    recompute_needs: tuple[str, ...] = ()  # candidate keys its recomputation reads
    swappable: bool = True
    bytes_expr: sympy.Expr | None = None  # ``bytes`` as a possibly symbolic expression


@dataclass(frozen=True)
class Fetch:
    """A streamed parameter brought to the device for one phase: allocated and copied in
    (host -> device) when issued, waited for before ``first_use``, freed after ``last_use``."""

    input_index: int
    phase: str  # "fw" or "bw"
    bytes: int
    first_use: int
    last_use: int
    issue_at: int | None = None  # the op before which the fetch is issued (None: first_use)

    @property
    def key(self) -> str:
        return f"param:{self.input_index}:{self.phase}"


@dataclass
class Problem:
    ops: list[OpInfo]
    n_fw: int
    buffers: dict[str, Buffer]
    candidates: list[Candidate]
    resident_bytes: int = 0  # device bytes held outside this graph when it starts (params, ...)
    fw_seconds: float = 0.0
    bw_seconds: float = 0.0
    # the backend's example inputs (parameters, user inputs) by index: the ops that read each
    # (directly or through a view; forward and backward), and the op that makes its gradient
    input_uses: dict[int, list[int]] = field(default_factory=dict)
    grad_at: dict[int, int] = field(default_factory=dict)
    input_bytes: dict[int, int] = field(default_factory=dict)
    params: tuple[int, ...] = ()  # which example inputs are parameters
    grad_key: dict[int, str] = field(default_factory=dict)  # input index -> its gradient's buffer
    # streamed parameters (not resident: ``resident_bytes`` leaves them out), fetched per phase
    fetches: list[Fetch] = field(default_factory=list)
    # forward outputs the user (or AOTAutograd's runtime) receives, by position in the forward
    # graph's outputs: (their storage's buffer, the op after which it is freed if they are
    # dropped before backward); outputs that are views of inputs or gradients are not here
    user_outputs: dict[int, tuple[str, int]] = field(default_factory=dict)
    dropped_outputs: frozenset[int] = frozenset()  # of those, the ones planned as dropped
    # of those, the ones whose storage forward also saves for backward: that it is still alive
    # when backward starts says nothing of whether the user holds them
    saved_outputs: frozenset[int] = frozenset()

    def candidate(self, key: str) -> Candidate:
        for c in self.candidates:
            if c.key == key:
                return c
        raise KeyError(key)

    def without_outputs(self, dropped: frozenset[int]) -> "Problem":
        """This problem with the forward outputs at positions ``dropped`` released when forward
        ends (seen gone when backward started) and the others held through the step; a
        storage goes only when every output of it is dropped. ``self`` is unchanged."""
        dropped = frozenset(dropped) & frozenset(self.user_outputs)
        held = {key for pos, (key, _) in self.user_outputs.items() if pos not in dropped}
        buffers = dict(self.buffers)
        for key, free in self.user_outputs.values():
            if key in buffers:
                buffers[key] = replace(buffers[key], free=None if key in held else free)
        return replace(self, buffers=buffers, dropped_outputs=dropped)


def _recomputable(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False  # a random op recomputed would draw new numbers
    return not target._schema.is_mutable


def build_problem(fw: fx.GraphModule, bw: fx.GraphModule, cost: CostModel) -> Problem:
    ops: list[OpInfo] = []
    index: dict[fx.Node, int] = {}
    for phase, gm in (("fw", fw), ("bw", bw)):
        for n in gm.graph.nodes:
            if n.op == "call_function":
                index[n] = len(ops)
                ops.append(OpInfo(n.name, cost.node_seconds(n), phase))
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
                add_buffer(key, nbytes_hint(val), index[base])
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
                add_buffer(key, nbytes_hint(val), index[base])

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

    fw_nodes = {n for n in fw.graph.nodes if n.op == "call_function"}
    candidates = []
    for key, base in saved_keys.items():
        if key in survives or key not in buffers:
            continue
        uses_fw = [index[u] for n in fw_nodes if key_of.get(n) == key for u in n.users if u in index]
        uses_bw = [
            index[u]
            for n in bw.graph.nodes
            if key_of.get(n) == key and n.op in ("placeholder", "call_function")
            for u in n.users
            if u in index and key_of.get(u) != key  # a view of it is not a use of its data
        ]
        if not uses_bw:
            continue
        produced = buffers[key].alloc
        needs: list[str] = []
        recompute: float | None = cost.node_seconds(base) if _recomputable(base) else None
        if recompute is not None:
            # recomputed in backward from what backward already has: graph inputs and
            # values forward saves as they are (not views of them, not temporaries)
            for a in base.all_input_nodes:
                if not isinstance(a.meta.get("val"), torch.Tensor):
                    if a not in saved_syms:
                        recompute = None  # a size backward does not have
                        break
                    continue
                if key_of.get(a) is None:
                    continue  # a graph input or a view of one: backward can always have it
                if a in saved_nodes and key_of[a] != key:
                    needs.append(key_of[a])
                else:
                    recompute = None
                    break
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
                recompute_needs=tuple(needs) if recompute is not None else (),
                swappable=is_dense(tensor_val(base)),
                bytes_expr=nbytes_expr(tensor_val(base)),
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
    )


def fetches_for(problem: Problem, streamed: dict[int, int]) -> list[Fetch]:
    """One fetch per phase that reads each streamed input (index -> bytes), issued at first use."""
    out = []
    for idx, nbytes in sorted(streamed.items()):
        uses = problem.input_uses.get(idx, [])
        for phase, mine in (("fw", [u for u in uses if u < problem.n_fw]),
                            ("bw", [u for u in uses if u >= problem.n_fw])):
            if mine:
                out.append(Fetch(idx, phase, nbytes, min(mine), max(mine)))
    return sorted(out, key=lambda f: (f.first_use, f.input_index))


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
