"""Compiling one dynamo graph: AOTAutograd with lohan's partition function, the pass
pipeline, binding what the passes decided to the runtime, then the executor (Inductor
compiling the compute between lohan's ops, or plain fx)."""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import operator
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .. import settings
from ..graph import aot
from ..dump import dump_driver, dump_graphs, plan_table
from ..graph.fxutil import storage_base
from ..graph.meta import Role, get_info
from ..graph.pipeline import CompileFacts, DataParallel, Graphs, InputFact, PassRecord, Pipeline
from ..graph.scratch import OpScratch, estimated, fused_away, writes_arguments
from ..graph.segments import LOSS_OPS, Driver, compile_segments, excess_over_plan, storage_extent, symbols_of
from ..graph.shapes import expr_of, hint_int, nbytes_hint, planning_sizes
from ..optim import live_optimizers
from ..options import Options
from .. import passes
from ..passes.chunk_loss import chunk_loss_may_apply
from ..plan.problem import Action
from ..report import GraphRecord
from ..runtime import device as device_memory
from ..runtime import grads, hosttier, keys, modules, offload, stream
from ..runtime.observed import Observed
from ..runtime.step import TRACKER
from ..errors import BudgetError
from ..units import format_bytes

log = logging.getLogger(__name__)

_graph_ids = itertools.count()


def _input_storages(example_inputs: Sequence[Any], counted: bool) -> int:
    """Bytes of the real inputs' storages on the device tier that the device counter sees
    (``counted``) or does not see (CPU stand-in: made before it started counting; host-tier
    memory is no device memory), each storage once."""
    tier = hosttier.current_if_set()
    seen: dict[int, int] = {}
    for t in example_inputs:
        if not isinstance(t, torch.Tensor) or t.device.type not in ("cpu", "cuda") \
                or isinstance(t, torch._subclasses.FakeTensor) or device_memory.counted(t) != counted:
            continue
        if not counted and (not t.numel() or (tier is not None and tier.location(t) != "device")):
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def resident_outside_bytes(example_inputs: Sequence[Any], *, collect: bool = True) -> int:
    """Device bytes held now by anything but this graph's inputs: tensors other graphs of
    the step keep for backward, optimizer state, the user's own tensors. The budget covers
    them too (DESIGN.md). Nothing, for a graph on the meta device (``lohan.explain``): the plan
    is for the model it was given, and what the process holds elsewhere is not on that device.

    ``collect``: first run Python's full collection, so that unreachable cycles (an earlier
    compiled model, dynamo's trace of this graph) count for nothing. Without it (a re-plan of a
    graph that has run: its compiled callable collected after its first step) garbage counts
    as held, which only makes the plan hold less than it could; a full collection in a process
    holding a deep model's graphs takes about a second."""
    if planned_on_meta(example_inputs):
        return 0
    if collect:
        gc.collect()
    dev = next((t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"), None)
    device_memory.install()
    return max(0, device_memory.allocated(dev) - _input_storages(example_inputs, counted=True))


def uncounted_bytes(example_inputs: Sequence[Any]) -> int:
    """Bytes of the inputs' storages the device counter does not see (CPU stand-in: made
    before it started counting, such as a model built before its first compile)."""
    return 0 if planned_on_meta(example_inputs) else _input_storages(example_inputs, counted=False)


def planned_on_meta(example_inputs: Sequence[Any]) -> bool:
    """The graph is traced on the meta device: planned (``lohan.explain``), never run for real."""
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in example_inputs)


def find_optimizer(opts: Options, example_inputs: Sequence[Any]) -> Any:
    """The CPUAdamW to offload to: the option, else a live one that owns a parameter of the graph."""
    if opts.optimizer is not None:
        return opts.optimizer
    params = [t for t in example_inputs if isinstance(t, torch.nn.Parameter)]
    for opt in live_optimizers():
        if any(opt.owns(p) for p in params):
            return opt
    return None


def describe_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any], optimizer: Any = None) -> tuple[InputFact, ...]:
    """What each example input is: a parameter, a buffer, a user input or a symbolic size; for a
    parameter, its key and what the runtime knows of it now."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    facts = []
    for i, ex in enumerate(example_inputs):
        node = placeholders[i] if i < len(placeholders) else None
        grapharg = node.meta.get("grapharg") if node is not None else None
        source = grapharg.source.name if grapharg is not None and grapharg.source is not None else None
        if isinstance(ex, torch.nn.Parameter):
            kind = "param"
        elif isinstance(ex, torch.Tensor) and torch._dynamo.utils.get_static_address_type(ex) is not None:
            kind = "buffer"  # dynamo marks module buffers (and params) as static-lifetime inputs
        elif isinstance(ex, torch.Tensor):
            kind = "input"
        else:
            kind = "symint"
        is_tensor = isinstance(ex, torch.Tensor)
        fact = InputFact(i, kind, source, bool(is_tensor and ex.requires_grad), is_tensor)
        if kind == "param":
            fact = replace(
                fact,
                key=keys.key_for(ex),
                streamed=stream.lookup(ex) is not None,
                kept_resident=stream.kept_resident(ex),
                grad_offloaded=offload.key_of(ex) is not None,
                optimizer_owns=optimizer is not None and optimizer.owns(ex),
                grad_held=(ex.grad is not None and ex.grad.layout is torch.strided and ex.requires_grad
                           and not grads.has_grad_hooks(ex)),
            )
        facts.append(fact)
    return tuple(facts)


def bind_runtime(records: Sequence[PassRecord], real_inputs: Sequence[Any], optimizer: Any) -> None:
    """What the passes decided the runtime must take on, from their reports: the gradients the
    optimizer's runtime takes during backward (``offload_grads``), which rank updates each
    parameter under data parallelism (``reduce_grads``), the parameters streamed from the host
    tier and those read resident (``stream_params``)."""
    reports = {r.name: r.report for r in records if not r.skipped}
    offloaded = reports.get("offload_grads", {}).get("offloaded_inputs", {})
    streaming = reports.get("stream_params", {})
    streamed = streaming.get("streamed_inputs", {})

    def reads_value(param: Any) -> bool:
        # its optimizer state is still to be made, or lacks the master made from the weight
        state = optimizer.state.get(param) if optimizer is not None else None
        return param.device.type != "meta" and (not state or "master" not in state)

    if offloaded:
        runtime = offload.runtime_of(optimizer)
        for idx in offloaded:
            # (a parameter an earlier compile streams has no value on the device between uses:
            # fetched, one at a time, where its value is read, and released again)
            param = real_inputs[idx]
            with stream.fetched_for_reading([param] if reads_value(param) else []):
                runtime.register(param)
        runtime.note_forward_order(reports["offload_grads"]["forward_order"])
        runtime.watch_eager_grads()
    reduced = reports.get("reduce_grads", {})
    if reduced.get("world", 1) > 1 and optimizer is not None:
        # data parallel: where the ranks share the update, each parameter's owner updates it, and
        # step() brings the others the new weight
        offload.runtime_of(optimizer).data_parallel(reduced["group"], shared=bool(reduced["owners"]))
    for idx in streaming.get("resident_inputs", ()):
        stream.keep_resident(real_inputs[idx])
    for idx, trainable in streamed.items():
        param = real_inputs[idx]
        runtime = offload.runtime_offloading(param)
        # its host copies stay in memory while the host budget keeps what the step needs beside
        # them (the optimizer runtime's reserve), on SSD beyond
        reserve = max(runtime.reserve if runtime is not None else 0, hosttier.current().spill_reserve)
        stream.register(param, trainable=trainable, updater=runtime, release=False, reserve=reserve)
    # the optimizer state is made now, not at the first update (a disk too small for the state
    # beyond the host budget is found before any step runs, never in the middle of one), after the
    # streamed weights' host buffers (the state goes where they leave room), from each weight's value
    for idx in {*offloaded, *(i for i, trainable in streamed.items() if trainable)}:
        param = real_inputs[idx]
        if reads_value(param):
            with stream.fetched_for_reading([param]), unset_fake_temporarily(), torch.no_grad():
                optimizer._state_of(param)
    for idx in streamed:
        stream.release_at_rest(real_inputs[idx])


class Slot:
    """A compiled forward or backward as AOTAutograd's runtime calls it (boxed), running the
    code of whichever plan was put in it last."""

    def __init__(self, fn: Callable[[list], Any]):
        self.fn = fn
        # (an instance attribute: wrappers such as dynamo's disable copy ``__dict__``)
        self._boxed_call = True

    def __call__(self, args: list) -> Any:
        return self.fn(args)


class NotReusable(Exception):
    """A plan made again cannot run inside the first compile's AOTAutograd wrapper."""


