"""The Inductor executor: Inductor compiles the compute, lohan's ops run between it in plan order.

A rewritten forward or backward graph is a sequence of compute runs separated by
lohan's ops (``torch.ops.lohan.*``: swap-outs, swap-ins, waits, gradient
hand-offs, weight waits). Each run of compute is compiled by Inductor as a graph
of its own (a *segment*); a small generated Python function (the *driver*) calls
the segments and lohan's ops in exactly the graph's order. So:

- **Order.** Inductor never sees lohan's ops, so it can neither move nor remove
  them: every transfer, wait and hand-off runs where ``apply_plan`` put it,
  between the same two compute runs (by construction, not by constraints that a
  later Inductor pass could ignore). Compute cannot cross them either.
- **Memory.** A value that crosses a boundary is a segment output, allocated by
  the segment and released by the driver right after its last use (inputs are
  handed over boxed, so a segment frees an input at its own last use). Inside a
  segment Inductor fuses and frees intermediates at their last use; it may reuse
  the memory of its own intermediates, never of its inputs (no input is marked
  donated), so a buffer an asynchronous copy still reads is never overwritten.
  Inductor keeps the node order inside a segment (``reorder_for_peak_memory`` off):
  the plan's liveness is what runs, less the intermediates fusion removes.
- **Strides.** Every segment output keeps the strides of its ``meta["val"]``
  (Inductor's user-visible outputs), so the next segment, lohan's ops and the
  backward graph see the layouts the passes planned with.
- **Cache.** Segments are plain aten graphs; no lohan pass runs inside Inductor,
  so Inductor's FX graph cache keys (graph code, input metadata, config) describe
  them completely, and identical segments (the layers of a transformer) hit it.
- **Timing.** Where compute is synchronous (the CPU stand-in) the driver times each
  segment and direct op in a few calls (``Driver.node_seconds``): the backend
  simulates the plan again with those times and plans with them when it re-plans.

Runs with at most one op to compute (and any number of views, ``getitem`` and size
arithmetic) are not worth a compile: a single op gains nothing from Inductor (no
fusion; a matmul is an extern call either way), so the driver runs them directly.
"""

from __future__ import annotations

import itertools
import math
import operator
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .fxutil import is_view
from .scratch import restore_peak
from .shapes import hint_int


# lohan's ops (copies, waits, the optimizer's hand-offs) and torch's functional collectives (a
# data-parallel step's gradient reductions, issued in the order every rank shares)
_DRIVER_NAMESPACES = ("lohan", "_c10d_functional")

# the cross-entropy's ops, traced whole rather than decomposed where ``chunk_loss`` may chunk the
# loss: one it leaves whole has no Inductor lowering (Inductor decomposes these when it traces
# itself), so it runs as its eager kernel, in the driver
LOSS_OPS = frozenset({torch.ops.aten._log_softmax.default, torch.ops.aten.nll_loss_forward.default,
                      torch.ops.aten.nll_loss_backward.default, torch.ops.aten._log_softmax_backward_data.default})


def runs_in_driver(node: fx.Node) -> bool:
    """A call of one of lohan's ops (``torch.ops.lohan.*``), a collective, or one of
    ``LOSS_OPS``: runs in the driver, in graph order, never inside a segment Inductor compiles."""
    if node.op != "call_function":
        return False
    target = node.target
    if target in LOSS_OPS:
        return True
    ns = getattr(target, "namespace", None)
    if ns is None and isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
    return ns in _DRIVER_NAMESPACES


MIN_SEGMENT_OPS = 2  # a run with fewer ops that compute runs eagerly in the driver


def _is_cheap(node: fx.Node) -> bool:
    """Ops with no kernel to compile: constants, views, tuple access, size arithmetic."""
    if node.op == "get_attr":
        return True
    if node.op != "call_function":
        return False
    if node.target is operator.getitem or is_view(node):
        return True
    val = node.meta.get("val")
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _inductor_only(node: fx.Node) -> bool:
    """An op whose eager form is no kernel of its own but a slow, memory-hungry composite that
    Inductor's code replaces (``prims._low_memory_max_pool_with_offsets``: 28 MiB of temporaries
    in eager for a 2 MiB result): compiled even alone. (Not pointwise ops: their eager kernel
    is what Inductor would write.)"""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or _is_cheap(node):
        return False
    if torch.Tag.pointwise in node.target.tags or torch.Tag.nondeterministic_seeded in node.target.tags:
        return False  # (a random op alone is no graph Inductor compiles: its passes rewrite it in context)
    from .scratch import inductor_generates

    return inductor_generates(node)


