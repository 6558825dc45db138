"""The ``lohan`` torch.compile backend.

``torch.compile(model, backend="lohan", options={...})`` finds
``lohan_backend`` through the ``torch_dynamo_backends`` entry point. Dynamo
hands it an FX graph and example inputs (the real parameters); the backend
builds AOTAutograd with its own partition function, so the joint
forward+backward graph goes through the pass pipeline, then runs the forward
and backward graphs as plain fx or compiled by Inductor (``executor``).

``mode=``: torch passes its compile mode to custom backends. With the
Inductor executor the mode selects Inductor's options (max-autotune and so on)
except CUDA graphs, which cannot capture lohan's host-side copies and
optimizer; with the fx executor it has no effect (a log message says so).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd

from . import settings
from .dump import dump_graphs
from .errors import LohanError
from .meta import Kind
from .options import Options
from .planner import Action
from .pipeline import CompileFacts, Graphs, InputFact, Pipeline
from .report import GraphRecord
from .runtime.step import TRACKER
from .shapes import expr_of

log = logging.getLogger(__name__)

_graph_ids = itertools.count()


def lohan_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Any = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """torch.compile backend entry point (see the module docstring)."""
    opts = Options.coerce(options, mode=mode)
    check_supported(opts)
    return GraphCompiler(gm, example_inputs, opts).compile()


def check_supported(opts: Options) -> None:
    """Refuse, with a clear message, options this version cannot honour yet.

    Accepting them would silently run something other than what was asked.
    """
    unsupported = []
    if opts.offload_params is True:
        unsupported.append("offload_params=True (parameter streaming)")
    if opts.ssd_dir is not None or opts.host_memory_budget is not None:
        unsupported.append("ssd_dir / host_memory_budget (host and SSD tiers)")
    if opts.policy in ("torch-min-cut", "zero-infinity", "zero-offload"):
        unsupported.append(f"policy={opts.policy!r}")
    if opts.policy == "swap-all":
        from .passes.plan_memory import swap_ops_available

        if not swap_ops_available():
            unsupported.append("policy='swap-all' (the host tier's swap ops are not built)")
    if unsupported:
        raise LohanError(
            "lohan_compile 0.1 cannot honour these options yet: "
            + "; ".join(unsupported)
            + ". Remove them, or use policy 'auto', 'keep-all' or 'recompute-all'."
        )


def describe_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[InputFact, ...]:
    """What each example input is: a parameter, a buffer, a user input or a symbolic size."""
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
        facts.append(InputFact(i, kind, source, bool(is_tensor and ex.requires_grad), is_tensor))
    return tuple(facts)


class GraphCompiler:
    """Compiles one dynamo graph: AOTAutograd, our passes, then the executor."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options):
        from .passes import default_pipeline

        self.gm = gm
        self.example_inputs = example_inputs
        self.opts = opts
        self.graph_id = next(_graph_ids)
        self.inputs = describe_inputs(gm, example_inputs)
        self.pipeline: Pipeline = default_pipeline()
        disabled = opts.disable_passes or settings.DISABLE_PASSES.get()
        self.disabled = self.pipeline.validate_disabled(disabled)
        self.debug = opts.debug if opts.debug is not None else settings.DEBUG.get()
        self.dump_dir = opts.dump_dir or settings.DUMP_DIR.get()
        self.record = GraphRecord(
            graph_id=self.graph_id, training=False, executor=opts.executor, budget_bytes=opts.memory_budget
        )

    def compile(self) -> Callable[..., Any]:
        kwargs: dict[str, Any] = {}
        if self.opts.executor == "inductor":
            from torch._inductor.decomposition import select_decomp_table

            kwargs["decompositions"] = select_decomp_table()
        elif self.opts.mode != "default":
            log.info("lohan: mode=%r has no effect with the fx executor", self.opts.mode)
        return aot_autograd(
            fw_compiler=self._compile_forward,
            bw_compiler=self._compile_backward,
            inference_compiler=self._compile_inference,
            partition_fn=self._partition,
            keep_inference_input_mutations=True,
            **kwargs,
        )(self.gm, self.example_inputs)

    # -- AOTAutograd callbacks ------------------------------------------------

    def _facts(self, **extra: Any) -> CompileFacts:
        return CompileFacts(graph_id=self.graph_id, inputs=self.inputs, options=self.opts, **extra)

    def _partition(self, joint: fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int, **kwargs: Any):
        facts = self._facts(num_fwd_outputs=num_fwd_outputs, joint_inputs=joint_inputs, partition_kwargs=kwargs)
        graphs = self._run_pipeline(Graphs(joint=joint), facts)
        self.record.training = True
        return graphs.fw, graphs.bw

    def _compile_inference(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        graphs = self._run_pipeline(Graphs(fw=gm), self._facts())
        return self._executable(graphs.fw, example_inputs, phase="inference")

    def _compile_forward(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        return self._executable(gm, example_inputs, phase="forward")

    def _compile_backward(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        return self._executable(gm, example_inputs, phase="backward")

    # -- helpers ----------------------------------------------------------------

    def _run_pipeline(self, graphs: Graphs, facts: CompileFacts) -> Graphs:
        graphs = self.pipeline.run(graphs, facts, debug=self.debug, disabled=self.disabled)
        self.record.passes = self.pipeline.records
        saved = self.record.pass_report("classify_saved")
        if saved is not None:
            self.record.kept_bytes_expr = saved["kept_bytes_expr"]
            self.record.recomputed_bytes_expr = saved["recomputed_bytes_expr"]
            self.record.swapped_bytes_expr = expr_of(0)
        planned = self.record.pass_report("plan_memory")
        if planned is not None and self.record.pass_report("apply_plan") is not None:
            self.record.apply_plan_totals(planned["plan"], planned["problem"])
        if graphs.fw is not None:
            vals = [n.meta.get("val") for n in graphs.fw.graph.nodes if n.op == "placeholder"]
            self.record.fw_placeholder_vals = vals
            self.record.symbolic = any(_is_symbolic(v) for v in vals)
        if self.dump_dir:
            dump_graphs(self.dump_dir, self.record, graphs)
        if log.isEnabledFor(logging.INFO):
            log.info("%s", describe_compile(self.record, graphs))
        if planned is not None and log.isEnabledFor(logging.DEBUG):
            from .dump import plan_table

            log.debug("%s plan:\n%s", self.record.name, plan_table(planned["plan"], planned["problem"]))
        return graphs

    def _executable(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *, phase: str):
        if self.opts.executor == "inductor":
            fn = self._inductor(gm, example_inputs, phase)
        else:
            from torch.fx.graph import _BoxedCodeGen

            # Boxed calling lets the graph free its inputs as soon as it has used them.
            gm.graph.set_codegen(_BoxedCodeGen())
            gm.recompile()
            fn = gm
        if phase == "inference":
            return _boxed(fn)
        return _tracked(fn, self.record, phase)

    def _inductor(self, gm: fx.GraphModule, example_inputs: Sequence[Any], phase: str):
        from torch._inductor import config as inductor_config
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx_inner

        patches = {k: v for k, v in list_mode_options(self.opts.mode).items() if "cudagraphs" not in k}
        if phase != "backward":
            # Inductor keeps the strides of user-visible outputs as eager would.
            out = gm.graph.output_node()
            info = out.meta.get("lohan")
            kinds = getattr(info, "outputs", ())
            out.meta["user_visible_output_idxs"] = [
                i for i, k in enumerate(kinds) if k in (Kind.USER_OUTPUT, Kind.MUTATION)
            ]
        with inductor_config.patch(patches):
            return compile_fx_inner(
                gm,
                example_inputs,
                is_backward=phase == "backward",
                is_inference=phase == "inference",
                graph_id=self.graph_id,
            )


def describe_compile(record: GraphRecord, graphs: Graphs) -> str:
    """One paragraph per compiled graph, for TORCH_LOGS="+lohan_compile"."""
    from .options import format_bytes

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


def _is_symbolic(val: Any) -> bool:
    if isinstance(val, torch.SymInt):
        return True
    return isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape)


def _boxed(fn: Callable[[list], Any]) -> Callable[[list], Any]:
    def run(args: list) -> Any:
        return fn(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _tracked(fn: Callable[[list], Any], record: GraphRecord, phase: str) -> Callable[[list], Any]:
    """Tell the step tracker when this graph runs (boxed: ``fn`` may clear ``args``)."""
    if phase == "forward":
        def run(args: list) -> Any:
            step_run = TRACKER.forward_begin(record, args)
            start = time.perf_counter()
            try:
                return fn(args)
            finally:
                TRACKER.end(step_run, start)
    else:
        def run(args: list) -> Any:
            step_run = TRACKER.backward_begin(record)
            start = time.perf_counter()
            try:
                return fn(args)
            finally:
                TRACKER.end(step_run, start)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run