@dataclass
class Reuse:
    """What a later plan of the same dynamo graph reuses from the compile that traced it
    (fx executor): the joint graph and its partitions (``partition_graph`` takes them from
    ``CompileFacts.partitions``), and the callable AOTAutograd built around the compiled
    forward and backward, whose ``Slot``s take the new plan's code. Tracing the joint graph
    again is most of a compile's time (and torch's min-cut partitioner most of the rest).
    It lives as long as the compiled callable: host memory for the graphs (their nodes and
    fake values: no tensor data), not device memory."""

    compiled: Callable[..., Any] | None  # what AOTAutograd returned to dynamo (once it has)
    joint: fx.GraphModule
    joint_inputs: Any
    num_fwd_outputs: int
    partition_kwargs: dict[str, Any]
    partitions: dict[Any, tuple[fx.GraphModule, fx.GraphModule]]
    chosen: Any  # the partition the latest plan runs ("default", ("min-cut", budget)): a re-plan's first guess
    weighed: bool  # ... whether that plan weighed it against the others (``CompileFacts.partition_weighed``)
    interface: tuple  # ``aot.saved_interface`` of the first plan: another must match it
    planned: tuple[fx.GraphModule, fx.GraphModule]  # the first plan's forward and backward, as the pipeline left them
    planned_nodes: tuple[int, int]  # ... and their node counts then (AOTAutograd may edit them in place)
    fw_metadata: Any  # AOTAutograd's ViewAndMutationMeta for the forward
    forward: Slot | None = None
    backward: Slot | None = None  # (AOTAutograd compiles backward at its first run)

    @property
    def ready(self) -> bool:
        return self.compiled is not None and self.forward is not None and self.backward is not None

    def targets(self) -> tuple:
        return (self.forward.fn if self.forward else None, self.backward.fn if self.backward else None)

    def install(self, targets: tuple) -> None:
        self.forward.fn, self.backward.fn = targets


