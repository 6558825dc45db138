"""The compiled callable dynamo runs: the plan of one graph, planned again when it no longer fits.

``Replanning`` compiles a graph through ``GraphCompiler`` and, before each call, reads what the
runtime observed of the plan running (``runtime.observed.Observed``): the device holding more
than when it was planned, a size grown past the plan, outputs the step drops before backward,
a run above the predicted peak. Where that would change the plan it plans again. Under policy
``"auto"`` with a budget it also runs a trial of the plans predicted close to the chosen one
and keeps the fastest measured.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx

from ..errors import BudgetError, LohanError
from ..graph.costmodel import CostModel
from ..graph.pipeline import DataParallel
from ..graph.shapes import hint_int
from ..hardware import resolve
from ..options import Options
from ..plan.policies import solve
from ..plan.program import predict
from ..runtime import device as device_memory
from ..runtime import modules
from ..runtime.step import TRACKER
from ..units import format_bytes
from .compiler import GraphCompiler, NotReusable, Reuse

log = logging.getLogger(__name__)


@dataclass
class SegmentsLearnt:
    """What Inductor's segments were measured to do, for the plans of one variant (their
    segments differ), learnt when each plan's segments compile, by (phase, node name)."""

    # device bytes a segment held above the plan's model of its nodes, at the node the model
    # peaks at: every later plan holds them there
    scratch: dict[tuple[str, str], int] = field(default_factory=dict)
    # ... of those, the ones that are bounds of a segment not run to be measured (no room under
    # the budget then): a later plan whose segment there is measured replaces them
    bounds: set[tuple[str, str]] = field(default_factory=set)
    # ... and the most any plan's segment was measured to hold there (what a bound gives way to)
    measured: dict[tuple[str, str], int] = field(default_factory=dict)
    # results the plan had fused into their readers that a segment holds after all (an output)
    materialized: set[tuple[str, str]] = field(default_factory=set)
    # results Inductor may fuse found inside a segment (not one of its outputs): later plans
    # hold them as fused (until seen, a plan holds them in memory; the plan running when they
    # are seen is simulated again with them fused, not made again)
    fused: set[tuple[str, str]] = field(default_factory=set)

    def learn_scratch(self, found: dict[tuple[str, str], int], bounds: set[tuple[str, str]],
                      measured: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Learn what one plan's segments held above its model (``found``, by node; ``bounds``:
        those of them that are a bound; ``measured``: every node of a segment that was run and
        measured). A measurement adds where it is more than what was learnt (a plan's segments
        may fuse differently from the last's: what any held is held); a bound held before gives
        way to a measurement of a segment there (the most any was measured to hold there, or
        none). Returns the change at each node,
        for the plan that was made holding what was learnt before."""
        change: dict[tuple[str, str], int] = {}
        for key, nbytes in found.items():
            if key not in bounds:
                self.measured[key] = max(self.measured.get(key, 0), nbytes)
        for key in self.bounds & measured:
            now = self.measured.get(key, 0)
            if now < self.scratch[key]:
                change[key] = now - self.scratch[key]
                self.scratch[key] = now
        self.bounds -= measured
        for key, nbytes in found.items():
            if nbytes > self.scratch.get(key, 0):
                change[key] = change.get(key, 0) + nbytes - self.scratch.get(key, 0)
                self.scratch[key] = nbytes
                if key in bounds:
                    self.bounds.add(key)
        return {key: delta for key, delta in change.items() if delta}


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
    A re-plan keeps the partition the plan before ran (``partition_graph``); where that one was
    weighed against none, the partitions are weighed in a later re-plan, once the steps since
    could have lost what weighing costs (``_defer_weighing``).
    Re-planning (and a trial's plan) runs the passes again on the joint graph AOTAutograd
    traced the first time, reusing its partitions, and the new plan's forward and backward run
    inside the callable AOTAutograd made then (``compiler.Reuse``; fx executor). Where that
    cannot be (the Inductor executor, compiled autograd, a backward not yet compiled, a forward
    of the old plan still waiting for its backward, a plan that saves other kinds of values),
    AOTAutograd runs again on the same
    dynamo graph (its fake inputs, under the tracing context of the first compile, so symbolic
    sizes stay symbolic). The new plan runs from this call on.
    """

    MAX_REPLANS = 8
    SEGMENT_REPLANS = 4  # plans made again at compile time for what Inductor's segments hold
    HEADROOM = 1.5
    # trials (policy "auto" under a budget, ``tune_plans``): the simulator's error on this
    # machine can exceed the differences between auto's plans, so the plans predicted within
    # TRIAL_MARGIN of the chosen one (at most TRIAL_PLANS, the chosen one included) are each
    # compiled and run TRIAL_WARMUP steps, then run in turn for TRIAL_STEPS rounds
    # (interleaved: the machine's drift hits all alike). Another plan replaces the chosen one
    # only where its graph time over the chosen one's, round by round, has a median below
    # TRIAL_SWITCH: on a busy machine single steps of one plan can vary by a tenth, so a
    # trial that followed its fastest median would switch on noise
    TRIAL_MARGIN = 1.15
    TRIAL_PLANS = 3
    TRIAL_WARMUP = 2
    TRIAL_STEPS = 8
    TRIAL_SWITCH = 0.97

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], opts: Options, *,
                 data_parallel: DataParallel | None = None):
        self.gm = gm
        self.data_parallel = data_parallel  # (resolved once: a re-plan runs outside DDP's forward)
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
        # device bytes code outside this graph (run eagerly) was measured to allocate between its
        # forward and its backward: every plan from then on is made holding them there
        self.outside = 0
        # Inductor, per plan asked for (``variant``; their segments differ): what its segments were
        # measured to hold and to fuse, which every later plan of that variant is made with
        self.segments_learnt: dict[Any, SegmentsLearnt] = {}
        self.reuse: Reuse | None = None  # what a later plan reuses of the compile that traced the graph
        # a re-plan that kept a partition nothing was weighed against: the most weighing could
        # gain per step of its plan (None: nothing to weigh), and the seconds the steps run on such
        # plans since the partitions were last weighed could have lost in all
        self.weigh_gain_s: float | None = None
        self.unweighed_lost_s = 0.0
        self.weigh_cost_s = 0.0  # (set below: what weighing is taken to cost)
        start = time.perf_counter()
        self._compile(example_inputs, example_inputs, None)
        # weighing makes torch's min-cut partitions of the whole joint graph (from one to eight,
        # each a max-flow and two graph extractions): taken to cost what this compile, which
        # traced the joint graph and planned it, took
        self.weigh_cost_s = time.perf_counter() - start
        self._start_trial()

    def _compile(self, aot_inputs: Sequence[Any], real_inputs: Sequence[Any], sizes: dict | None,
                 variant: tuple[str, str] | None = None, min_cut_fraction: float | None = None) -> None:
        opts = self.opts
        if self.optimizer_ref is not None:
            optimizer = self.optimizer_ref()
            if optimizer is None:
                raise LohanError("the CPUAdamW this model was compiled with no longer exists")
            opts = opts.replace(optimizer=optimizer)
        learnt = self.segments_learnt.setdefault(variant, SegmentsLearnt())
        assume_fused = False
        assume_dropped = False  # (no plan fits holding the forward's outputs)
        held_smallest: int | None = None
        attempt = 0
        # (a forward of the running plan whose backward is still to come must run that plan's backward)
        reuse = self.reuse if self.reuse is not None and self.reuse.ready and not TRACKER.forward_pending(self.record) else None
        if reuse is not None and self.tracing is not None and torch._guards.TracingContext.try_get() is None:
            # the passes (a min-cut partition made now, say) look for the graph's fake mode there
            with torch._guards.tracing(self.tracing):
                self._compile(aot_inputs, real_inputs, sizes, variant, min_cut_fraction)
            return
        # a plan made again on the graph traced before counts garbage as held (a full collection
        # in a process holding a deep model's graphs takes a second): only where no plan fits so
        # is it collected first
        collect = False
        while True:
            collect = collect or reuse is None
            compiler = GraphCompiler(
                self.gm, aot_inputs, opts, real_inputs=real_inputs, planning_sizes=sizes, measured=self.measured,
                variant=variant, min_cut_fraction=min_cut_fraction, dropped_outputs=self.dropped or frozenset(), executor_excess=self.excess,
                outside=self.outside, segment_scratch=dict(learnt.scratch), materialized=frozenset(learnt.materialized),
                fused=frozenset(learnt.fused), assume_fused=assume_fused, reuse=reuse,
                assume_outputs_dropped=assume_dropped,
                data_parallel=self.data_parallel, collect_garbage=collect,
            )
            try:
                self.fn = compiler.compile()
            except NotReusable as e:
                log.info("lohan %s: traced again: %s", compiler.record.name, e)
                reuse = None
                continue
            except BudgetError as e:
                if not collect:
                    collect = True
                    continue
                # holding results Inductor may fuse that no segment was yet seen fusing, no plan
                # fits: plan them fused (the first steps may then pass the budget by what
                # Inductor keeps after all, until its segments are measured)
                if not assume_fused and compiler.unseen_fused:
                    assume_fused = True
                    log.info("lohan %s: no plan fits holding the %d results Inductor may fuse that no segment "
                             "was yet seen fusing; planned with them fused", compiler.record.name,
                             len(compiler.unseen_fused))
                    continue
                # holding the forward's outputs through backward (before a step showed which the
                # user drops), no plan fits: plan them dropped when forward ends, as training
                # loops that keep only the loss do; a backward that finds one alive refuses to run
                if not assume_dropped and self.dropped is None and compiler.record.training:
                    assume_dropped, held_smallest = True, e.smallest_feasible_bytes
                    log.info("lohan %s: no plan fits holding the forward's outputs through backward; planned "
                             "with the step dropping them before backward", compiler.record.name)
                    continue
                if assume_dropped and held_smallest and e.smallest_feasible_bytes \
                        and e.smallest_feasible_bytes < held_smallest:
                    raise BudgetError(
                        f"{e} (a budget that small needs the step to drop the forward's large outputs before "
                        f"backward, as loss = model(**batch).loss does; holding them, at least "
                        f"{format_bytes(held_smallest)})", smallest_feasible_bytes=e.smallest_feasible_bytes) from e
                raise
            if not self._segments_overrun(compiler.record, learnt):
                break
            if attempt == self.SEGMENT_REPLANS:
                log.warning("lohan %s: planned %d times for what Inductor's segments hold, each plan's "
                            "segments holding more; the step may pass memory_budget until the runtime "
                            "measures it", compiler.record.name, attempt + 1)
                break
            attempt += 1
        self.record = compiler.record
        self.record.must_drop_budget = held_smallest
        self.reuse = compiler.reuse
        self.observed = compiler.observed
        self.drivers = compiler.drivers  # filled as AOTAutograd compiles (backward: at its first run,
        # or with forward where segments are measured)
        self.calibrated = False
        # (a plan made on the joint graph traced before traces nothing: no garbage of dynamo's)
        self.collected = reuse is not None
        if variant is None:
            self._defer_weighing()
        # the device level the plan was made at (a plan on the meta device has none: nothing the
        # process holds is on that device, so nothing it allocates moves the plan)
        level = None if compiler.on_meta else device_memory.allocated(self.record.device)
        self.planned_level = self.record.planned_level = level

    def _defer_weighing(self) -> None:
        """After a plan that kept the partition of the plan before, weighed against nothing
        (``partition_graph``'s ``gain_bound_s``: the most weighing could gain per step), weigh
        the partitions once the steps run on such plans could have lost as much as weighing
        costs (taken as the first compile's time): a re-plan is fast, and a long run still gets
        the partition its sizes favour, for about twice what knowing it at once would have cost.
        A plan that weighed the partitions (or had nothing to weigh) starts the count again."""
        report = self.record.pass_report("partition_graph") or {}
        gain = report.get("gain_bound_s")
        if not gain or gain <= 0 or self.reuse is None:
            self.weigh_gain_s, self.unweighed_lost_s = None, 0.0
            return
        self.weigh_gain_s = gain
        left = max(0.0, self.weigh_cost_s - self.unweighed_lost_s)
        report["weighed_after_steps"] = max(1, math.ceil(left / gain))  # (what the report shows)

    def _segments_overrun(self, rec, learnt: "SegmentsLearnt") -> bool:
        """Inductor's segments, measured when compiled, hold more than the plan's model of their
        nodes (``rec.segment_scratch``), hold results the plan had fused into their readers
        (segment outputs), or fuse results the plan held (not yet seen fused): learn all three,
        and simulate the plan again with them (and with less where a segment the plan held a bound
        for was measured now). True when that passes the budget: then plan
        again with them (before any step runs: the budget holds from the first step)."""
        if not rec.training:
            return False
        change = learnt.learn_scratch(rec.segment_scratch, rec.segment_bounds, rec.segment_measured)
        planned = rec.pass_report("plan_memory")
        held, freed = {}, {}
        if planned is not None:
            buffers = planned["problem"].buffers
            held = {f"{phase}:{name}": nbytes for (phase, name), nbytes in rec.segment_outputs.items()
                    if nbytes and f"{phase}:{name}" in buffers and buffers[f"{phase}:{name}"].bytes == 0}
            freed = {f"{phase}:{name}": 0 for phase, name in rec.segment_fused
                     if f"{phase}:{name}" in buffers and buffers[f"{phase}:{name}"].bytes > 0}
        learnt.fused |= rec.segment_fused
        if not change and not held and not freed:
            return False
        learnt.materialized |= {tuple(k.split(":", 1)) for k in held}
        if planned is None:
            return False
        problem = planned["problem"].with_scratch(change).with_bytes({**held, **freed})
        prediction = predict(problem, planned["plan"].decisions, planned["rates"])
        budget = self.opts.memory_budget
        if budget is not None and prediction.peak_device_bytes > budget:
            log.info("lohan %s: Inductor's segments hold up to %s above what the plan predicted for their "
                     "nodes, and %d results it had fused away (%s); planned again holding them", rec.name,
                     format_bytes(max((v for v in change.values() if v > 0), default=0)), len(held), format_bytes(sum(held.values())))
            return True
        rec.repredict(problem, prediction)
        return False

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
        if budget is None or predicted is None or not self.record.training or self.planned_level is None:
            return False
        growth = device_memory.allocated(self.record.device) - self.planned_level
        return growth > 0.01 * budget and predicted + growth > budget

    def _ran_over(self) -> bool:
        """A run of this plan held more than predicted, and that took it past the budget: learn
        the excess (``self.excess``: what the executor holds beyond the simulated peak, the
        plan's own allowance included), so the next plan is made holding it."""
        rec, budget = self.record, self.opts.memory_budget
        excess = self.observed.peak_excess
        if budget is None or rec.predicted_peak_bytes is None or excess <= 0.01 * budget or self.planned_level is None:
            return False
        growth = max(0, device_memory.allocated(rec.device) - self.planned_level)
        if rec.predicted_peak_bytes + growth + excess <= budget:
            return False
        self.excess += excess
        return True

    def _outside_over(self) -> bool:
        """Code outside this graph allocated more between its forward and backward than the plan
        holds there: learn it (``self.outside``); True when the plan, holding it, would pass the
        budget (then plan again)."""
        seen, budget = self.observed.outside_bytes, self.opts.memory_budget
        if seen <= self.outside or budget is None:
            return False
        self.outside = seen
        planned = self.record.pass_report("plan_memory")
        if planned is None:
            return False
        problem = planned["problem"].with_outside(seen)  # (in place of what it held there)
        prediction = predict(problem, planned["plan"].decisions, planned["rates"])
        growth = max(0, device_memory.allocated(self.record.device) - (self.planned_level or 0))
        return prediction.peak_device_bytes + growth > budget

    def _timed(self) -> bool:
        drivers = self.drivers
        if not drivers or (self.record.training and "backward" not in drivers):
            return False
        return all(d.timed for d in drivers.values())

    def _calibrate(self) -> None:
        """Once the executor has timed its compute: the measured seconds per node, and the
        plan's step simulated again with them (``calibrated_step_s`` in the report)."""
        self.calibrated = True
        estimate = CostModel(resolve(self.opts.hardware)).node_seconds
        measured: dict[str, float] = {}
        for driver in self.drivers.values():
            measured.update(driver.node_seconds(estimate))
        if measured:
            self.measured = measured
            self.record.calibrate(measured)
        if self.trial is not None and self.record.variant in self.trial["compiled"]:
            # (a trial swaps plans in and out with what went with them: this one is calibrated now,
            # not again each time it comes back)
            self.trial["compiled"][self.record.variant] = self._current()

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
        targets = self.reuse.targets() if self.reuse is not None else None
        return (self.fn, self.record, self.observed, self.drivers, self.calibrated, self.planned_level,
                self.reuse, targets)

    def _use(self, compiled: tuple) -> None:
        # with the level it was planned at: if the device holds more now, it re-plans
        (self.fn, self.record, self.observed, self.drivers, self.calibrated, self.planned_level,
         self.reuse, targets) = compiled
        if self.reuse is not None:
            # (plans made again share their first compile's callable; a trial keeps plans only
            # after their warm-up steps, when both are compiled)
            assert None not in targets, "a plan kept before its backward was compiled"
            self.reuse.install(targets)

    def _trial_step(self, args: Sequence[Any]) -> None:
        """Before a step of a trial: compile and warm up each plan in turn, then run them in
        turn, one step each, and finally keep the fastest (compiled code is kept: going back
        to a plan costs nothing)."""
        trial, rec, observed = self.trial, self.record, self.observed
        if TRACKER.forward_pending(rec):
            return  # (a forward of this plan awaits its backward: plans sharing its callable cannot take over)
        if "rounds" not in trial:
            if observed.steps_run < self.TRIAL_WARMUP or self.dropped is None:
                return  # (plans compiled before the step's dropped outputs are known would be made again)
            trial["compiled"][rec.variant] = self._current()
            while trial["queue"]:
                variant = trial["queue"].pop(0)
                weighed = rec.pass_report("partition_graph") or {}
                try:
                    self._compile(args, args, None, variant, weighed.get("min_cut_activation_memory_budget"))
                    return
                except BudgetError as e:  # the device holds more than when the trial began
                    log.info("lohan %s: trial of plan %s skipped: %s", rec.name, "/".join(variant), e)
                except Exception as e:  # noqa: BLE001 - a trial only chooses: training goes on with the plans it has
                    log.warning("lohan %s: plan %s could not be compiled for a trial (%s: %s); it is left out",
                                rec.name, "/".join(variant), type(e).__name__, e)
            trial["rounds"] = list(trial["compiled"]) * self.TRIAL_STEPS
            trial["samples"] = {v: [] for v in trial["compiled"]}
        else:
            if observed.steps_run == trial["seen"]:
                return  # the last call ran no backward (no_grad, or the loss was dropped): again
            trial["samples"][rec.variant].append(observed.step_seconds_log[-1])
        if trial["rounds"]:
            variant = trial["rounds"].pop(0)
            self._use(trial["compiled"][variant])
            trial["seen"] = self.observed.steps_run
            return
        measured = {v: statistics.median(t) for v, t in trial["samples"].items() if t}
        best = _trial_winner(trial["samples"], self.TRIAL_SWITCH)
        self._use(trial["compiled"][best])
        self.record.trials = dict(measured)
        self.trial = None
        log.info("lohan %s: timed %d plans (%s); kept %s", self.record.name, len(measured),
                 ", ".join(f"{'/'.join(v)} {s * 1e3:.2f} ms" for v, s in measured.items()), "/".join(best))

    def __call__(self, *args: Any) -> Any:
        modules.watch_pending()  # (hooks added now, not while dynamo was compiling)
        if not self.collected and self.observed.steps_run:
            # dynamo's trace of this graph (and of the graph after a break, which it compiles
            # during the first step) leaves reference cycles that hold that step's real tensors
            # (a Hugging Face model's outputs and cache) until Python's next full collection:
            # device memory the plan never sees. Collect them once, after the first step.
            self.collected = True
            gc.collect()
            # what that step's backward saw of its outputs is that garbage's doing, not the loop's
            self.observed.dropped_seen = None
        seen, self.observed.dropped_seen = self.observed.dropped_seen, None
        if seen is not None:  # an output held at any backward so far counts as held
            self.dropped = seen if self.dropped is None else self.dropped & seen
        if self.dropped is not None and torch.is_grad_enabled():
            # before a trial goes on: a trial's plans are then all made knowing it (the trial
            # waits for its warm-up steps, so the first that count come after this is known)
            self._outputs_dropped(args)
        # (before a trial moves on to another plan: what this one measured is learnt first)
        if torch.is_grad_enabled() and self.opts.memory_budget is not None and self.record.training:
            sizes = self._grown_sizes(args) if self.size_slots else None
            if sizes is not None or self._stale():
                self._replan(args, sizes, "a size grew past the plan" if sizes else "the device holds more")
            elif self._outside_over():
                why = (f"code outside the compiled graph (run eagerly, after a graph break) allocated "
                       f"{format_bytes(self.outside)} between its forward and backward, past memory_budget; "
                       "planned again holding it there")
                log.warning("lohan %s: %s", self.record.name, why)
                self._replan(args, None, why)
            elif self._ran_over():
                why = (f"a step ran {format_bytes(self.observed.peak_excess)} above its predicted peak, past "
                       f"memory_budget (the {self.opts.executor} executor holds what the simulator does not "
                       f"model); planned again holding {format_bytes(self.excess)} more")
                log.warning("lohan %s: %s", self.record.name, why)
                self._replan(args, None, why)
            elif self.weigh_gain_s is not None and self.trial is None and self.reuse is not None:
                if self.unweighed_lost_s >= self.weigh_cost_s:
                    self._weigh(args)
                else:
                    self.unweighed_lost_s += self.weigh_gain_s
        if self.trial is not None and torch.is_grad_enabled():
            self._trial_step(args)
        if not self.calibrated and self._timed():
            self._calibrate()
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
        planned = self.record.pass_report("plan_memory")
        if planned is None:
            return
        # (compared as the problem keeps them: only positions of its own user outputs, so that
        # a plan simulated again once is not simulated again at every step)
        kept = planned["problem"]
        if frozenset(self.dropped) & frozenset(kept.user_outputs) == kept.dropped_outputs:
            return
        problem = kept.without_outputs(self.dropped)
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
        # the excess was measured against the prediction this replaces
        before = self.record.predicted_peak_bytes or 0
        self.record.repredict(problem, prediction)
        self.observed.peak_excess = max(0, self.observed.peak_excess - (prediction.peak_device_bytes - before))
        if self.calibrated and self.measured:
            self.record.calibrate(self.measured)

    def _weigh(self, args: Sequence[Any]) -> None:
        """Plan again with every partition weighed (``_defer_weighing``). Not one of the
        ``MAX_REPLANS`` kept for the budget; where no plan fits now (what the device holds grew
        since), the plan running stays and the budget's own checks take it from there."""
        why = (f"steps on partitions weighed against no other could have lost "
               f"{self.unweighed_lost_s:.1f} s, what weighing them is taken to cost: planned again with them weighed")
        chosen = self.reuse.chosen
        self.weigh_gain_s, self.unweighed_lost_s = None, 0.0  # (once: the new plan sets them again)
        self.reuse.chosen = None  # (``partition_graph`` weighs every partition)
        try:
            self._replan(args, None, why, counted=False)
        except BudgetError as e:
            self.reuse.chosen = chosen
            log.info("lohan %s: weighing the partitions found no plan that fits (%s); the plan stays",
                     self.record.name, e)

    def _replan(self, args: Sequence[Any], sizes: dict | None, why: str, counted: bool = True) -> None:
        if counted and self.replans >= self.MAX_REPLANS:
            log.warning("lohan %s: %s, but it was re-planned %d times already; the step may pass "
                        "memory_budget", self.record.name, why, self.replans)
            self.planned_level = device_memory.allocated(self.record.device)  # warn once per growth
            if sizes:
                self.planned_sizes = sizes
            return
        self.replans += counted
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
