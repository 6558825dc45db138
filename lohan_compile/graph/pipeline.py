"""The pass pipeline: a list of named passes over the graphs of one compile.

A pass is ``fn(graphs, facts) -> (graphs, report)``: it reads the graphs and
the read-only compile facts (never global configuration), returns the new
graphs and a small dict for the report. The pipeline times each pass, checks
every graph after it in debug mode, skips passes the user disabled to bisect,
and turns any failure into a ``PassError`` that names the pass, the node and
the user's source line.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx

from ..errors import BudgetError, PassError
from .meta import get_info
from .saved import SavedValues
from ..options import Options


@dataclass
class Graphs:
    """The graphs one compile works on: the joint graph, then forward and backward.

    For a forward-only compile (``torch.no_grad()``, or nothing requires
    grad), ``fw`` holds the inference graph from the start and there is no
    joint graph and no backward.
    """

    joint: fx.GraphModule | None = None
    fw: fx.GraphModule | None = None
    bw: fx.GraphModule | None = None
    # the partitions of the joint graph made so far, for a later compile of it to reuse
    # (``CompileFacts.partitions``): set by ``partition_graph``
    partitions: dict[Any, tuple[fx.GraphModule, fx.GraphModule]] = field(default_factory=dict)

    @property
    def inference(self) -> bool:
        return self.joint is None and self.bw is None

    def items(self) -> list[tuple[str, fx.GraphModule]]:
        return [(k, g) for k, g in (("joint", self.joint), ("fw", self.fw), ("bw", self.bw)) if g is not None]


@dataclass(frozen=True)
class InputFact:
    """What one example input of the backend is."""

    index: int
    kind: str  # "param", "buffer", "input" (a Role value) or "symint"
    source: str | None
    requires_grad: bool
    is_tensor: bool
    # parameters: the key the graph ops name it by (lohan_compile.runtime.keys), and what the
    # runtime knew of it when this graph was compiled: streamed by an earlier graph, read by an
    # earlier graph without fetching (so never streamed), its gradient offloaded by an earlier
    # graph, updated by the graph's lohan optimizer (``CompileFacts.optimizer``)
    key: int | None = None
    streamed: bool = False
    kept_resident: bool = False
    grad_offloaded: bool = False
    optimizer_owns: bool = False
    # its ``.grad`` held gradients of earlier micro-batches (strided, no hook reading gradients
    # on their way in): backward adds into it (``passes/accumulate_grads.py``)
    grad_held: bool = False


@dataclass(frozen=True)
class DataParallel:
    """The process group a data-parallel step averages its parameter gradients over, and, where
    the ranks' CPU optimizers share the update, which rank updates each parameter."""

    world: int
    rank: int
    group_name: str
    # input index -> the rank whose CPUAdamW holds the parameter's optimizer state and updates
    # it (the others drop its averaged gradient and receive its updated weight at step());
    # empty: every rank updates every parameter
    owners: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class CompileFacts:
    """Read-only inputs every pass may use."""

    graph_id: int
    inputs: tuple[InputFact, ...]
    options: Options
    # the lohan optimizer that updates the graph's parameters (the option, else a live one that
    # owns them), or None; passes only name it: what it owns is in ``inputs``
    optimizer: Any = None
    # several processes training one model, each on its micro-batch: the group its gradients
    # are averaged over inside the backward graph (``reduce_grads``); None: one process, or a
    # model DistributedDataParallel reduces
    data_parallel: DataParallel | None = None
    # device bytes held outside this graph's inputs when it was compiled (other graphs'
    # saved values, optimizer state, ...)
    resident_outside_bytes: int = 0
    # the backend's real example inputs (parameters, buffers, the batch), by index
    real_inputs: Sequence[Any] = ()
    # what AOTAutograd hands the partition function (training compiles only)
    num_fwd_outputs: int | None = None
    joint_inputs: Any = None
    partition_kwargs: dict[str, Any] = field(default_factory=dict)
    # reports of the passes that ran before, by name (a later pass may read an earlier one's)
    pass_reports: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    # seconds of compute nodes, by name, measured while an earlier plan of this graph ran
    # (the Inductor executor times its segments on the CPU stand-in): the cost model's
    # estimates give way to them
    measured_seconds: Mapping[str, float] = field(default_factory=dict)
    # policy "auto": the plan a trial asked for, (partition, plan family): "default" or
    # "min-cut", and one of planner.AUTO_FAMILIES (or "keep-all"); None: auto chooses
    variant: tuple[str, str] | None = None
    # partitions of this joint graph an earlier compile made (a re-plan, a trial's plan reuses
    # them), by "default" or ("min-cut", activation budget): untouched (forward, backward) pairs
    partitions: Mapping[Any, tuple[fx.GraphModule, fx.GraphModule]] = field(default_factory=dict)
    # policy "auto", planned again: the partition the plan before chose (a key of ``partitions``),
    # planned alone where auto's plan of it fits the budget
    partition_choice: Any = None
    # ... and whether that plan weighed it against torch's min-cut partition (False: it took
    # the default partition without, everything fitting kept or nearly)
    partition_weighed: bool = True
    # a trial of a "min-cut" variant: the activation budget of the min-cut partition auto weighed
    # when it chose (the partition that variant's prediction was made on)
    min_cut_fraction: float | None = None
    # positions of forward outputs an earlier plan of this graph saw dropped before backward
    # started (the user kept only the loss): planned as released when forward ends
    dropped_outputs: frozenset[int] = frozenset()
    # the first plan of a graph, where no plan fits holding its outputs: plan every user output
    # of the forward released when forward ends (the runtime checks that the step drops them)
    assume_outputs_dropped: bool = False
    # device bytes an earlier plan of this graph was measured to hold above its predicted peak
    # (the executor allocates what the simulator does not model: Inductor, fusing torch's
    # min-cut recomputation chains, keeps their inputs alive longer): planned as held all step
    executor_excess_bytes: int = 0
    # device bytes that code outside the graph (run eagerly, after a graph break) was measured
    # to allocate between this graph's forward and its backward: planned as held there
    outside_bytes: int = 0
    # device bytes an Inductor segment was measured to hold above the plan of its nodes, for
    # every node of the segment by (phase "fw"/"bw", node name): held while each of them runs
    segment_scratch: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # the device bytes each op allocates inside itself (``graph/scratch.py``): measured where the
    # backend can run ops, None: estimated
    op_scratch: Callable[[fx.Node], int] | None = None
    # Inductor: nodes, by (phase, name), whose results an earlier plan's segments were found to
    # hold in memory (a segment's outputs), though the plan had them fused into their readers
    materialized: frozenset[tuple[str, str]] = frozenset()
    # Inductor: nodes whose results an earlier plan's segments were measured to fuse into their
    # readers (inside a segment, not one of its outputs). Until a result is seen fused, the plan
    # holds it in memory: a plan that assumed fusion Inductor does not do would run past the
    # budget the first time its segments run (when they are measured), so that is assumed only
    # where no plan fits otherwise (``assume_fused``)
    fused: frozenset[tuple[str, str]] = frozenset()
    assume_fused: bool = False
    # ... filled as the plan is made: the results it holds because none was seen fused yet
    unseen_fused: set[tuple[str, str]] = field(default_factory=set)