class GraphCompiler:
    """Compiles one dynamo graph: AOTAutograd, our passes, then the executor. With ``reuse``
    (a plan made again), the passes run on the joint graph traced before and the new plan's
    forward and backward run inside the callable made then (``Reuse``)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        opts: Options,
        *,
        real_inputs: Sequence[Any] | None = None,
        planning_sizes: dict | None = None,
        measured: dict[str, float] | None = None,
        variant: tuple[str, str] | None = None,
        min_cut_fraction: float | None = None,
        dropped_outputs: frozenset[int] = frozenset(),
        executor_excess: int = 0,
        outside: int = 0,
        segment_scratch: dict[tuple[str, str], int] | None = None,
        materialized: frozenset[tuple[str, str]] = frozenset(),
        fused: frozenset[tuple[str, str]] = frozenset(),
        assume_fused: bool = False,
        assume_outputs_dropped: bool = False,
        reuse: Reuse | None = None,
        data_parallel: DataParallel | None = None,
        collect_garbage: bool = True,
    ):
        real_inputs = example_inputs if real_inputs is None else real_inputs
        self.real_inputs = list(real_inputs)
        self.gm = gm
        self.example_inputs = example_inputs
        self.planning_sizes = planning_sizes
        self.measured = dict(measured or {})
        self.variant = variant  # policy "auto": which of its plans a trial asked for
        self.min_cut_fraction = min_cut_fraction  # and, for a min-cut one, its partition's
        self.dropped_outputs = dropped_outputs  # forward outputs seen dropped before backward
        self.executor_excess = executor_excess  # bytes an earlier plan ran above its prediction
        self.outside = outside  # bytes code outside the graph held between its forward and backward
        self.segment_scratch = dict(segment_scratch or {})  # bytes Inductor segments held above the plan
        self.materialized = materialized  # results Inductor segments held that the plan had fused away
        self.fused = fused  # results Inductor segments were seen to fuse into their readers
        self.assume_fused = assume_fused  # ... and whether every result they may fuse is planned fused
        self.assume_outputs_dropped = assume_outputs_dropped  # no plan fits holding the forward's outputs
        self.unseen_fused: set[tuple[str, str]] = set()  # results the plan holds, none seen fused yet
        self.reuse_from = reuse  # the compile this one plans again, if any
        self.data_parallel = data_parallel  # the group its gradients are averaged over
        self.reuse: Reuse | None = reuse  # what a later plan can reuse of this one (fx executor)
        self._partitioned: dict[str, Any] | None = None  # the partition function's arguments
        # (``_real_value``'s: the joint graph until the forward's inputs are found on it)
        self._joint: fx.GraphModule | None = None
        self._input_placeholders: dict[str, tuple[int, Any]] | None = None
        self.drivers: dict[str, Any] = {}  # the Inductor executor's, by phase
        self.opts = opts
        self.graph_id = next(_graph_ids)
        self.optimizer = find_optimizer(opts, real_inputs)
        self.inputs = describe_inputs(gm, real_inputs, self.optimizer)
        self.pipeline: Pipeline = passes.default_pipeline()
        disabled = opts.disable_passes or settings.DISABLE_PASSES.get()
        self.disabled = self.pipeline.validate_disabled(disabled)
        self.debug = opts.debug if opts.debug is not None else settings.DEBUG.get()
        self.dump_dir = opts.dump_dir or settings.DUMP_DIR.get()
        self.record = GraphRecord(
            graph_id=self.graph_id, training=False, executor=opts.executor, budget_bytes=opts.memory_budget
        )
        self.record.dump_dir = self.dump_dir
        self.observed = Observed()  # what the runtime sees of this plan (the re-planner reads it)
        self.on_meta = planned_on_meta(real_inputs)
        self.resident_outside = resident_outside_bytes(real_inputs, collect=collect_garbage)
        self.record.resident_outside_bytes = self.resident_outside
        # what a measurement run while compiling may take the device counter up to: the budget,
        # less the inputs the counter cannot see (made before it started counting), alive now
        self.measure_budget = (None if opts.memory_budget is None
                               else opts.memory_budget - uncounted_bytes(real_inputs))
        self.record.device = next(
            (t.device for t in real_inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"), None
        )

    def compile(self) -> Callable[..., Any]:
        kwargs: dict[str, Any] = {}
        if self.opts.executor == "inductor":
            # (Inductor's decompositions consult its lowerings, e.g. for max_pool2d: a process
            # that never imported them fails the trace)
            import torch._inductor.lowering  # noqa: F401
            from torch._inductor.decomposition import select_decomp_table

            kwargs["decompositions"] = select_decomp_table()
            if chunk_loss_may_apply(self.opts, self.gm):
                # the loss's ops stay whole in the joint graph for ``chunk_loss`` to find (one it
                # leaves unchunked runs as the eager kernel, which Inductor falls back to)
                kwargs["decompositions"] = {op: fn for op, fn in kwargs["decompositions"].items()
                                            if op not in LOSS_OPS}
        elif self.opts.mode != "default":
            log.info("lohan: mode=%r has no effect with the fx executor", self.opts.mode)
        try:
            if self.reuse_from is not None:
                return self._compile_again(self.reuse_from)
            with _no_donated_buffers(self.opts.executor), self._backward_compiled_now():
                compiled = aot_autograd(
                    fw_compiler=self._compile_forward,
                    bw_compiler=self._compile_backward,
                    inference_compiler=self._compile_inference,
                    partition_fn=self._partition,
                    keep_inference_input_mutations=True,
                    **kwargs,
                )(self.gm, self.example_inputs)
            if self.reuse is not None:
                self.reuse.compiled = compiled
            return compiled
        finally:
            # the compiled code keeps this object (for the lazily compiled backward): it must
            # not keep the parameters, the batch or the optimizer alive
            self.example_inputs = self.real_inputs = ()
            self._joint = self._partitioned = None  # (a Reuse keeps what later plans need)
            self.optimizer = None
            if self.opts.optimizer is not None:
                self.opts = self.opts.replace(optimizer=None)

    @property
    def probes_segments(self) -> bool:
        """Whether each Inductor segment's peak is measured against the plan's when compiled (a
        training graph under a budget, for real): a fused segment can hold more than its nodes
        run one by one, which the plan assumed."""
        # (on CUDA a measurement resets torch's peak, which a step in progress still needs)
        return (self.opts.executor == "inductor" and self.opts.memory_budget is not None and not self.on_meta
                and not (self.record.device is not None and TRACKER.step_open()))

    def _backward_compiled_now(self):
        """Segments are measured before the first step runs: backward compiles with forward then
        (AOTAutograd would compile it at the first backward, after forward ran with the plan)."""
        if not self.probes_segments:
            return contextlib.nullcontext()
        return torch._functorch.config.patch(force_non_lazy_backward_lowering=True)

    # -- AOTAutograd callbacks ------------------------------------------------

    def _facts(self, **extra: Any) -> CompileFacts:
        return CompileFacts(
            graph_id=self.graph_id,
            inputs=self.inputs,
            options=self.opts,
            optimizer=self.optimizer,
            data_parallel=self.data_parallel,
            resident_outside_bytes=self.resident_outside,
            real_inputs=self.real_inputs,
            measured_seconds=self.measured,
            variant=self.variant,
            min_cut_fraction=self.min_cut_fraction,
            dropped_outputs=self.dropped_outputs,
            executor_excess_bytes=self.executor_excess,
            outside_bytes=self.outside,
            segment_scratch=self.segment_scratch,
            op_scratch=op_scratch(self.record.device, self.on_meta, self.opts.executor, self._real_value,
                                  self.measure_budget),
            materialized=self.materialized,
            fused=self.fused,
            assume_fused=self.assume_fused,
            assume_outputs_dropped=self.assume_outputs_dropped,
            unseen_fused=self.unseen_fused,
            **extra,
        )

    def _partition(self, joint: fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int, **kwargs: Any):
        self._joint = joint  # (``_real_value`` finds the inputs on its placeholders)
        facts = self._facts(num_fwd_outputs=num_fwd_outputs, joint_inputs=joint_inputs, partition_kwargs=kwargs)
        self.record.training = True  # (before the passes: a BudgetError they raise is a training step's)
        graphs = self._run_pipeline(Graphs(joint=joint), facts)
        interface = aot.saved_interface(graphs.fw, graphs.bw, num_fwd_outputs)
        if self.opts.executor == "fx" and not self.on_meta and interface is not None and not aot.compiled_autograd_enabled():
            chosen, weighed = self._chosen_partition()
            self._partitioned = dict(joint=joint, joint_inputs=joint_inputs, num_fwd_outputs=num_fwd_outputs,
                                     partition_kwargs=kwargs, partitions=graphs.partitions,
                                     chosen=chosen, weighed=weighed, interface=interface,
                                     planned=(graphs.fw, graphs.bw),
                                     planned_nodes=(len(graphs.fw.graph.nodes), len(graphs.bw.graph.nodes)))
        return graphs.fw, graphs.bw

    def _chosen_partition(self) -> tuple[Any, bool]:
        """The partition ``partition_graph`` chose for this plan (None: it did not say), and
        whether it weighed that one against the others (it did, unless it says not)."""
        report = self.record.pass_report("partition_graph") or {}
        return report.get("partition"), report.get("weighed", True)

    def _compile_again(self, reuse: Reuse) -> Callable[..., Any]:
        """Plan the joint graph traced before again, reusing its partitions, and run the new
        plan's forward and backward inside the callable AOTAutograd made then. Raises
        ``NotReusable`` where the new plan does not fit that callable (before any step runs it;
        the runtime is bound to it already, as the plan traced again will bind it)."""
        self._joint = reuse.joint
        facts = self._facts(num_fwd_outputs=reuse.num_fwd_outputs, joint_inputs=reuse.joint_inputs,
                            partition_kwargs=reuse.partition_kwargs, partitions=reuse.partitions,
                            partition_choice=None if self.variant is not None else reuse.chosen,
                            partition_weighed=reuse.weighed)
        self.record.training = True
        graphs = self._run_pipeline(Graphs(joint=reuse.joint), facts)
        reuse.partitions.update(graphs.partitions)
        if aot.saved_interface(graphs.fw, graphs.bw, reuse.num_fwd_outputs) != reuse.interface:
            raise NotReusable("the new plan saves other kinds of values for backward than the first")
        forward = self._executable(graphs.fw, self.real_inputs, phase="forward")
        backward = self._executable(graphs.bw, self.real_inputs, phase="backward")
        if self.variant is None:
            reuse.chosen, reuse.weighed = self._chosen_partition()
        # (between steps: the wrapper reads it when a forward saves its values)
        aot.retarget_saved_metadata(reuse.fw_metadata, graphs.fw, reuse.num_fwd_outputs)
        reuse.install((forward, backward))
        return reuse.compiled

    def _compile_inference(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        graphs = self._run_pipeline(Graphs(fw=gm), self._facts())
        return self._executable(graphs.fw, example_inputs, phase="inference")

    def _compile_forward(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        partitioned = self._partitioned
        unchanged = partitioned is not None and _as_planned(gm, partitioned["planned"][0], partitioned["planned_nodes"][0])
        fn = self._executable(gm, example_inputs, phase="forward")
        fw_metadata = aot.forward_metadata()
        if not unchanged or fw_metadata is None:
            return fn  # (AOTAutograd rewrote the forward after partitioning: a later plan would lack that)
        self.reuse = Reuse(compiled=None, fw_metadata=fw_metadata, forward=Slot(fn), **self._partitioned)
        return self.reuse.forward

    def _compile_backward(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        unchanged = self.reuse is not None and _as_planned(gm, self.reuse.planned[1], self.reuse.planned_nodes[1])
        fn = self._executable(gm, example_inputs, phase="backward")
        if not unchanged:
            return fn  # (no Reuse is ready without its backward: later plans are traced again)
        self.reuse.backward = Slot(fn)
        return self.reuse.backward

    # -- helpers ----------------------------------------------------------------

    def _run_pipeline(self, graphs: Graphs, facts: CompileFacts) -> Graphs:
        with planning_sizes(self.planning_sizes):
            graphs = self.pipeline.run(graphs, facts, debug=self.debug, disabled=self.disabled)
        bind_runtime(self.pipeline.records, self.real_inputs, self.optimizer)
        if not self.on_meta:
            # the modules that own what the runtime now manages wait for it outside the step
            modules.watch_later(modules.roots_of_sources(f.source for f in self.inputs if f.kind == "param"))
        self.record.passes = self.pipeline.records
        saved = self.record.pass_report("classify_saved")
        if saved is not None:
            self.record.kept_bytes_expr = saved["kept_bytes_expr"]
            self.record.recomputed_bytes_expr = saved["recomputed_bytes_expr"]
            self.record.swapped_bytes_expr = expr_of(0)
        planned = self.record.pass_report("plan_memory")
        if planned is not None and self.record.pass_report("apply_plan") is not None:
            self.record.apply_plan_totals(planned["plan"], planned["problem"])
        if planned is not None:
            self.record.watch_outputs = tuple(sorted(planned["problem"].user_outputs))
            self.record.watch_objects = planned["problem"].saved_outputs
            if self.assume_outputs_dropped:
                problem = planned["problem"]
                self.record.must_drop = {
                    pos: problem.buffers[key].bytes for pos, (key, _) in problem.user_outputs.items()
                    if pos in problem.dropped_outputs}
        if self.opts.policy == "auto":
            self.record.note_variants()
        if graphs.fw is not None:
            vals = [n.meta.get("val") for n in graphs.fw.graph.nodes if n.op == "placeholder"]
            self.record.fw_placeholder_vals = vals
            self.record.symbolic = any(_is_symbolic(v) for v in vals)
        if self.dump_dir:
            dump_graphs(self.dump_dir, self.record, graphs)
        if log.isEnabledFor(logging.INFO):
            log.info("%s", describe_compile(self.record, graphs))
        if planned is not None and log.isEnabledFor(logging.DEBUG):
            log.debug("%s plan:\n%s", self.record.name, plan_table(planned["plan"], planned["problem"]))
        return graphs

    def _executable(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *, phase: str):
        # explain() traces on the meta device: nothing runs there worth compiling
        on_meta = any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in example_inputs)
        if self.opts.executor == "inductor" and not on_meta:
            fn = self._inductor(gm, example_inputs, phase)
        else:
            self.record.executor = "fx"
            from torch.fx.graph import _BoxedCodeGen

            # Boxed calling lets the graph free its inputs as soon as it has used them.
            gm.graph.set_codegen(_BoxedCodeGen())
            gm.recompile()
            fn = gm
            timing = self.record.device is None and phase != "inference"
            if (timing or self.debug) and not on_meta:
                fn = self._fx_driver(gm, phase, timing)
        if phase == "inference":
            return _boxed(fn)
        return _tracked(fn, self.record, self.observed, phase)

    def _fx_driver(self, gm: fx.GraphModule, phase: str, timing: bool) -> Callable[[list], Any]:
        """The fx graph, whose first calls run through a driver that times every op (the
        same generated code the Inductor executor runs, with no segments: each op a call of
        its own, each value released at its last use), so that the fx executor's plans are
        calibrated too; the other calls run the GraphModule itself. In debug mode every call
        runs through the driver, checking that each op reads device memory only."""
        items = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        driver = Driver(gm, items, f"graph{self.graph_id}_{phase}", timing=timing, check=self._compute_check())
        if timing:
            self.drivers[phase] = driver
        last_timed = max(Driver.TIMED_CALLS) if timing else -1

        def run(args: list) -> Any:
            if driver.calls <= last_timed or self.debug:
                return driver(args)
            return gm(args)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def _inductor(self, gm: fx.GraphModule, example_inputs: Sequence[Any], phase: str):
        """Inductor compiles the compute between lohan's ops (``graph/segments.py`` says why and how)."""
        from torch._inductor import config as inductor_config
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx_inner

        patches = {k: v for k, v in list_mode_options(self.opts.mode).items() if "cudagraphs" not in k}
        # inside a segment the plan's order is the order that runs (fusion aside)
        patches["reorder_for_peak_memory"] = False
        # random ops (dropout's ``rand``) run torch's kernels: Inductor rewrites them into its own
        # only in the passes over a whole joint graph, which segments do not go through (T5 with
        # dropout failed to lower), and its own would draw other numbers than eager's
        patches["fallback_random"] = True

        def compile_one(sub: fx.GraphModule, inputs: Sequence[Any]):
            # A segment with symbolic sizes shares the graph's shape environment, whose guards
            # also name sizes of other segments; a cached entry's guards then cannot be checked
            # against this segment's inputs alone (torch 2.13 fails looking them up): such
            # segments skip the FX graph cache (Inductor's kernel cache still applies).
            no_fx_cache = {"fx_graph_cache": False} if any(symbols_of(v) for v in inputs) else {}
            with inductor_config.patch({**patches, **no_fx_cache}):
                return compile_fx_inner(
                    sub,
                    inputs,
                    is_backward=phase == "backward",
                    is_inference=phase == "inference",
                    graph_id=self.graph_id,
                )

        # Inductor reports a graph's output strides to AOTAutograd through the tracing
        # context, which restrides backward's inputs with them; each segment would report its
        # own. Segments keep every output's planned strides, so nothing needs reporting.
        context = torch._guards.TracingContext.try_get()
        reported = context.output_strides if context is not None else None
        if context is not None:
            context.output_strides = None
        try:
            # the CPU stand-in's compute is synchronous: a host clock times it
            timing = self.record.device is None and phase != "inference"
            probe = functools.partial(self._probe, phase) if self.probes_segments and phase != "inference" else None
            driver = compile_segments(gm, compile_one, f"graph{self.graph_id}_{phase}", timing=timing, probe=probe,
                                      check=self._compute_check())
        finally:
            if context is not None:
                context.output_strides = reported
        self.drivers[phase] = driver
        if probe is not None:
            # an op run alone between lohan's ops (not compiled) makes its result in memory too
            where = "fw" if phase == "forward" else "bw"
            for item in driver.items:
                if isinstance(item, fx.Node) and item.op == "call_function" and isinstance(item.meta.get("val"), torch.Tensor):
                    self.record.segment_outputs[(where, item.name)] = nbytes_hint(item.meta["val"])
        self.record.segments[phase] = driver.describe()
        if self.dump_dir:
            dump_driver(self.dump_dir, self.record, phase, driver.source)
        return driver


    def _compute_check(self) -> Callable[[str, list], None] | None:
        """Debug mode: the check that compute reads device memory only (``device.check_reads``)."""
        if not self.debug:
            return None
        on = self.record.device

        def check(what: str, tensors: list) -> None:
            device_memory.check_reads(what, tensors, on)

        return check

    def _probe(self, phase: str, seg: Any, sub: fx.GraphModule, compiled: Callable[[list], Any],
               vals: Sequence[Any]) -> None:
        """Measure an Inductor segment against the plan's model of its nodes; what it holds
        above that is held in the next plan where the model peaks (``segment_scratch``), and its
        outputs exist in memory (``segment_outputs``)."""
        try:
            with unset_fake_temporarily():
                real = [None if written else self._real_value(n)
                        for written, n in zip(written_inputs(sub), seg.inputs)]
            excess, position, ran = excess_over_plan(
                sub, compiled, vals, device_memory, self.record.device,
                op_scratch(self.record.device, False, "inductor", self._real_value, self.measure_budget),
                [storage_group(n) for n in seg.inputs], [held_by_caller(n) for n in seg.inputs], real,
                self.measure_budget)
        except Exception as e:  # noqa: BLE001 - a segment that cannot run is not measured
            log.warning("lohan %s: a segment's peak could not be measured when compiled (%s: %s); the "
                        "budget then rests on the runtime's measurement of the first steps",
                        self.record.name, type(e).__name__, e)
            return
        if not ran:
            log.debug("lohan %s: a segment of %s was not run to be measured (no room under the budget "
                      "now); the plan holds what it could hold with nothing fused", self.record.name, phase)
        where = "fw" if phase == "forward" else "bw"
        if ran:
            self.record.segment_measured |= {(where, n.name) for n in seg.nodes if n.op == "call_function"}
        for n in seg.outputs:
            if isinstance(n.meta.get("val"), torch.Tensor):
                self.record.segment_outputs[(where, n.name)] = nbytes_hint(n.meta["val"])
        outputs = set(seg.outputs)
        self.record.segment_fused |= {(where, n.name) for n in seg.nodes if n not in outputs and fused_away(n)}
        if excess > 0:
            # held at the node the plan's model of the segment peaks at (before any node: at all)
            nodes = [seg.nodes[position]] if position is not None else seg.nodes
            for n in nodes:
                if n.op == "call_function":
                    self.record.segment_scratch[(where, n.name)] = excess
                    if not ran:
                        self.record.segment_bounds.add((where, n.name))


    def _real_value(self, node: fx.Node) -> torch.Tensor | None:
        """The step's own tensor for a value its caller holds (``held_by_caller``: a parameter, a
        buffer, the batch, or a view of one), viewed as ``node``'s value is: measurements run on
        it rather than on a copy beside it. None where there is none to be had: another value,
        a tensor without data here (a streamed parameter), on another device, or laid out
        otherwise than the graph was traced with (a re-plan's call)."""
        if not held_by_caller(node):
            return None
        base = storage_base(node)
        info = get_info(base)
        placeholder = (info.input_index, base.meta.get("val"))
        if info.role is Role.SAVED:
            if self._input_placeholders is None:
                joint, self._joint = self._joint, None  # (found once: this compiler lets the joint graph go)
                self._input_placeholders = {} if joint is None else {
                    n.name: (i.input_index, n.meta.get("val")) for n in joint.graph.nodes
                    if n.op == "placeholder" and (i := get_info(n)) is not None and i.input_index is not None}
            placeholder = self._input_placeholders.get(info.storage_of, (None, None))
        index, traced = placeholder
        val = node.meta.get("val")
        if index is None or index >= len(self.real_inputs) or not isinstance(val, torch.Tensor):
            return None
        real = self.real_inputs[index]
        if (type(real) not in (torch.Tensor, torch.nn.Parameter) or real.layout is not torch.strided
                or real.dtype != val.dtype or real.device != val.device or not isinstance(traced, torch.Tensor)):
            return None
        # the node's view reaches the storage as the traced input's did: the real input must be
        # laid out as that one was
        if (list(real.shape) != [hint_int(d) for d in traced.shape]
                or list(real.stride()) != [hint_int(d) for d in traced.stride()]
                or real.storage_offset() != hint_int(traced.storage_offset())):
            return None
        shape = [hint_int(d) for d in val.shape]
        stride = [hint_int(d) for d in val.stride()]
        offset = hint_int(val.storage_offset())
        if storage_extent(val) * real.element_size() > real.untyped_storage().nbytes():
            return None
        return real.detach().as_strided(shape, stride, offset)