@dataclass
class Segment:
    """A run of compute nodes compiled as one Inductor graph."""

    index: int
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    fn: Callable[[list], Any] | None = None

    @property
    def name(self) -> str:
        return f"segment{self.index}"


def split(graph: fx.Graph) -> list[Segment | fx.Node]:
    """The graph's non-placeholder, non-output nodes in order: runs of compute as ``Segment``s,
    lohan's ops and cheap ops as nodes of their own. A ``getitem`` of a compute node goes with
    its source, so that no tuple crosses a boundary."""
    items: list[Segment | fx.Node] = []
    segment_of: dict[fx.Node, Segment] = {}
    current: list[fx.Node] = []

    def close() -> None:
        nonlocal current
        if current:
            if sum(1 for n in current if not _is_cheap(n)) < MIN_SEGMENT_OPS and not any(map(_inductor_only, current)):
                items.extend(current)
            else:
                seg = Segment(len([i for i in items if isinstance(i, Segment)]), current)
                for n in current:
                    segment_of[n] = seg
                items.append(seg)
        current = []

    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":
            current.append(node)
            continue
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            src = node.args[0]
            if src in segment_of:
                segment_of[src].nodes.append(node)
                segment_of[node] = segment_of[src]
                continue
            if src in current:
                current.append(node)
                continue
            if runs_in_driver(src) or src.op == "placeholder" or not isinstance(src.meta.get("val"), torch.Tensor):
                close()
                items.append(node)
                continue
        if runs_in_driver(node):
            close()
            items.append(node)
        else:
            current.append(node)
    close()
    position = {n: i for i, n in enumerate(graph.nodes)}
    for seg in (i for i in items if isinstance(i, Segment)):
        inside = set(seg.nodes)
        seg.inputs = list(dict.fromkeys(a for n in seg.nodes for a in n.all_input_nodes if a not in inside))
        seg.outputs = [n for n in seg.nodes if any(u not in inside for u in n.users)]
    for seg in (i for i in items if isinstance(i, Segment)):
        seg.inputs += _size_binders(graph, seg, position, segment_of)
    return items


def symbols_of(val: Any) -> set:
    """Free size symbols of a fake value (its sizes, strides and offset; a SymInt's expression)."""
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return set(val.node.expr.free_symbols)
    if isinstance(val, torch.Tensor):
        out: set = set()
        for s in (*val.shape, *val.stride(), val.storage_offset()):
            if isinstance(s, torch.SymInt):
                out |= s.node.expr.free_symbols
        return out
    if isinstance(val, (list, tuple)):
        return set().union(*(symbols_of(v) for v in val)) if val else set()
    return set()


def _binds(val: Any) -> set:
    """The symbols Inductor can read off an input with this value: a SymInt that is a plain
    symbol, or a tensor size or stride that is one."""
    import sympy

    if isinstance(val, torch.SymInt):
        return {val.node.expr} if isinstance(val.node.expr, sympy.Symbol) else set()
    if isinstance(val, torch.Tensor):
        return {
            s.node.expr for s in (*val.shape, *val.stride())
            if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol)
        }
    return set()


def _size_binders(
    graph: fx.Graph, seg: Segment, position: dict[fx.Node, int], segment_of: dict[fx.Node, Segment]
) -> list[fx.Node]:
    """Extra inputs that tell Inductor the value of every size symbol the segment uses.

    A segment may read a tensor of size ``4*s0`` with nothing of size ``s0`` among its inputs
    (the whole graph had ``s0`` as an input of its own): it then also takes the earliest value
    of the graph, a SymInt or a tensor, that carries ``s0`` as a plain symbol and that the
    driver holds (an input of the graph, a direct op's result, an earlier segment's output)."""
    needed: set = set()
    for n in (*seg.inputs, *seg.nodes):
        needed |= symbols_of(n.meta.get("val"))
    if not needed:
        return []
    bound: set = set()
    for n in seg.inputs:
        bound |= _binds(n.meta.get("val"))
    start = position[seg.nodes[0]]
    extra: list[fx.Node] = []
    for sym in sorted(needed - bound, key=str):
        binder = None
        for n in graph.nodes:
            if position[n] >= start:
                break
            if n.op == "output" or runs_in_driver(n):
                continue
            if n in segment_of and n not in segment_of[n].outputs:
                continue  # lives inside an earlier segment only
            if sym in _binds(n.meta.get("val")):
                binder = n
                if isinstance(n.meta.get("val"), torch.SymInt):
                    break  # an int is the cheapest input
        if binder is None:
            continue  # an unbacked symbol: Inductor binds it (or says why it cannot)
        if binder not in extra:
            extra.append(binder)
            bound |= _binds(binder.meta.get("val"))
    return extra


