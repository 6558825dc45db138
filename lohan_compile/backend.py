"""The ``lohan`` torch.compile backend.

``torch.compile(model, backend="lohan", options={...})`` finds
``lohan_backend`` through the ``torch_dynamo_backends`` entry point. Dynamo
hands it an FX graph and example inputs (the real parameters); the backend
builds AOTAutograd with its own partition function, so the joint
forward+backward graph goes through the pass pipeline, then runs the forward
and backward graphs (``executor``): by default Inductor compiles the compute
between lohan's ops, which run in the planned order (``segments.py``);
``executor="fx"`` runs them as plain fx.

``mode=``: torch passes its compile mode to custom backends. With the
Inductor executor the mode selects Inductor's options (max-autotune and so on)
except CUDA graphs, which cannot capture lohan's host-side copies and
optimizer; with the fx executor it has no effect (a log message says so).
"""

from __future__ import annotations

import gc
import itertools
import logging
import statistics
import time
import weakref
from dataclasses import replace
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import settings
from .dump import dump_graphs
from .errors import BudgetError, LohanError
from .graph.pipeline import CompileFacts, Graphs, InputFact, PassRecord, Pipeline
from .graph.shapes import expr_of, hint_int, planning_sizes
from .optim import live_optimizers
from .ops import swap_ops_available
from .options import Options
from .plan.problem import Action
from .report import GraphRecord
from .runtime import device as device_memory
from .runtime import keys, offload, stream
from .runtime.step import TRACKER
from .units import format_bytes

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
    if opts.hardware == "auto" and any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs):
        from .hardware import auto

        opts = opts.replace(hardware=auto(device="cuda"))  # plan a GPU's graph with the GPU's speeds
    check_supported(opts)
    use_host_tier(opts)
    return Replanning(gm, example_inputs, opts)


_tiers: dict[tuple[int | None, str | None], Any] = {}