def _as_planned(gm: fx.GraphModule, planned: fx.GraphModule, nodes: int) -> bool:
    """AOTAutograd hands the compiler the graph the pipeline returned, or a copy of it (the
    backward), unchanged: it rewrites some after partitioning (effect tokens, saved-tensor
    hooks), and a later plan would lack that."""
    if len(gm.graph.nodes) != nodes:
        return False
    return gm is planned or all(a.op == b.op and a.target == b.target for a, b in zip(gm.graph.nodes, planned.graph.nodes))


def written_inputs(gm: fx.GraphModule) -> list[bool]:
    """For each placeholder of ``gm``, whether an op of ``gm`` may write into its storage: it
    (or a view of it) is an argument of an op that may write into its arguments
    (``scratch.writes_arguments``; a node that is no plain function call counts as one). A
    measurement runs a segment on the step's own tensors only where it cannot write into
    them: in AOTAutograd's functional graphs batch norm's running statistics are written
    by a ``copy_``, the batch and the weights are not, and a copy of them would be measured
    too."""
    written: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr") or n.target is operator.getitem:
            continue
        if n.op != "call_function" or writes_arguments(n.target):
            written |= {storage_base(a) for a in n.all_input_nodes}
    return [n in written for n in gm.graph.nodes if n.op == "placeholder"]