def segment_module(gm: fx.GraphModule, seg: Segment) -> fx.GraphModule:
    """``seg`` as a graph of its own: its inputs as placeholders, its outputs returned.

    Nodes get names from their position (``in0``, ``n3``), not the graph's (``mm_12``): the
    segments of identical layers then have identical code, and Inductor's FX graph cache,
    keyed on the code and the inputs' metadata, compiles one and finds it for the others."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(seg.inputs):
        p = g.placeholder(f"in{i}")
        p.meta.update({k: v for k, v in n.meta.items() if k in ("val", "tensor_meta")})
        env[n] = p
    for i, n in enumerate(seg.nodes):
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
        new = g.create_node(n.op, n.target, args, kwargs, name=f"n{i}")
        new.meta = dict(n.meta)
        env[n] = new
    out = g.output(tuple(env[n] for n in seg.outputs))
    # every output keeps eager's strides: the next segment and lohan's ops were planned with them
    out.meta["user_visible_output_idxs"] = list(range(len(seg.outputs)))
    return fx.GraphModule(gm, g)


def example_value(node: fx.Node) -> Any:
    val = node.meta.get("val")
    if val is None:
        raise RuntimeError(f"{node.format_node()} has no meta['val']: cannot compile a segment that reads it")
    return val


class Driver:
    """Runs a split graph: segments (boxed) and direct op calls, in order, releasing each
    value right after its last use. Built as generated Python, like fx's own code."""

    # calls whose compute is timed (the first one touches fresh memory and warms caches)
    TIMED_CALLS = range(1, 4)

    def __init__(self, gm: fx.GraphModule, items: list[Segment | fx.Node], name: str, *, timing: bool = False,
                 check: Callable[[str, list], None] | None = None):
        self.gm = gm
        self.items = items
        self.name = name
        # ``check(what, tensors)`` before every compute item (a segment, a direct op) with the
        # tensors it reads (LOHAN_DEBUG: they must be device memory)
        self.check = check
        self.source, self.fn = self._generate(timed=False)
        self.timing = timing
        self.calls = 0
        self.samples: list[list[float]] = []  # per timed call: seconds of each item
        if timing:
            self._timed_fn = self._generate(timed=True)[1]

    def __call__(self, args: list) -> Any:
        n = self.calls
        self.calls += 1
        if self.timing and n in self.TIMED_CALLS:
            seconds = [0.0] * len(self.items)
            out = self._timed_fn(args, seconds)
            self.samples.append(seconds)
            return out
        return self.fn(args)

    @property
    def timed(self) -> bool:
        """Whether every timed call has run."""
        return self.timing and len(self.samples) >= len(self.TIMED_CALLS)

    def node_seconds(self, estimate: Callable[[fx.Node], float]) -> dict[str, float]:
        """Measured seconds of each compute node, by name (median over the timed calls): a
        direct op's own time; a segment's time shared among its nodes in proportion to
        ``estimate`` (Inductor fuses them: only the segment's total is measured)."""
        out: dict[str, float] = {}
        if not self.samples:
            return out
        for i, item in enumerate(self.items):
            measured = statistics.median(sample[i] for sample in self.samples)
            if isinstance(item, Segment):
                nodes = [n for n in item.nodes if n.op == "call_function"]
                weights = [estimate(n) for n in nodes]
                total = sum(weights)
                if total <= 0:
                    weights, total = [1.0] * len(nodes), float(len(nodes) or 1)
                out.update({n.name: measured * w / total for n, w in zip(nodes, weights)})
            elif not runs_in_driver(item):
                out[item.name] = measured
        return out

    def describe(self) -> dict[str, Any]:
        """For the report and dumps: how many segments and direct ops, and the driver's code."""
        segs = [i for i in self.items if isinstance(i, Segment)]
        return {
            "segments": len(segs),
            "segment_nodes": sum(len(s.nodes) for s in segs),
            "lohan_ops": sum(1 for i in self.items if isinstance(i, fx.Node) and runs_in_driver(i)),
            "direct_ops": sum(1 for i in self.items if isinstance(i, fx.Node) and not runs_in_driver(i)),
            # lohan's ops in the order the driver calls them: (op, elements of its first tensor)
            "lohan_op_sequence": [_op_record(i) for i in self.items if isinstance(i, fx.Node) and runs_in_driver(i)],
            "driver": self.source,
        }

    def _generate(self, *, timed: bool) -> tuple[str, Callable[..., Any]]:
        """The driver's code; ``timed`` adds each compute item's seconds to ``seconds[i]``."""
        graph = self.gm.graph
        names: dict[fx.Node, str] = {}
        counter = itertools.count()
        globals_: dict[str, Any] = {}

        def var(n: fx.Node) -> str:
            if n not in names:
                names[n] = f"v{next(counter)}_{n.name}"
            return names[n]

        def const(value: Any) -> str:
            if value is None or isinstance(value, (bool, int, str)):
                return repr(value)
            if isinstance(value, float) and math.isfinite(value):
                return repr(value)
            key = f"c{len(globals_)}"  # dtypes, devices, inf and nan: referred to by name
            globals_[key] = value
            return key

        def render(a: Any) -> str:
            if isinstance(a, fx.Node):
                return var(a)
            if isinstance(a, (list, tuple)):
                inner = ", ".join(render(x) for x in a)
                if isinstance(a, tuple):
                    return f"({inner},)" if len(a) == 1 else f"({inner})"
                return f"[{inner}]"
            if isinstance(a, dict):
                return "{" + ", ".join(f"{k!r}: {render(v)}" for k, v in a.items()) + "}"
            return const(a)

        # the step (line group) of each item, and each value's last use
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        output = graph.output_node()
        last_use: dict[fx.Node, int] = {}
        for i, item in enumerate(self.items):
            reads = item.inputs if isinstance(item, Segment) else item.all_input_nodes
            for a in reads:
                last_use[a] = i
        for a in output.all_input_nodes:
            last_use[a] = len(self.items)
        dies_at: dict[int, list[fx.Node]] = {}
        for n, i in last_use.items():
            dies_at.setdefault(i, []).append(n)

        lines = [f"def {self.name}(args{', seconds' if timed else ''}):"]
        if timed:
            globals_["clock"] = time.perf_counter

        if self.check is not None:
            globals_["check"] = self.check

        def check_line(what: str, reads: Sequence[fx.Node]) -> None:
            tensors = [var(a) for a in reads if isinstance(a.meta.get("val"), torch.Tensor)]
            if self.check is not None and tensors:
                lines.append(f"    check({what!r}, [{', '.join(tensors)}])")

        def call_line(i: int, line: str) -> None:
            if timed:
                lines.append("    start = clock()")
            lines.append(line)
            if timed:
                lines.append(f"    seconds[{i}] += clock() - start")

        if placeholders:
            lines.append(f"    {', '.join(var(p) for p in placeholders)}, = args")
        lines.append("    args.clear()")
        unused = [p for p in placeholders if p not in last_use]
        if unused:
            lines.append(f"    del {', '.join(var(p) for p in unused)}")
        for i, item in enumerate(self.items):
            dying = [var(n) for n in dies_at.get(i, [])]
            if isinstance(item, Segment):
                fn = f"seg{item.index}"
                globals_[fn] = item.fn
                lines.append(f"    # {item.name}: {len(item.nodes)} nodes, {len(item.inputs)} in, {len(item.outputs)} out")
                check_line(f"{self.name} {item.name}", item.inputs)
                lines.append(f"    inputs = [{', '.join(var(a) for a in item.inputs)}]")
                if dying:
                    lines.append(f"    del {', '.join(dying)}")  # the segment frees them at its own last use
                outs = ", ".join(var(o) for o in item.outputs)
                call_line(i, f"    {outs + ', = ' if item.outputs else ''}{fn}(inputs)")
            elif item.op == "get_attr":  # a constant of the graph, outside any segment
                globals_[f"attr{i}"] = _fetch_attr(self.gm, item.target)
                lines.append(f"    {var(item)} = attr{i}")
            else:
                node = item
                target = f"op{i}"
                globals_[target] = node.target
                call = f"{target}(" + ", ".join(
                    [render(a) for a in node.args] + [f"{k}={render(v)}" for k, v in node.kwargs.items()]
                ) + ")"
                line = f"    {var(node) + ' = ' if node.users else ''}{call}"
                if not runs_in_driver(node) and not _is_cheap(node):
                    check_line(f"{self.name} {node.name}", node.all_input_nodes)
                if runs_in_driver(node):
                    lines.append(f"{line}  # {node.target}")
                else:
                    call_line(i, line)
                if dying:
                    lines.append(f"    del {', '.join(dying)}")
        lines.append(f"    return {render(output.args[0])}")
        source = "\n".join(lines) + "\n"
        namespace = dict(globals_)
        exec(compile(source, f"<lohan driver {self.name}>", "exec"), namespace)
        return source, namespace[self.name]


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _op_record(node: fx.Node) -> tuple[str, int]:
    target = node.target
    name = f"{target.namespace}::{target._opname}" if isinstance(target, torch._ops.OpOverload) else str(target)
    first = next((a for a in node.args if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)), None)
    numel = 1
    if first is not None:
        for d in first.meta["val"].shape:
            numel *= hint_int(d)
    return name, numel