def use_host_tier(opts: Options) -> None:
    """With ``host_memory_budget`` or ``ssd_dir``, the host tier the step uses is one with that
    budget and SSD folder (made once per setting, kept current): swapped activations and
    gradients live in it, and optimizer state beyond the budget goes to its SSD folder."""
    if opts.host_memory_budget is None and opts.ssd_dir is None:
        return
    from .runtime import hosttier

    key = (opts.host_memory_budget, opts.ssd_dir)
    tier = _tiers.get(key)
    if tier is None or tier.closed:
        arena = None if opts.host_memory_budget is None else max(1 << 20, min(256 << 20, opts.host_memory_budget // 8))
        kwargs = {} if arena is None else {"arena_bytes": arena}
        tier = _tiers[key] = hosttier.HostTier.from_options(opts, **kwargs)
    current = hosttier.current_if_set()
    if current is None or current._obj is not tier._obj:
        if any(t._obj is (current._obj if current else None) for k, t in _tiers.items() if k != key):
            log.warning("lohan: host_memory_budget/ssd_dir changed from an earlier compile; the process "
                        "has one current host tier, and graphs compiled before now use the new one too")
        hosttier.set_current(tier)


class Replanning:
    """The callable dynamo runs: the compiled graph, planned again when the plan no longer fits.

    A plan is made when the graph is compiled, for what is resident then and for the sizes
    seen then. Later steps can differ:
    - the device holds more (a torch optimizer creates its state after the first step,
      another model is loaded): before each forward, one counter read compares the device
      level with the level the plan was made at; when the growth would push the predicted
      peak past the budget, the graph is planned again;
    - a graph with symbolic sizes (dynamo recompiled it for a second shape) runs with a
      size larger than the plan was made for: it is planned again for 1.5x the new size,
      so that a slowly growing size does not re-plan at every step.
    Re-planning runs AOTAutograd and the passes again on the same dynamo graph (its fake
    inputs, under the tracing context of the first compile, so symbolic sizes stay
    symbolic); the new plan runs from this call on.
    """

    MAX_REPLANS = 8
    HEADROOM = 1.5
    # trials (policy "auto" under a budget, ``tune_plans``): the simulator's error on this
    # machine can exceed the differences between auto's plans, so the plans predicted within
    # TRIAL_MARGIN of the chosen one (at most TRIAL_PLANS, the chosen one included) are each
    # compiled and run TRIAL_WARMUP steps, then run in turn for TRIAL_STEPS rounds
    # (interleaved: the machine's drift hits all alike). Another plan replaces the chosen one
    # only where its graph time over the chosen one's, round by round, has a median below
    # TRIAL_SWITCH: on a busy machine single steps of one plan vary by a tenth, and a trial
    # that followed its fastest median switched on noise (the planner bench: a plan 5%
    # faster in its trial ran 14% slower after)
    TRIAL_MARGIN = 1.15
    TRIAL_PLANS = 3
    TRIAL_WARMUP = 2
    TRIAL_STEPS = 8
    TRIAL_SWITCH = 0.97

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options):
        self.gm = gm
        # the optimizer weakly: dynamo may keep compiled code (and this object) alive
        # longer than the model; it must not keep the optimizer's state alive with it
        self.optimizer_ref = weakref.ref(opts.optimizer) if opts.optimizer is not None else None
        self.opts = opts.replace(optimizer=None) if opts.optimizer is not None else opts
        self.replans = 0
        # compute seconds by node, once the Inductor executor has timed some steps: they
        # calibrate this plan's prediction and replace the estimates when re-planning
        self.measured: dict[str, float] = {}
        self.drivers: dict = {}
        self.tracing = torch._guards.TracingContext.try_get()
        self.fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        self.size_slots = _size_slots(self.fakes)
        self.planned_sizes = {sym: hint_int(value) for sym, value in _symbol_values(self.fakes).items()}
        self.trial: dict[str, Any] | None = None
        # forward outputs every backward so far found gone (None: no backward yet)
        self.dropped: frozenset[int] | None = None
        # device bytes a plan of this graph was measured to hold above its predicted peak, when
        # that took the step past the budget: every plan from then on is made holding them
        self.excess = 0
        self._compile(example_inputs, example_inputs, None)
        self._start_trial()

    def _compile(self, aot_inputs: Sequence[Any], real_inputs: Sequence[Any], sizes: dict | None,
                 variant: tuple[str, str] | None = None) -> None:
        opts = self.opts
        if self.optimizer_ref is not None:
            optimizer = self.optimizer_ref()
            if optimizer is None:
                raise LohanError("the CPUAdamW this model was compiled with no longer exists")
            opts = opts.replace(optimizer=optimizer)
        compiler = GraphCompiler(
            self.gm, aot_inputs, opts, real_inputs=real_inputs, planning_sizes=sizes, measured=self.measured,
            variant=variant, dropped_outputs=self.dropped or frozenset(), executor_excess=self.excess,
        )
        self.fn = compiler.compile()
        self.record = compiler.record
        self.drivers = compiler.drivers  # filled as AOTAutograd compiles (backward: at its first run)
        self.calibrated = False
        self.collected = False
        self.planned_level = self.record.planned_level = device_memory.allocated(self.record.device)

    def _grown_sizes(self, args: Sequence[Any]) -> dict | None:
        grown = False
        now = dict(self.planned_sizes)
        for i, dim, sym in self.size_slots:
            a = args[i]
            value = a if dim is None else a.shape[dim]
            if isinstance(value, int) and value > now[sym]:
                now[sym] = value
                grown = True
        if not grown:
            return None
        return {s: (int(v * self.HEADROOM) if v > self.planned_sizes[s] else v) for s, v in now.items()}

    def _size_now(self, args: Sequence[Any], sym: Any) -> int:
        for i, dim, s in self.size_slots:
            if s == sym:
                value = args[i] if dim is None else args[i].shape[dim]
                return int(value)
        return 0

    def _stale(self) -> bool:
        budget, predicted = self.opts.memory_budget, self.record.predicted_peak_bytes
        if budget is None or predicted is None or not self.record.training:
            return False
        growth = device_memory.allocated(self.record.device) - self.planned_level
        return growth > 0.01 * budget and predicted + growth > budget

    def _ran_over(self) -> bool:
        """A run of this plan held more than predicted, and that took it past the budget: learn
        the excess (``self.excess``: what the executor holds beyond the simulated peak, the
        plan's own allowance included), so the next plan is made holding it."""
        rec, budget = self.record, self.opts.memory_budget
        excess = rec.peak_excess
        if budget is None or rec.predicted_peak_bytes is None or excess <= 0.01 * budget:
            return False
        growth = max(0, device_memory.allocated(rec.device) - self.planned_level)
        if rec.predicted_peak_bytes + growth + excess <= budget:
            return False
        self.excess += excess
        return True

    def _timed(self) -> bool:
        drivers = self.drivers
        if not drivers or (self.record.training and "backward" not in drivers):
            return False
        return all(d.timed for d in drivers.values())

    def _calibrate(self) -> None:
        """Once the executor has timed its compute: the measured seconds per node, and the
        plan's step simulated again with them (``calibrated_step_s`` in the report)."""
        from .graph.costmodel import CostModel
        from .hardware import resolve

        self.calibrated = True
        estimate = CostModel(resolve(self.opts.hardware)).node_seconds
        measured: dict[str, float] = {}
        for driver in self.drivers.values():
            measured.update(driver.node_seconds(estimate))
        if measured:
            self.measured = measured
            self.record.calibrate(measured)

    def _start_trial(self) -> None:
        """Queue auto's other plans whose predicted step is close to the chosen one's."""
        rec, opts = self.record, self.opts
        if (not opts.tune_plans or opts.policy != "auto" or opts.memory_budget is None or not rec.training
                or self.size_slots or rec.variant is None or rec.variant not in rec.variants):
            return  # (a graph with symbolic sizes re-plans as sizes change: its trials would not compare)
        chosen = rec.variants[rec.variant]
        close = sorted((s, v) for v, s in rec.variants.items() if v != rec.variant and s <= self.TRIAL_MARGIN * chosen)
        if close:
            self.trial = {"queue": [v for _, v in close[: self.TRIAL_PLANS - 1]], "compiled": {}}

    def _current(self) -> tuple:
        """The compiled plan running now, with what goes with it (a trial keeps several)."""
        return (self.fn, self.record, self.drivers, self.calibrated, self.planned_level)

    def _use(self, compiled: tuple) -> None:
        # with the level it was planned at: if the device holds more now, it re-plans
        self.fn, self.record, self.drivers, self.calibrated, self.planned_level = compiled

    def _trial_step(self, args: Sequence[Any]) -> None:
        """Before a step of a trial: compile and warm up each plan in turn, then run them in
        turn, one step each, and finally keep the fastest (compiled code is kept: going back
        to a plan costs nothing)."""
        trial, rec = self.trial, self.record
        if "rounds" not in trial:
            if rec.steps_run < self.TRIAL_WARMUP or self.dropped is None:
                return  # (plans compiled before the step's dropped outputs are known would be made again)
            trial["compiled"][rec.variant] = self._current()
            while trial["queue"]:
                variant = trial["queue"].pop(0)
                try:
                    self._compile(args, args, None, variant)
                    return
                except BudgetError as e:  # the device holds more than when the trial began
                    log.info("lohan %s: trial of plan %s skipped: %s", rec.name, "/".join(variant), e)
                except Exception as e:  # noqa: BLE001 - a trial only chooses: training goes on with the plans it has
                    log.warning("lohan %s: plan %s could not be compiled for a trial (%s: %s); it is left out",
                                rec.name, "/".join(variant), type(e).__name__, e)
            trial["rounds"] = list(trial["compiled"]) * self.TRIAL_STEPS
            trial["samples"] = {v: [] for v in trial["compiled"]}
        else:
            if rec.steps_run == trial["seen"]:
                return  # the last call ran no backward (no_grad, or the loss was dropped): again
            trial["samples"][rec.variant].append(rec.step_seconds_log[-1])
        if trial["rounds"]:
            variant = trial["rounds"].pop(0)
            self._use(trial["compiled"][variant])
            trial["seen"] = self.record.steps_run
            return
        measured = {v: statistics.median(t) for v, t in trial["samples"].items() if t}
        best = _trial_winner(trial["samples"], self.TRIAL_SWITCH)
        self._use(trial["compiled"][best])
        self.record.trials = dict(measured)
        self.trial = None
        log.info("lohan %s: timed %d plans (%s); kept %s", self.record.name, len(measured),
                 ", ".join(f"{'/'.join(v)} {s * 1e3:.2f} ms" for v, s in measured.items()), "/".join(best))

    def __call__(self, *args: Any) -> Any:
        if not self.collected and self.record.steps_run:
            # dynamo's trace of this graph (and of the graph after a break, which it compiles
            # during the first step) leaves reference cycles that hold that step's real tensors
            # (a Hugging Face model's outputs and cache) until Python's next full collection:
            # device memory the plan never sees. Collect them once, after the first step.
            self.collected = True
            gc.collect()
            # what that step's backward saw of its outputs is that garbage's doing, not the loop's
            self.record.dropped_seen = None
        seen, self.record.dropped_seen = self.record.dropped_seen, None
        if seen is not None:  # an output held at any backward so far counts as held
            self.dropped = seen if self.dropped is None else self.dropped & seen
        if self.dropped is not None and torch.is_grad_enabled():
            # before a trial goes on: a trial's plans are then all made knowing it (the trial
            # waits for its warm-up steps, so the first that count come after this is known)
            self._outputs_dropped(args)
        if self.trial is not None and torch.is_grad_enabled():
            self._trial_step(args)
        if not self.calibrated and self._timed():
            self._calibrate()
        if torch.is_grad_enabled() and self.opts.memory_budget is not None and self.record.training:
            sizes = self._grown_sizes(args) if self.size_slots else None
            if sizes is not None or self._stale():
                self._replan(args, sizes, "a size grew past the plan" if sizes else "the device holds more")
            elif self._ran_over():
                why = (f"a step ran {format_bytes(self.record.peak_excess)} above its predicted peak, past "
                       f"memory_budget (the {self.opts.executor} executor holds what the simulator does not "
                       f"model); planned again holding {format_bytes(self.excess)} more")
                log.warning("lohan %s: %s", self.record.name, why)
                self._replan(args, None, why)
        out = self.fn(*args)
        run = TRACKER.latest_forward
        if run is not None and run.graph is self.record and torch.is_grad_enabled():
            TRACKER.watch(run, out)
            TRACKER.latest_forward = None
        return out

    def _outputs_dropped(self, args: Sequence[Any]) -> None:
        """The plan assumed the user holds every forward output through the step; backward
        found some gone (``self.dropped``). Simulate the plan again knowing it, and plan again
        where that would change the plan: auto, told so, chooses other decisions, or the plan
        no longer meets the budget (outputs the user began to hold). torch's min-cut partition
        is not searched again."""
        from .plan.program import predict
        from .plan.policies import solve

        planned = self.record.pass_report("plan_memory")
        if planned is None or planned["problem"].dropped_outputs == self.dropped:
            return
        problem = planned["problem"].without_outputs(self.dropped)
        plan, rates, budget = planned["plan"], planned["rates"], self.opts.memory_budget
        prediction = predict(problem, plan.decisions, rates)
        if budget is not None and prediction.peak_device_bytes > budget:
            self._replan(args, None, "the step holds forward outputs it dropped before")
            return
        if plan.policy == "auto" and budget is not None and not self.size_slots:
            again = solve("auto", problem, rates, budget, plan.family)
            if not _same_decisions(again.decisions, plan.decisions):
                self._replan(args, None, "the step drops forward outputs before backward")
                return
        self.record.repredict(problem, prediction)
        if self.calibrated and self.measured:
            self.record.calibrate(self.measured)

    def _replan(self, args: Sequence[Any], sizes: dict | None, why: str) -> None:
        if self.replans >= self.MAX_REPLANS:
            log.warning("lohan %s: %s, but it was re-planned %d times already; the step may pass "
                        "memory_budget", self.record.name, why, self.replans)
            self.planned_level = device_memory.allocated(self.record.device)  # warn once per growth
            if sizes:
                self.planned_sizes = sizes
            return
        self.replans += 1
        self.trial = None  # the plans it was timing were made for less: a new trial below
        old = self.record.name
        if self.size_slots:
            # keep the graph symbolic: its fake inputs, under the first compile's tracing context;
            # plan with headroom if that fits the budget, else for exactly the sizes of this call
            exact = {s: max(v, self._size_now(args, s)) for s, v in self.planned_sizes.items()}
            for candidate in ([sizes, exact] if sizes else [self.planned_sizes]):
                try:
                    with torch._guards.tracing(self.tracing):
                        self._compile(self.fakes, args, candidate)
                    self.planned_sizes = candidate
                    break
                except BudgetError:
                    if candidate is not sizes or sizes == exact:
                        raise
        else:
            self._compile(args, args, None)
        log.info("lohan %s re-planned as %s: %s", old, self.record.name, why)
        self._start_trial()


def _trial_winner(samples: dict[Any, list[float]], switch: float) -> Any:
    """The plan a trial keeps. The i-th sample of each plan ran in round i; plans are compared
    round by round (the median of one's times over the other's), so the machine's drift
    cancels. The first plan (the simulator's choice) stays unless another beats it by the
    margin ``switch``; the others are tried fastest median first, and one that beats the plan
    kept so far (by the margin against the first, by any amount against another) replaces it.
    (Each plan is compared with the one it would replace: ranking two plans by their ratios
    to a third mixes in that third's noise.)"""
    def ratio(a: list[float], b: list[float]) -> float:
        pairs = [x / y for x, y in zip(a, b) if y > 0]
        return statistics.median(pairs) if pairs else float("inf")

    first, *others = samples
    best = first
    for v in sorted(others, key=lambda v: statistics.median(samples[v]) if samples[v] else float("inf")):
        if ratio(samples[v], samples[best]) < (switch if best == first else 1.0):
            best = v
    return best


def _same_decisions(a: dict, b: dict) -> bool:
    """The same actions at the same points (the reasons given may differ)."""
    return a.keys() == b.keys() and all(replace(a[k], reason="") == replace(b[k], reason="") for k in a)


def _symbol_values(fakes: Sequence[Any]) -> dict:
    out = {}
    for f in fakes:
        values = [f] if isinstance(f, torch.SymInt) else (list(f.shape) if isinstance(f, torch.Tensor) else [])
        for v in values:
            if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
                out[v.node.expr] = v
    return out


def _size_slots(fakes: Sequence[Any]) -> list[tuple[int, int | None, Any]]:
    """Where each free size symbol can be read from the call's arguments: (arg, dim or None, symbol)."""
    slots, seen = [], set()
    for i, f in enumerate(fakes):
        if isinstance(f, torch.SymInt) and isinstance(f.node.expr, sympy.Symbol) and f.node.expr not in seen:
            slots.append((i, None, f.node.expr))
            seen.add(f.node.expr)
        elif isinstance(f, torch.Tensor):
            for d, s in enumerate(f.shape):
                if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol) and s.node.expr not in seen:
                    slots.append((i, d, s.node.expr))
                    seen.add(s.node.expr)
    return slots