def storage_group(node: fx.Node) -> Any:
    """Which storage a segment input is a view of where the step runs: a value backward saved
    is a view of its forward storage (``storage_of``), shared with the other values saved from
    it; any other, of the node that made its storage."""
    base = storage_base(node)
    info = get_info(base)
    if base.op == "placeholder" and info is not None and info.role is Role.SAVED and info.storage_of:
        return ("saved", info.storage_of)
    return ("node", base.name)


def held_by_caller(node: fx.Node) -> bool:
    """A segment input whose storage the step's caller keeps (a parameter, a buffer, the batch,
    a saved view of one of them): it outlives the segment, whatever the segment frees."""
    base = storage_base(node)
    info = get_info(base)
    if base.op != "placeholder" or info is None:
        return False
    if info.role is Role.SAVED:
        return info.saved_input_view
    return info.role in (Role.PARAM, Role.BUFFER, Role.INPUT)


def op_scratch(device: torch.device | None, on_meta: bool, executor: str | None,
               real_value: Callable[[fx.Node], torch.Tensor | None] | None = None,
               budget: int | None = None) -> Callable[[fx.Node], int]:
    """How the plan learns each op's scratch (``graph/scratch.py``): measured on the graph's
    device (None: the CPU stand-in), or estimated where nothing can run there (a graph planned on
    meta; on CUDA while a step is in progress, whose peak statistics a measurement would reset;
    an op whose measurement would not fit ``budget`` beside what the device holds now).
    ``real_value``: the step's own tensor for an argument, where it has one."""
    if on_meta or (device is not None and device.type == "cuda" and TRACKER.step_open()):
        return estimated(executor)
    return OpScratch(device, device_memory, inductor=executor == "inductor", real_value=real_value, budget=budget)


