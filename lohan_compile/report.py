"""What the compiler decided and what a training step measured.

``GraphRecord`` is one compiled graph (its pass reports, what it keeps for
backward); ``Report`` is one training step: the graphs it ran, in order, and
the totals DESIGN.md promises in ``summary()``. ``last_report()`` returns the
report of the most recent completed step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy
from tabulate import tabulate

from .graph.pipeline import PassRecord
from .graph.shapes import evaluate, sum_exprs
from .plan.problem import Action
from .plan.program import predict
from .units import format_bytes

# the trace's tracks: one per resource of the simulator
TRACKS = {
    "compute": "compute",
    "h2d": "host->device",
    "d2h": "device->host",
    "cpu": "CPU optimizer",
    "ssd_read": "SSD read",
    "ssd_write": "SSD write",
}


SUMMARY_KEYS = (
    "budget_bytes",
    "predicted_peak_bytes",
    "measured_peak_bytes",
    "kept_bytes",
    "swapped_bytes",
    "recomputed_bytes",
    "predicted_step_s",
    "host_peak_bytes",
    "d2h_bytes",
    "h2d_bytes",
)


@dataclass
class GraphRecord:
    """One compiled graph: a training graph (forward + backward) or a forward-only one."""

    graph_id: int
    training: bool
    executor: str
    budget_bytes: int | None
    passes: list[PassRecord] = field(default_factory=list)
    # bytes of activation storage kept from forward to backward, possibly symbolic
    kept_bytes_expr: sympy.Expr | None = None
    swapped_bytes_expr: sympy.Expr | None = None
    recomputed_bytes_expr: sympy.Expr | None = None
    # forward placeholders' fake values, to bind symbolic sizes at run time
    fw_placeholder_vals: Sequence[Any] = ()
    symbolic: bool = False
    predicted_step_s: float | None = None
    predicted_peak_bytes: int | None = None
    device: Any = None  # the device its tensors live on (None: the CPU stand-in)
    dump_dir: str | None = None  # where dumps go (the step's measured trace too)
    # input storages the device counter does not see, found at the first run: ptr -> bytes
    uncounted_inputs: dict[int, int] | None = None
    predicted_host_peak_bytes: int | None = None
    # device bytes held outside the graph's inputs when it was planned (measured; counted in
    # its predicted peak), and all device bytes allocated then (a run compares its own start)
    resident_outside_bytes: int = 0
    planned_level: int | None = None
    # Inductor executor: per phase, how the graph was split (segments, lohan ops, the driver's code)
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Inductor executor under a budget: the device bytes a segment was measured to hold at its
    # peak beyond the plan's model of its nodes, when it was compiled, by (phase, node name) of
    # the node the model peaks at
    segment_scratch: dict[tuple[str, str], int] = field(default_factory=dict)
    # ... of those, the ones that are a bound, not a measurement (a segment not run: no room
    # under the budget then), and the nodes of every segment that was run and measured
    segment_bounds: set[tuple[str, str]] = field(default_factory=set)
    segment_measured: set[tuple[str, str]] = field(default_factory=set)
    # ... and the bytes of every segment's outputs, which exist in memory, by (phase, node name)
    segment_outputs: dict[tuple[str, str], int] = field(default_factory=dict)
    # ... and the results Inductor may fuse found inside a segment, not among its outputs (a
    # plan holds them in memory until they are seen so), by (phase, node name)
    segment_fused: set[tuple[str, str]] = field(default_factory=set)
    # the plan's step simulated again with the compute times the executor measured
    calibrated_step_s: float | None = None
    measured_compute_s: float | None = None
    # policy "auto" under a budget: the plan it runs, (partition, family), and every plan it
    # could run with its predicted step; after a trial, each timed plan's measured graph seconds
    variant: tuple[str, str] | None = None
    variants: dict[tuple[str, str], float] = field(default_factory=dict)
    trials: dict[tuple[str, str], float] = field(default_factory=dict)
    # forward outputs handed to the user (positions in the forward's outputs) whose storage the
    # runtime watches (what it sees is in runtime/observed.py)
    watch_outputs: tuple[int, ...] = ()
    watch_objects: frozenset[int] = frozenset()  # of those, watched as tensors (their storage is saved)
    # outputs the plan released when forward ends though no step was yet seen dropping them (no
    # plan fits holding them): position -> bytes; a backward that finds one alive refuses to run
    must_drop: dict[int, int] = field(default_factory=dict)
    must_drop_budget: int | None = None  # ... and the smallest budget of a plan holding them

    def note_variants(self) -> None:
        """Which of auto's plans runs, and which others it could run (from the passes' reports)."""
        planned = self.pass_report("plan_memory")
        part = self.pass_report("partition_graph")
        if planned is None or part is None or planned.get("plan_family") is None:
            return
        partition = "min-cut" if part.get("partitioner", "").startswith("torch min-cut") else "default"
        self.variant = (partition, planned["plan_family"])
        variants = dict(part.get("variants") or {})
        # the chosen partition's plans as plan_memory made them (parameter streaming included)
        variants = {k: v for k, v in variants.items() if k[0] != partition}
        variants.update({(partition, f): s for f, s in planned.get("alternatives", {}).items()})
        self.variants = variants

    def apply_plan_totals(self, plan: Any, problem: Any) -> None:
        """Move the plan's swapped and recomputed storages out of the kept total."""
        def total(action: Action) -> sympy.Expr:
            return sum_exprs(c.bytes_expr for c in problem.candidates if plan.decisions[c.key].action is action)

        moved = total(Action.SWAP) + total(Action.RECOMPUTE)
        self.kept_bytes_expr = sympy.expand(self.kept_bytes_expr - moved)
        self.swapped_bytes_expr = total(Action.SWAP)
        self.recomputed_bytes_expr = sympy.expand(self.recomputed_bytes_expr + total(Action.RECOMPUTE))
        self.predicted_step_s = plan.prediction.step_seconds
        self.predicted_peak_bytes = plan.prediction.peak_device_bytes
        self.predicted_host_peak_bytes = plan.prediction.peak_host_bytes

    def repredict(self, problem: Any, prediction: Any) -> None:
        """The same plan simulated again on ``problem`` (the forward outputs the step drops,
        learnt at run time): its predicted peak and step, in the record and its plan's report."""
        from dataclasses import replace

        planned = self.pass_report("plan_memory")
        planned["problem"] = problem
        planned["plan"] = replace(planned["plan"], prediction=prediction)
        planned["predicted_step_s"] = self.predicted_step_s = prediction.step_seconds
        planned["predicted_peak_bytes"] = self.predicted_peak_bytes = prediction.peak_device_bytes
        planned["predicted_host_peak_bytes"] = self.predicted_host_peak_bytes = prediction.peak_host_bytes

    def calibrate(self, measured: dict[str, float]) -> None:
        """Simulate the plan again with measured op times (``measured``: seconds by node name;
        ops not in it keep their estimate)."""
        from dataclasses import replace

        planned = self.pass_report("plan_memory")
        if planned is None or not measured:
            return
        problem = planned["problem"]
        ops = [replace(op, seconds=measured.get(op.name, op.seconds)) for op in problem.ops]
        calibrated = replace(
            problem,
            ops=ops,
            fw_seconds=sum(op.seconds for op in ops if op.phase == "fw"),
            bw_seconds=sum(op.seconds for op in ops if op.phase == "bw"),
        )
        self.calibrated_step_s = predict(calibrated, planned["plan"].decisions, planned["rates"]).step_seconds
        self.measured_compute_s = sum(measured.values())

    @property
    def name(self) -> str:
        return f"graph {self.graph_id}"

    def pass_report(self, name: str) -> dict[str, Any] | None:
        for rec in self.passes:
            if rec.name == name and not rec.skipped:
                return rec.report
        return None