def storage_extent(v: torch.Tensor) -> int:
    """Elements of storage a tensor reaches (its offset included), at the size hints."""
    if v.numel() == 0:
        return 0
    return hint_int(v.storage_offset()) + 1 + sum((hint_int(d) - 1) * hint_int(st) for d, st in zip(v.shape, v.stride()))


def _input_groups(vals: Sequence[Any], groups: Sequence[Any] | None) -> dict[Any, tuple[torch.dtype, int]]:
    """The storages the inputs ``vals`` are views of, by group (inputs of one group share one
    storage where they run): dtype and elements; an input without a group, or whose dtype
    differs from its group's, has a storage of its own (keyed by position)."""
    out: dict[Any, tuple[torch.dtype, int]] = {}
    for i, v in enumerate(vals):
        if not isinstance(v, torch.Tensor):
            continue
        key = groups[i] if groups is not None and groups[i] is not None else ("own", i)
        if key in out and out[key][0] != v.dtype:
            key = ("own", i)
        dtype, numel = out.get(key, (v.dtype, 0))
        out[key] = (dtype, max(numel, storage_extent(v)))
    return out


def _group_of(i: int, v: torch.Tensor, groups: Sequence[Any] | None, storages: dict) -> Any:
    key = groups[i] if groups is not None and groups[i] is not None else ("own", i)
    return key if key in storages and storages[key][0] == v.dtype else ("own", i)