def _no_donated_buffers(executor: str):
    """AOTAutograd marks backward inputs it thinks Inductor may overwrite ("donated buffers",
    by their index in the backward graph). Segments number their inputs differently, and a
    saved value may be a buffer a copy still reads: nothing is donated."""
    if executor != "inductor":
        return contextlib.nullcontext()
    return torch._functorch.config.patch(donated_buffer=False)


def describe_compile(record: GraphRecord, graphs: Graphs) -> str:
    """One paragraph per compiled graph, for TORCH_LOGS="+lohan_compile"."""
    sizes = ", ".join(f"{name} {len(gm.graph.nodes)} nodes" for name, gm in graphs.items())
    text = f"lohan {record.name} ({'training' if not graphs.inference else 'forward only'}, {record.executor}): {sizes}"
    planned = record.pass_report("plan_memory")
    if planned is not None:
        plan = planned["plan"]
        text += (
            f"; policy {plan.policy}: {len(plan.decisions)} saved activations "
            f"(keep {plan.count(Action.KEEP)}, swap {plan.count(Action.SWAP)}, "
            f"recompute {plan.count(Action.RECOMPUTE)}); predicted step "
            f"{plan.prediction.step_seconds * 1e3:.3f} ms, device peak {format_bytes(plan.prediction.peak_device_bytes)}"
        )
    timings = ", ".join(f"{r.name} {r.seconds * 1e3:.1f} ms" for r in record.passes if not r.skipped)
    return text + f"; passes: {timings}"