PassFn = Callable[[Graphs, CompileFacts], "tuple[Graphs, dict[str, Any]]"]


@dataclass(frozen=True)
class Pass:
    name: str
    fn: PassFn
    training: bool = True  # runs on joint/forward/backward graphs of a training compile
    inference: bool = False  # runs on the forward graph of a forward-only compile
    required: bool = False  # cannot be disabled (the graphs would be incomplete)
    requires: tuple[str, ...] = ()  # passes that must have run before this one


@dataclass
class PassRecord:
    name: str
    seconds: float
    report: dict[str, Any]
    skipped: bool = False


@dataclass
class Pipeline:
    passes: Sequence[Pass]
    records: list[PassRecord] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def validate_disabled(self, disabled: Iterable[str]) -> frozenset[str]:
        disabled = frozenset(disabled)
        unknown = sorted(disabled - set(self.names))
        if unknown:
            raise ValueError(
                f"cannot disable unknown pass(es) {unknown}; passes are: {', '.join(self.names)}"
            )
        required = sorted(p.name for p in self.passes if p.required and p.name in disabled)
        if required:
            raise ValueError(f"pass(es) {required} are required and cannot be disabled")
        for p in self.passes:
            missing = [r for r in p.requires if r in disabled]
            if missing and p.name not in disabled:
                raise ValueError(
                    f"pass {p.name!r} requires {missing}; disable {p.name!r} too, or keep {missing}"
                )
        return disabled

    def run(
        self,
        graphs: Graphs,
        facts: CompileFacts,
        *,
        debug: bool = False,
        disabled: Iterable[str] = (),
    ) -> Graphs:
        disabled = self.validate_disabled(disabled)
        with collector_spares_the_process():
            return self._run(graphs, facts, debug, disabled)

    def _run(self, graphs: Graphs, facts: CompileFacts, debug: bool, disabled: frozenset[str]) -> Graphs:
        inference = graphs.inference
        ran: list[str] = []
        if debug:
            check_graphs(graphs, after="(input)", ran=ran, known_passes=self.names)
        for p in self.passes:
            if not (p.inference if inference else p.training):
                continue
            if p.name in disabled:
                self.records.append(PassRecord(p.name, 0.0, {}, skipped=True))
                continue
            start = time.perf_counter()
            facts = replace(facts, pass_reports={r.name: r.report for r in self.records if not r.skipped})
            try:
                graphs, report = p.fn(graphs, facts)
            except (BudgetError, PassError):
                raise
            except Exception as e:
                raise PassError(_failure_message(p, e, ran)) from e
            self.records.append(PassRecord(p.name, time.perf_counter() - start, report))
            ran.append(p.name)
            if debug:
                check_graphs(graphs, after=p.name, ran=ran, known_passes=self.names)
        return graphs