def check_supported(opts: Options) -> None:
    """Refuse, with a clear message, options this version cannot honour yet.

    Accepting them would silently run something other than what was asked.
    """
    unsupported = []
    if opts.policy in ("zero-infinity", "zero-offload"):
        unsupported.append(f"policy={opts.policy!r} (a baseline of `lohan plan`, simulated only)")
    if opts.policy == "swap-all" and not swap_ops_available():
        unsupported.append("policy='swap-all' (the host tier's swap ops are not built)")
    if unsupported:
        raise LohanError(
            "lohan_compile 0.2 cannot honour these options yet: "
            + "; ".join(unsupported)
            + ". Remove them, or use policy 'auto', 'keep-all' or 'recompute-all'."
        )


def resident_outside_bytes(example_inputs: Sequence[Any]) -> int:
    """Device bytes held now by anything but this graph's inputs: tensors other graphs of
    the step keep for backward, optimizer state, the user's own tensors. The budget covers
    them too (DESIGN.md)."""
    gc.collect()  # unreachable cycles (an earlier compiled model, say) hold no lasting memory
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    dev = next((t.device for t in tensors if t.device.type == "cuda"), None)
    device_memory.install()
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type in ("cpu", "cuda") and not isinstance(t, torch._subclasses.FakeTensor):
            storage = t.untyped_storage()
            if device_memory.counted(t):
                seen[storage.data_ptr()] = storage.nbytes()
    return max(0, device_memory.allocated(dev) - sum(seen.values()))


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
            )
        facts.append(fact)
    return tuple(facts)