def _made_here(vals: Sequence[Any], real: Sequence[torch.Tensor | None] | None) -> list:
    """``vals`` less those given as real tensors (None in their place): a storage made for a
    group is as large as its members made here need, not as the step's own members are."""
    return [v if real is None or real[i] is None else None for i, v in enumerate(vals)]


def _probe_inputs(vals: Sequence[Any], groups: Sequence[Any] | None = None,
                  real: Sequence[torch.Tensor | None] | None = None) -> list:
    """Real inputs like ``vals`` (fake tensors, symbolic sizes at their hints): ``real[i]``
    where given (the step's own tensor), else zeros, so that indices stay in range. Inputs of
    one group (``groups[i]``: views of one storage where the segment runs, such as saved
    values of one forward tensor) are views of one storage here too: it is freed when the
    last of them is, as it is in the step."""
    storages = _input_groups(_made_here(vals, real), groups)
    bases: dict[Any, torch.Tensor] = {}
    out = []
    for i, v in enumerate(vals):
        if real is not None and real[i] is not None:
            out.append(real[i])
        elif isinstance(v, torch.Tensor):
            shape = [hint_int(d) for d in v.shape]
            stride = [hint_int(d) for d in v.stride()]
            key = _group_of(i, v, groups, storages)
            if key not in bases:
                dtype, numel = storages[key]
                bases[key] = torch.zeros(max(numel, 1), dtype=dtype, device=v.device)
            offset = hint_int(v.storage_offset()) if v.numel() else 0
            out.append(bases[key].as_strided(shape, stride, offset))
        elif isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            out.append(hint_int(v) if isinstance(v, torch.SymInt) else v.node.hint)
        else:
            out.append(v)
    bases.clear()  # (the inputs hold their storages: each is freed with the last of its views)
    return out