@contextlib.contextmanager
def collector_spares_the_process():
    """Python's cycle collector, while the passes run, scans only what they make. The passes
    allocate millions of small objects; each full collection that triggers would otherwise walk
    every object the process holds (dynamo's and AOTAutograd's traces, fake tensors: 0.15 s
    for 760,000 objects with a 24-layer model's graphs), and a deep model's planning triggers
    many. What the process held before is moved out of the collector's generations for the
    passes (``gc.freeze``) and back after. A process that froze objects itself (a server
    before it forks), or turned the collector off, is left as it is: unfreezing would undo its
    freeze. (Another thread's ``gc.freeze`` during the passes is undone with theirs.)"""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class NodeError(Exception):
    """Raised inside a pass to say which node it could not handle."""

    def __init__(self, node: fx.Node, message: str):
        super().__init__(message)
        self.node = node


def describe_node(node: fx.Node) -> str:
    text = node.format_node() or f"%{node.name}"
    line = user_source_line(node)
    return f"{text}\n    from {line}" if line else text


def user_source_line(node: fx.Node) -> str | None:
    """The innermost 'File ..., line N' of the node's stack trace, with its code."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [l.strip() for l in trace.strip().splitlines() if l.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            return f"{lines[i]}: {code}" if code else lines[i]
    return None


def _failure_message(p: Pass, e: Exception, ran: list[str]) -> str:
    where = f" at node {describe_node(e.node)}" if isinstance(e, NodeError) else ""
    bisect = "" if p.required else f" To bisect, disable it: LOHAN_DISABLE_PASSES={p.name}."
    return (
        f"lohan pass {p.name!r} failed{where}: {type(e).__name__}: {e}\n"
        f"  passes run before it: {', '.join(ran) or '(none)'}.{bisect}"
    )


def check_graphs(graphs: Graphs, *, after: str, ran: Sequence[str], known_passes: Sequence[str]) -> None:
    """Debug checks after a pass: lint, fake values present, lohan metadata well-formed."""
    for gname, gm in graphs.items():
        try:
            gm.graph.lint()
        except Exception as e:
            raise PassError(
                f"after pass {after!r}, the {gname} graph fails torch.fx lint: {e}\n"
                f"  passes run: {', '.join(ran) or '(none)'}"
            ) from e
        for node in gm.graph.nodes:
            problem = _node_problem(node, known_passes)
            if problem:
                raise PassError(
                    f"after pass {after!r}, {gname} graph node {describe_node(node)}\n"
                    f"  {problem}\n  passes run: {', '.join(ran) or '(none)'}"
                )
    if graphs.fw is not None and graphs.bw is not None:
        _check_partition(graphs, after, ran)


def _node_problem(node: fx.Node, known_passes: Sequence[str]) -> str | None:
    if node.op in ("placeholder", "call_function") and "val" not in node.meta:
        return "has no meta['val'] (every value must keep a correct fake tensor)"
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and not isinstance(val, torch._subclasses.FakeTensor):
        if val.device.type != "meta":
            return f"meta['val'] is a real {type(val).__name__}, not a fake tensor"
    info = node.meta.get("lohan")
    if info is not None and get_info(node) is None:
        return f"meta['lohan'] holds {type(info).__name__}, expected lohan_compile.meta.NodeInfo"
    if info is not None and info.made_by not in known_passes:
        return f"meta['lohan'].made_by={info.made_by!r} is not a pass of this pipeline"
    return None


def _check_partition(graphs: Graphs, after: str, ran: Sequence[str]) -> None:
    try:
        SavedValues(graphs.fw, graphs.bw)
    except ValueError as e:
        raise PassError(f"after pass {after!r}: {e}\n  passes run: {', '.join(ran)}") from None