def bind_runtime(records: Sequence[PassRecord], real_inputs: Sequence[Any], optimizer: Any) -> None:
    """What the passes decided the runtime must take on, from their reports: the gradients the
    optimizer's runtime takes during backward (``offload_grads``), the parameters streamed from
    the host tier and those read resident (``stream_params``)."""
    reports = {r.name: r.report for r in records if not r.skipped}
    offloaded = reports.get("offload_grads", {}).get("offloaded_inputs", {})
    if offloaded:
        runtime = offload.runtime_of(optimizer)
        for idx in offloaded:
            runtime.register(real_inputs[idx])
        runtime.note_forward_order(reports["offload_grads"]["forward_order"])
    streaming = reports.get("stream_params", {})
    for idx in streaming.get("resident_inputs", ()):
        stream.keep_resident(real_inputs[idx])
    for idx, trainable in streaming.get("streamed_inputs", {}).items():
        param = real_inputs[idx]
        stream.register(param, trainable=trainable, updater=offload.runtime_offloading(param))
        if trainable:
            # the optimizer's state (its fp32 master) is made now, while the parameter has its
            # value: once streamed, the device copy is gone between steps
            with unset_fake_temporarily(), torch.no_grad():
                optimizer._state_of(param)


class GraphCompiler:
    """Compiles one dynamo graph: AOTAutograd, our passes, then the executor."""

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
        dropped_outputs: frozenset[int] = frozenset(),
        executor_excess: int = 0,
    ):
        from .passes import default_pipeline

        real_inputs = example_inputs if real_inputs is None else real_inputs
        self.real_inputs = list(real_inputs)
        self.gm = gm
        self.example_inputs = example_inputs
        self.planning_sizes = planning_sizes
        self.measured = dict(measured or {})
        self.variant = variant  # policy "auto": which of its plans a trial asked for
        self.dropped_outputs = dropped_outputs  # forward outputs seen dropped before backward
        self.executor_excess = executor_excess  # bytes an earlier plan ran above its prediction
        self.drivers: dict[str, Any] = {}  # the Inductor executor's, by phase
        self.opts = opts
        self.graph_id = next(_graph_ids)
        self.optimizer = find_optimizer(opts, real_inputs)
        self.inputs = describe_inputs(gm, real_inputs, self.optimizer)
        self.pipeline: Pipeline = default_pipeline()
        disabled = opts.disable_passes or settings.DISABLE_PASSES.get()
        self.disabled = self.pipeline.validate_disabled(disabled)
        self.debug = opts.debug if opts.debug is not None else settings.DEBUG.get()
        self.dump_dir = opts.dump_dir or settings.DUMP_DIR.get()
        self.record = GraphRecord(
            graph_id=self.graph_id, training=False, executor=opts.executor, budget_bytes=opts.memory_budget
        )
        self.record.dump_dir = self.dump_dir
        self.resident_outside = resident_outside_bytes(real_inputs)
        self.record.resident_outside_bytes = self.resident_outside
        self.record.device = next(
            (t.device for t in real_inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"), None
        )

    def compile(self) -> Callable[..., Any]:
        kwargs: dict[str, Any] = {}
        if self.opts.executor == "inductor":
            from torch._inductor.decomposition import select_decomp_table

            kwargs["decompositions"] = select_decomp_table()
        elif self.opts.mode != "default":
            log.info("lohan: mode=%r has no effect with the fx executor", self.opts.mode)
        try:
            with _no_donated_buffers(self.opts.executor):
                return aot_autograd(
                    fw_compiler=self._compile_forward,
                    bw_compiler=self._compile_backward,
                    inference_compiler=self._compile_inference,
                    partition_fn=self._partition,
                    keep_inference_input_mutations=True,
                    **kwargs,
                )(self.gm, self.example_inputs)
        finally:
            # the compiled code keeps this object (for the lazily compiled backward): it must
            # not keep the parameters, the batch or the optimizer alive
            self.example_inputs = self.real_inputs = ()
            self.optimizer = None
            if self.opts.optimizer is not None:
                self.opts = self.opts.replace(optimizer=None)

    # -- AOTAutograd callbacks ------------------------------------------------

    def _facts(self, **extra: Any) -> CompileFacts:
        return CompileFacts(
            graph_id=self.graph_id,
            inputs=self.inputs,
            options=self.opts,
            optimizer=self.optimizer,
            resident_outside_bytes=self.resident_outside,
            real_inputs=self.real_inputs,
            measured_seconds=self.measured,
            variant=self.variant,
            dropped_outputs=self.dropped_outputs,
            executor_excess_bytes=self.executor_excess,
            **extra,
        )

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
        with planning_sizes(self.planning_sizes):
            graphs = self.pipeline.run(graphs, facts, debug=self.debug, disabled=self.disabled)
        bind_runtime(self.pipeline.records, self.real_inputs, self.optimizer)
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
            from .dump import plan_table

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
            if self.record.device is None and phase != "inference" and not on_meta:
                fn = self._timed_fx(gm, phase)
        if phase == "inference":
            return _boxed(fn)
        return _tracked(fn, self.record, phase)

    def _timed_fx(self, gm: fx.GraphModule, phase: str) -> Callable[[list], Any]:
        """The fx graph, whose first calls run through a driver that times every op (the
        same generated code the Inductor executor runs, with no segments: each op a call of
        its own, each value released at its last use), so that the fx executor's plans are
        calibrated too; the other calls run the GraphModule itself."""
        from .graph.segments import Driver

        items = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        driver = Driver(gm, items, f"graph{self.graph_id}_{phase}", timing=True)
        self.drivers[phase] = driver
        last_timed = max(Driver.TIMED_CALLS)

        def run(args: list) -> Any:
            if driver.calls <= last_timed:
                return driver(args)
            return gm(args)

        run._boxed_call = True  # type: ignore[attr-defined]
        return run

    def _inductor(self, gm: fx.GraphModule, example_inputs: Sequence[Any], phase: str):
        """Inductor compiles the compute between lohan's ops (``segments.py`` says why and how)."""
        from torch._inductor import config as inductor_config
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx_inner

        from .graph.segments import compile_segments, symbols_of

        patches = {k: v for k, v in list_mode_options(self.opts.mode).items() if "cudagraphs" not in k}
        # inside a segment the plan's order is the order that runs (fusion aside)
        patches["reorder_for_peak_memory"] = False

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
            driver = compile_segments(gm, compile_one, f"graph{self.graph_id}_{phase}", timing=timing)
        finally:
            if context is not None:
                context.output_strides = reported
        self.drivers[phase] = driver
        self.record.segments[phase] = driver.describe()
        if self.dump_dir:
            from .dump import dump_driver

            dump_driver(self.dump_dir, self.record, phase, driver.source)
        return driver


def _no_donated_buffers(executor: str):
    """AOTAutograd marks backward inputs it thinks Inductor may overwrite ("donated buffers",
    by their index in the backward graph). Segments number their inputs differently, and a
    saved value may be a buffer a copy still reads: nothing is donated."""
    import contextlib

    if executor != "inductor":
        return contextlib.nullcontext()
    return torch._functorch.config.patch(donated_buffer=False)


def describe_compile(record: GraphRecord, graphs: Graphs) -> str:
    """One paragraph per compiled graph, for TORCH_LOGS="+lohan_compile"."""
    from .units import format_bytes

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
                out = fn(args)
                TRACKER.forward_outputs(step_run, out)
                return out
            finally:
                TRACKER.end(step_run, start)
                record.ran("forward", step_run.seconds)
    else:
        def run(args: list) -> Any:
            step_run = TRACKER.backward_begin(record)
            start = time.perf_counter()
            try:
                return fn(args)
            finally:
                TRACKER.end(step_run, start)
                record.ran("backward", step_run.seconds)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run