def _made_bytes(vals: Sequence[Any], groups: Sequence[Any] | None,
                real: Sequence[torch.Tensor | None] | None) -> int:
    """The bytes ``_probe_inputs`` allocates for these inputs: one storage per group, none for
    an input given as a real tensor."""
    made = _made_here(vals, real)
    storages = _input_groups(made, groups)
    keys = {_group_of(i, v, groups, storages) for i, v in enumerate(made) if isinstance(v, torch.Tensor)}
    return sum(max(numel, 1) * dtype.itemsize for dtype, numel in (storages[k] for k in keys))


def _transient(fn: Callable[[list], Any], inputs: list, counter: Any, device: Any, before: int) -> int:
    """Device bytes a boxed ``fn`` holds at its highest point above the level it was called at
    (its inputs included, which it may free as it goes). The counter's peak is put back to
    ``before`` after (read before the inputs were made)."""
    level = counter.allocated(device)
    counter.reset_peak(device)
    out = fn(inputs)
    peak = counter.peak(device)
    del out
    inputs.clear()
    restore_peak(counter, before, device)
    return peak - level


def planned_peak(sub: fx.GraphModule, scratch: Callable[[fx.Node], int],
                 groups: Sequence[Any] | None = None, held: Sequence[bool] | None = None,
                 fusing: bool = True) -> tuple[int, fx.Node | None]:
    """The device bytes the plan's model holds at its highest point while the segment ``sub``
    runs, above the level it was called at (as ``_transient`` measures): its nodes one at a
    time, each value freed after its last use (inputs too: they are handed over boxed), each
    op's outputs (none for a result ``fused_away``: measured against fusion, what a segment
    holds beyond it is learnt), the results of a multi-output op and its ``scratch`` held
    while it runs (``graph/problem.build_problem``'s model of every op under Inductor, once
    its fusion was seen); and the node it is reached at (None: before any runs). Inputs of one of
    ``groups`` share one storage, freed after the last use of any of them; inputs ``held``
    elsewhere (parameters, the batch) are never freed. ``fusing=False``: every result held, as
    if nothing were fused (what a segment is assumed to hold at most before it is measured)."""
    from .fxutil import results_bytes, storage_base
    from .scratch import fused_away
    from .shapes import nbytes_hint

    nodes = list(sub.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    storages = _input_groups(vals, groups)
    # an input's storage: its group's, represented by the group's first input
    owner: dict[fx.Node, fx.Node] = {}
    first: dict[Any, fx.Node] = {}
    for i, (n, v) in enumerate(zip(placeholders, vals)):
        if isinstance(v, torch.Tensor):
            owner[n] = first.setdefault(_group_of(i, v, groups, storages), n)

    def base_of(a: fx.Node) -> fx.Node:
        b = storage_base(a)
        return owner.get(b, b)

    last: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[base_of(a)] = i
    size: dict[fx.Node, int] = {}
    live = 0
    for key, node in first.items():
        dtype, numel = storages[key]
        size[node] = numel * torch.empty((), dtype=dtype).element_size()
        live += size[node]
    called_at = peak = live
    at = None
    outputs = {base_of(a) for a in sub.graph.output_node().all_input_nodes}
    outputs |= {base_of(n) for i, n in enumerate(placeholders) if held is not None and held[i]}
    for i, n in enumerate(nodes):
        if n.op != "call_function":
            continue
        held = 0
        if storage_base(n) is n and isinstance(n.meta.get("val"), torch.Tensor):
            size[n] = 0 if fusing and fused_away(n) else nbytes_hint(n.meta["val"])
            held = size[n]
        held += results_bytes(n)  # a multi-output op's results, then their getitems
        if live + held + scratch(n) > peak:
            peak, at = live + held + scratch(n), n
        live += size.get(n, 0)
        for a in {base_of(a) for a in n.all_input_nodes} | {n}:
            if last.get(a, -1) <= i and a in size and a not in outputs:
                live -= size.pop(a)
    return peak - called_at, at


def excess_over_plan(sub: fx.GraphModule, compiled: Callable[[list], Any], vals: Sequence[Any], counter: Any,
                     device: Any, scratch: Callable[[fx.Node], int], groups: Sequence[Any] | None = None,
                     held: Sequence[bool] | None = None,
                     real: Sequence[torch.Tensor | None] | None = None,
                     budget: int | None = None) -> tuple[int, int | None, bool]:
    """How many device bytes the compiled segment holds at its highest point beyond what the
    plan's model of its nodes holds (``planned_peak``): a fused kernel keeps its inputs while it
    writes its outputs, so a segment can peak higher than the plan predicted for its nodes.
    It runs once, measured by ``counter`` (``allocated``, ``peak``, ``reset_peak`` of
    ``device``: the runtime's device counters). Between segments the plan and the executor
    hold the same values, so a step peaks at most this above its prediction while it runs.
    Inputs are made as they are where the step runs: zeros, views of one storage per
    ``groups``, and the ``held`` ones (parameters, the batch: the caller keeps them) alive
    throughout: the step's own tensors where ``real`` gives them (inputs the segment cannot
    write into), else views of one storage per dtype (the step's own are alive beside
    them: the measurement must not hold a second copy of every weight). Returns the excess,
    the position in the segment of the node the plan's model peaks at (held there, the plan's
    peak over the segment is the segment's), and whether it ran.

    The measurement runs inside a step (a graph compiles when it is first called: backward's
    with forward's saved values alive), so it runs only where its inputs and everything the
    segment could hold with nothing fused fit ``budget`` beside what the device holds now;
    where they do not, the excess returned is that unfused bound's (a conservative figure:
    the plan then holds what the segment could)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    planned, at = planned_peak(sub, scratch, groups, held)
    position = None if at is None else int(at.name[1:])  # (segment_module names nodes n0, n1, ...)
    # held inputs without a real tensor: stand-ins sharing one storage per dtype (the step's
    # own are alive now), so the measurement adds only the largest of them
    storages = [("held", v.dtype) if h and isinstance(v, torch.Tensor) else g
                for v, g, h in zip(vals, groups or [None] * len(vals), held or [False] * len(vals))]
    if budget is not None:
        unfused, _ = planned_peak(sub, scratch, groups, held, fusing=False)
        need = _made_bytes(vals, storages, real) + unfused
        if counter.allocated(device) + need > budget:
            return max(0, unfused - planned), position, False
    on_cuda = device is not None and device.type == "cuda"
    before = counter.peak(device)  # (before the inputs too: a step in progress keeps its own)
    with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(devices=[device] if on_cuda else []):
        # (random ops, dropout, draw from a generator of their own: training draws the same)
        if on_cuda:
            compiled(_probe_inputs(vals, storages, real))  # its first call tunes kernels, with memory of its own
        inputs = _probe_inputs(vals, storages, real)
        kept = [t for t, h in zip(inputs, held or ()) if h]  # (the caller's references)
        measured = _transient(compiled, inputs, counter, device, before)
        del kept
        restore_peak(counter, before, device)  # (the kept inputs are gone too)
    return max(0, measured - planned), position, True


def compile_segments(
    gm: fx.GraphModule,
    compile_one: Callable[[fx.GraphModule, Sequence[Any]], Callable[[list], Any]],
    name: str,
    *,
    timing: bool = False,
    probe: Callable[[Segment, fx.GraphModule, Callable[[list], Any], Sequence[Any]], None] | None = None,
    check: Callable[[str, list], None] | None = None,
) -> Driver:
    """Split ``gm``, compile each segment with ``compile_one(segment_gm, example_inputs)``
    (a boxed callable), and return the driver that runs them (``timing``: timing the compute
    of a few calls, which only a host clock can do where compute is synchronous: the CPU).
    ``probe(segment, segment_gm, compiled, example_inputs)`` is called for each compiled segment;
    ``check``: see ``Driver``."""
    items = split(gm.graph)
    for seg in (i for i in items if isinstance(i, Segment)):
        sub = segment_module(gm, seg)
        vals = [example_value(n) for n in seg.inputs]
        seg.fn = compile_one(sub, vals)
        if probe is not None:
            probe(seg, segment_module(gm, seg), seg.fn, vals)  # (Inductor may have changed sub)
    return Driver(gm, items, name, timing=timing, check=check)