def _check_outputs_dropped(record: GraphRecord, run: Any) -> None:
    """A plan that fits only with the forward's outputs released when forward ends (the first
    plan, made before any step showed which the user keeps) refuses a backward whose forward's
    outputs are still alive: running it would pass the budget."""
    kept = [pos for pos, _ in run.alive_refs if pos in record.must_drop]
    if not kept:
        return
    # (reference cycles, dynamo's trace of a graph compiled during the step among them, may hold
    # an output the loop dropped until Python's next full collection)
    gc.collect()
    kept = sorted(pos for pos, expired in run.alive_refs if pos in record.must_drop and not expired())
    if not kept:
        return
    held = sum(record.must_drop[pos] for pos in kept)
    need = (f"or raise memory_budget to at least {format_bytes(record.must_drop_budget)} (the smallest plan "
            "that holds them)" if record.must_drop_budget else "or raise memory_budget")
    raise BudgetError(
        f"memory_budget={format_bytes(record.budget_bytes)} fits {record.name}'s step only if the step drops "
        f"the forward's outputs before backward, and {len(kept)} of them ({format_bytes(held)}: the "
        f"outputs at positions {kept}) are still alive when backward starts. Keep only what backward "
        "needs (loss = model(**batch).loss, or del the output object before loss.backward()), "
        f"{need}.", smallest_feasible_bytes=record.must_drop_budget)