@dataclass
class GraphRun:
    graph: GraphRecord
    phase: str  # "forward" or "backward"
    seconds: float
    bindings: dict = field(default_factory=dict)  # symbol -> size this run used
    backward_seen: bool = False  # a forward run: its backward ran (or its graph was dropped)
    # a forward run: weak references to the storages of the outputs its graph watches, and the
    # device bytes allocated at its start less those when its graph was planned
    output_refs: list = field(default_factory=list)
    alive_refs: list = field(default_factory=list)  # a backward's: its forward's outputs alive when it began
    level_growth: int | None = None
    start: float = 0.0  # perf_counter() when it began
    peak_before: int | None = None  # the step's device peak so far when it began
    failed: bool = False  # it raised (an error, Ctrl-C): a backward that raised ends no step
    # where the step tracker writes what it sees of the graph's plan (runtime/observed.py; the
    # re-planner reads it): not part of the report
    observed: Any = field(default=None, repr=False, compare=False)

    def bytes_of(self, expr: sympy.Expr | None) -> int | None:
        return None if expr is None else evaluate(expr, self.bindings)


@dataclass
class Report:
    """One training step, across all of its graphs, in the order they ran."""

    runs: list[GraphRun]
    step_seconds: float
    started_at: float | None = None  # perf_counter() when the step began
    engine_base: tuple[int, int] | None = None  # copy-engine counters when the step began
    d2h_bytes: int = 0
    h2d_bytes: int = 0
    # the SSD tier's reads and writes since the step before ended: the windows of consecutive
    # steps meet, so traffic between them (a deferred update runs after step() returned) counts
    # once, in the later step
    ssd_base: tuple[int, int] = (0, 0)
    ssd_read_bytes: int = 0
    ssd_write_bytes: int = 0
    measured_peak_bytes: int | None = None
    host_peak_bytes: int | None = None
    optimizer_events: list = field(default_factory=list)  # offload runtime events of this step
    # chunks the copy engine and the SSD tier moved: (kind, bytes, start, end), perf_counter() seconds
    copy_events: list = field(default_factory=list)
    planned_only: bool = False  # from explain(): traced on the meta device, nothing measured
    # device bytes over the step: (perf_counter() seconds, live bytes counted by the device
    # counter); uncounted_bytes (inputs allocated before counting began) are added when plotted
    memory_timeline: list = field(default_factory=list)
    uncounted_bytes: int = 0

    @property
    def graphs(self) -> list[GraphRecord]:
        seen: dict[int, GraphRecord] = {}
        for r in self.runs:
            seen.setdefault(r.graph.graph_id, r.graph)
        return list(seen.values())

    def _forward_total(self, attr: str) -> int | None:
        total = 0
        for run in self.runs:
            if run.phase != "forward":
                continue
            value = run.bytes_of(getattr(run.graph, attr))
            if value is None:
                return None
            total += value
        return total

    def _predicted_sum(self, attr: str) -> float | None:
        values = [getattr(g, attr) for g in self.graphs]
        return None if not values or any(v is None for v in values) else sum(values)

    def _predicted_peak(self) -> int | None:
        """Each graph's prediction counts what the device held when it was planned. In a run,
        each forward's start read the device level: its graph's prediction moves by how much
        more (or less) the device held then (another graph of the step kept more or less for
        backward after a trial or a re-plan, an optimizer made its state); the step's is the
        highest. Without those readings (a plan traced on ``meta``), in the order the forwards
        ran: while a graph runs, the graphs before it keep their saved values, and what its
        prediction did not see of them is added."""
        graphs = self.graphs
        if not graphs or any(g.predicted_peak_bytes is None for g in graphs):
            return None
        forwards = [r for r in self.runs if r.phase == "forward"]
        if forwards and all(r.level_growth is not None for r in forwards):
            return max(r.graph.predicted_peak_bytes + r.level_growth for r in forwards)
        peak, earlier = 0, 0
        for g in graphs:
            peak = max(peak, g.predicted_peak_bytes + max(0, earlier - g.resident_outside_bytes))
            earlier += evaluate(g.kept_bytes_expr, {}) or 0
        return peak

    def summary(self) -> dict[str, Any]:
        budgets = {g.budget_bytes for g in self.graphs}
        measured = not self.planned_only
        return {
            "budget_bytes": budgets.pop() if len(budgets) == 1 else None,
            "predicted_peak_bytes": self._predicted_peak(),
            "measured_peak_bytes": self.measured_peak_bytes if measured else None,
            "kept_bytes": self._forward_total("kept_bytes_expr"),
            "swapped_bytes": self._forward_total("swapped_bytes_expr"),
            "recomputed_bytes": self._forward_total("recomputed_bytes_expr"),
            "predicted_step_s": self._predicted_sum("predicted_step_s"),
            # the same, with the compute times the Inductor executor measured (None until then)
            "calibrated_step_s": self._predicted_sum("calibrated_step_s"),
            "host_peak_bytes": self.host_peak_bytes if measured else None,
            "d2h_bytes": self.d2h_bytes if measured else None,
            "h2d_bytes": self.h2d_bytes if measured else None,
            "ssd_read_bytes": self.ssd_read_bytes if measured else None,
            "ssd_write_bytes": self.ssd_write_bytes if measured else None,
            "measured_step_s": self.step_seconds if measured else None,
            "graphs": len(self.graphs),
            # policy "auto": which of its plans each graph runs ("partition/family"), and the
            # plans a trial timed, with their median graph seconds (empty before or without one)
            "plans": [("/".join(g.variant) if g.variant else None) for g in self.graphs],
            "plan_trials": [{"/".join(v): s for v, s in g.trials.items()} for g in self.graphs],
            # per graph: what an earlier plan was measured to hold above its prediction, which
            # this plan holds room for (counted in predicted_peak_bytes; 0 almost always)
            "executor_excess_bytes": [(g.pass_report("plan_memory") or {}).get("executor_excess_bytes", 0)
                                      for g in self.graphs],
            # per graph: what code run eagerly (after a graph break) was measured to allocate
            # between its forward and backward, which this plan holds room for there
            "outside_bytes": [(g.pass_report("plan_memory") or {}).get("outside_bytes", 0) for g in self.graphs],
            # data parallel: the bytes of gradients the step's collectives average over the ranks
            # (each rank sends and receives 2 (N - 1) / N of them in a ring all-reduce)
            "reduced_bytes": sum((g.pass_report("reduce_grads") or {}).get("reduced_bytes", 0) for g in self.graphs),
        }

    def trace_events(self, *, pid: int = 2) -> list[dict]:
        """The measured timeline as Chrome trace events: one track for compute (each graph's
        forward and backward), one per copy direction and SSD queue (each chunk the copy
        engine or SSD tier moved), one for the CPU optimizer (updates, norms, roll-backs), and
        each graph's predicted timeline beside it, aligned to where the graph really began."""

        t0 = self._step_start()
        events: list[dict] = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": "measured"}}]
        tids = {name: i for i, name in enumerate(TRACKS, start=1)}
        for resource, track in TRACKS.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tids[resource], "args": {"name": track}})
        for r in self.runs:
            events.append({"ph": "X", "name": f"{r.graph.name} {r.phase}", "pid": pid, "tid": tids["compute"],
                           "ts": (r.start - t0) * 1e6, "dur": r.seconds * 1e6})
        track_of = {"d2h": "d2h", "h2d": "h2d", "ssd_write": "ssd_write", "ssd_read": "ssd_read"}
        for kind, nbytes, start, end in self.copy_events:
            if kind in track_of:
                events.append({"ph": "X", "name": f"{kind} {format_bytes(nbytes)}", "pid": pid,
                               "tid": tids[track_of[kind]], "ts": (start - t0) * 1e6,
                               "dur": max(end - start, 0.0) * 1e6, "args": {"bytes": nbytes}})
        for e in self.optimizer_events:
            events.append({"ph": "X", "name": f"{e.kind} {e.key}", "pid": pid, "tid": tids["cpu"],
                           "ts": (e.start - t0) * 1e6, "dur": max(e.end - e.start, 0.0) * 1e6})
        for r, plan in self._planned_runs():
            events += plan_trace_events(plan, pid=10 + r.graph.graph_id,
                                       label=f"predicted, {r.graph.name}", offset_s=r.start - t0)
        return events

    def _step_start(self) -> float:
        return self.started_at if self.started_at is not None else min((r.start for r in self.runs), default=0.0)

    def _planned_runs(self) -> list[tuple[GraphRun, Any]]:
        """(first forward run, plan) of each planned graph of the step, in the order they ran."""
        seen, out = set(), []
        for r in self.runs:
            planned = r.graph.pass_report("plan_memory")
            if r.phase == "forward" and planned is not None and r.graph.graph_id not in seen:
                seen.add(r.graph.graph_id)
                out.append((r, planned["plan"]))
        return out

    def memory_curves(self) -> dict[str, list[tuple[float, int]]]:
        """Device bytes over the step, seconds from its start: ``"measured"`` (the device
        counter, as the measured peak counts) and ``"predicted, graph N"`` (the simulator's
        curve for each graph, placed where the graph's forward really began)."""
        t0 = self._step_start()
        curves: dict[str, list[tuple[float, int]]] = {}
        if self.memory_timeline and not self.planned_only:
            curves["measured"] = [(t - t0, b + self.uncounted_bytes) for t, b in self.memory_timeline]
        for r, plan in self._planned_runs():
            offset = 0.0 if self.planned_only else r.start - t0
            curves[f"predicted, {r.graph.name}"] = [(offset + t, b) for t, b in plan.prediction.timeline.curves["device"]]
        return curves

    def plot_memory(self, path: str) -> str:
        """Plot ``memory_curves()`` to a PNG (needs matplotlib: ``pip install matplotlib``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("plot_memory() needs matplotlib: pip install 'lohan_compile[plot]'") from None
        fig, ax = plt.subplots(figsize=(9, 4))
        for name, points in self.memory_curves().items():
            if not points:
                continue
            xs = [t * 1e3 for t, _ in points]
            ys = [b / 2**20 for _, b in points]
            ax.step(xs, ys, where="post", label=name, linewidth=1.2 if name == "measured" else 1.6,
                    linestyle="-" if name == "measured" else "--")
        budget = self.summary()["budget_bytes"]
        if budget:
            ax.axhline(budget / 2**20, color="red", linewidth=0.8, label="memory_budget")
        ax.set_xlabel("time in the step (ms)")
        ax.set_ylabel("device memory (MiB)")
        ax.set_title("device memory over the step: predicted against measured")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def write_trace(self, path: str) -> str:
        """Write ``trace_events()`` as a JSON trace (open it at https://ui.perfetto.dev)."""
        import json

        with open(path, "w") as f:
            json.dump({"traceEvents": self.trace_events()}, f)
        return path

    def to_table(self) -> str:
        rows = []
        for run in self.runs:
            g = run.graph
            rows.append([
                g.name,
                run.phase,
                f"{run.seconds * 1e3:.2f} ms",
                format_bytes(run.bytes_of(g.kept_bytes_expr)) if run.phase == "forward" else "",
                str(g.kept_bytes_expr) if g.symbolic and run.phase == "forward" else "",
            ])
        table = tabulate(rows, headers=["graph", "phase", "time", "kept for backward", "symbolic size"])
        summary = self.summary()
        facts = [[k, _format_fact(k, v)] for k, v in summary.items()]
        return table + "\n\n" + tabulate(facts, headers=["step", "value"])

    def decisions(self) -> list[dict[str, Any]]:
        """What the plan decided for every saved activation of every graph of the step, and
        what gradient offloading did: one dict per tensor (``graph``, ``tensor``, ``bytes``,
        ``decision``: keep / swap / recompute / offload, ``reason``)."""
        rows: list[dict[str, Any]] = []
        for g in self.graphs:
            planned = g.pass_report("plan_memory")
            if planned is not None:
                plan, problem = planned["plan"], planned["problem"]
                for c in problem.candidates:
                    d = plan.decisions[c.key]
                    rows.append({"graph": g.graph_id, "tensor": c.name, "bytes": c.bytes,
                                 "decision": d.action.value, "reason": d.reason or "",
                                 "prefetch_at": d.prefetch_at, "release_at": d.release_at})
            offload = g.pass_report("offload_grads")
            if offload and offload.get("offloaded"):
                rows.append({"graph": g.graph_id, "tensor": f"gradients of {offload['offloaded']} parameters",
                             "bytes": offload.get("offloaded_grad_bytes", 0), "decision": "offload",
                             "reason": f"to {offload['optimizer']} on the CPU as backward makes them, "
                                       f"in {_copies(offload.get('grad_copies', offload['offloaded']))}",
                             "prefetch_at": None, "release_at": None})
        return rows

    def plan_table(self, limit: int | None = 12) -> str:
        """``decisions()`` as a table, largest tensors first (``limit`` rows, then a count)."""
        rows = sorted(self.decisions(), key=lambda r: -r["bytes"])
        shown = rows if limit is None else rows[:limit]
        table = tabulate(
            [[f"graph {r['graph']}", r["tensor"], format_bytes(r["bytes"]), r["decision"], r["reason"]] for r in shown],
            headers=["graph", "tensor", "bytes", "decision", "why"],
        )
        if len(rows) > len(shown):
            rest = rows[len(shown):]
            counts = {}
            for r in rest:
                counts[r["decision"]] = counts.get(r["decision"], 0) + 1
            table += "\n... and " + ", ".join(f"{n} more {k}" for k, n in sorted(counts.items()))
            table += f" ({format_bytes(sum(r['bytes'] for r in rest))})"
        return table

    def __str__(self) -> str:
        return self.to_table()


def _copies(n: int) -> str:
    return "1 copy" if n == 1 else f"{n} copies"


def _format_fact(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith("_bytes"):
        if isinstance(value, list):  # per graph
            return ", ".join(format_bytes(v) for v in value) if any(value) else "-"
        return format_bytes(value)
    if key.endswith("_s"):
        return f"{value:.4f} s"
    if key == "plan_trials":  # per graph: plan -> median seconds of its forward + backward
        return "; ".join(", ".join(f"{p} {s * 1e3:.1f} ms" for p, s in g.items()) for g in value if g) or "-"
    if key == "plans":
        return ", ".join(str(p) for p in value) if any(value) else "-"
    return str(value)


def plan_trace_events(plan: Any, *, pid: int = 1, label: str = "predicted", offset_s: float = 0.0) -> list[dict]:
    """Chrome trace events for a plan's predicted timeline, one thread (track) per resource."""
    events: list[dict] = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": label}}]
    for tid, (resource, track) in enumerate(TRACKS.items(), start=1):
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": track}})
    tids = {r: i for i, r in enumerate(TRACKS, start=1)}
    for iv in plan.prediction.timeline.intervals:
        events.append({
            "ph": "X", "name": str(iv.name), "pid": pid, "tid": tids.get(iv.resource, len(tids) + 1),
            "ts": (offset_s + iv.start) * 1e6, "dur": max(iv.end - iv.start, 0.0) * 1e6,
        })
    return events