def _is_symbolic(val: Any) -> bool:
    if isinstance(val, torch.SymInt):
        return True
    return isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape)


def _boxed(fn: Callable[[list], Any]) -> Callable[[list], Any]:
    def run(args: list) -> Any:
        return fn(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _tracked(fn: Callable[[list], Any], record: GraphRecord, observed: Observed, phase: str) -> Callable[[list], Any]:
    """Tell the step tracker when this graph runs (boxed: ``fn`` may clear ``args``)."""
    if phase == "forward":
        def run(args: list) -> Any:
            step_run = TRACKER.forward_begin(record, args, observed)
            start = time.perf_counter()
            try:
                out = fn(args)
                TRACKER.forward_outputs(step_run, out)
                return out
            except BaseException:
                TRACKER.forward_dropped(step_run)  # (Ctrl-C, an error): no backward follows it
                raise
            finally:
                TRACKER.end(step_run, start)
                observed.ran("forward", step_run.seconds)
    else:
        def run(args: list) -> Any:
            step_run = TRACKER.backward_begin(record, observed)
            start = time.perf_counter()
            try:
                _check_outputs_dropped(record, step_run)
                return fn(args)
            except BaseException:
                step_run.failed = True
                raise
            finally:
                TRACKER.end(step_run, start)
                observed.ran("backward", step_run.seconds)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run
