"""Step tracking: which graphs a training step runs, in what order, and for how long.

A step runs from the first forward graph of a training step to the end of its
last backward graph: every forward of a training graph opens a pending
backward, and when no backward is pending any more the step is complete and
its ``Report`` becomes ``last_report()``. The step's measured device peak comes
from the device counters (``runtime/device.py``), reset when the step starts. Forward-only graphs (``no_grad``)
are not steps and are not recorded.

One tracker serves the process, so a step that interleaves two compiled
models is reported as one step. A forward whose backward never runs (a loss
computed with grad enabled and dropped) keeps its step open until the next
backward completes; the report then covers both.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .. import ext
from ..graph.shapes import bind_symbols
from ..report import GraphRecord, GraphRun, Report
from . import device as device_memory
from . import hosttier, stream
from .observed import Observed


def _compiled_backward_node(outputs: Any):
    """The autograd node of AOTAutograd's compiled function among ``outputs``."""
    stack = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    for t in stack:
        fn = getattr(t, "grad_fn", None) if isinstance(t, torch.Tensor) else None
        for candidate in (fn, *(f for f, _ in (fn.next_functions if fn is not None else ()))):
            if candidate is not None and type(candidate).__name__.startswith("CompiledFunctionBackward"):
                return candidate
    return None


def uncounted_storages(args: Sequence[object]) -> dict[int, int]:
    """Input storages the device counter does not see (allocated before it was installed):
    they are resident all the same, and the measured peak adds them."""
    out: dict[int, int] = {}
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type == "cpu" and not device_memory.counted(a):
            if stream.lookup(a) is not None:
                continue  # streamed: its storage is the counter's since registration (device.adopt)
            storage = a.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _hosttier():
    """The host-tier module if its extension is already loaded (a step never builds it)."""
    if not ext._loaded:
        return None
    return hosttier


def _engine_bytes() -> tuple[int, int]:
    """Device->host and host->device bytes the copy engine has moved, process-wide.

    Counted by the C++ copy and I/O threads as each chunk lands, so they are
    the bytes really moved, not the plan's."""
    ht = _hosttier()
    if ht is None:
        return (0, 0)
    moved = ht.bytes_moved()
    return moved["d2h_bytes"], moved["h2d_bytes"]


def _ssd_bytes() -> tuple[int, int]:
    """Bytes the SSD tier has read and written, process-wide (counted by its I/O threads)."""
    ht = _hosttier()
    if ht is None:
        return (0, 0)
    moved = ht.bytes_moved()
    return moved["ssd_read_bytes"], moved["ssd_write_bytes"]


_recording = False


def _copy_spans(since: float) -> list:
    """Chunks the copy engine and SSD tier moved (kind, bytes, start, end) ending after ``since``;
    turns the recording on the first time the extension is there."""
    global _recording
    ht = _hosttier()
    if ht is None:
        return []
    if not _recording:
        ht.record_copy_timeline(True)
        _recording = True
        return []
    return [s for s in ht.take_copy_timeline() if s[3] >= since]


_recording_memory = False
_warned = False


def _warn_no_matplotlib() -> None:
    global _warned
    if not _warned:
        _warned = True
        import warnings

        warnings.warn("lohan dumps: step_memory.png needs matplotlib (pip install matplotlib); skipped",
                      stacklevel=3)


def _memory_timeline(device: Any, since: float) -> list:
    """The device counter's (time, bytes) samples after ``since`` (CPU stand-in only); turns
    the recording on the first time."""
    global _recording_memory
    if device is not None and getattr(device, "type", None) == "cuda":
        return []
    if not _recording_memory:
        device_memory.record_timeline(True)
        _recording_memory = True
        return []
    return [s for s in device_memory.take_timeline() if s[0] >= since]


def _current_tier():
    ht = _hosttier()
    return None if ht is None else ht.current_if_set()


def _host_step_begin() -> None:
    tier = _current_tier()
    if tier is not None:
        tier.reset_peak()


def _host_peak() -> int | None:
    """Peak host-tier bytes in use during the step (None when no tier was used)."""
    tier = _current_tier()
    return None if tier is None else tier.stats().peak_in_use_bytes


def after_backward(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the autograd engine finishes the backward pass in progress (every
    ``.grad`` accumulated, every graph's backward done), or now outside one."""
    try:
        torch.autograd.Variable._execution_engine.queue_callback(fn)
    except RuntimeError:  # not inside a backward pass
        fn()


class StepTracker:
    def __init__(self) -> None:
        # re-entrant: a collection may run ``forward_dropped`` (a finalizer) on this thread while
        # it holds the lock
        self._lock = threading.RLock()
        self._last: Report | None = None
        self._extra_at_end = (0, 0)
        # the SSD tier's counters when the last step ended: a step's SSD traffic runs from there
        # (a deferred update reads and writes its state after step() returned, before the next
        # forward)
        self._ssd_mark = _ssd_bytes()
        self._finished_participants: list = []
        self._open_step()

    def _open_step(self) -> None:
        self._runs: list[GraphRun] = []
        self._pending = 0
        self._step_start: float | None = None
        self._device = None
        self._participants: list = []  # offload runtimes with work in this step
        self.latest_forward: GraphRun | None = None
        # bytes moved during the open step outside the C++ copy engine (Python-side
        # copies add here); the engine's own counts are added at the step's end
        self.d2h_bytes = 0
        self.h2d_bytes = 0
        self._engine_base = (0, 0)
        # the step's device peak, and the device bytes allocated, when its latest graph run ended
        self._end_peak: int | None = None
        self._end_level: int | None = None

    def last_report(self) -> Report | None:
        return self._last

    def step_open(self) -> bool:
        """A step has begun (a forward ran) and not ended."""
        return self._step_start is not None

    def forward_begin(self, graph: GraphRecord, args: Sequence[object], observed: Observed | None = None) -> GraphRun:
        """A forward of ``graph`` begins (``observed``: where what is seen of its plan goes)."""
        self._note_gap(device_memory.peak(graph.device))  # (before this run counts as pending)
        bindings = bind_symbols(graph.fw_placeholder_vals, args) if graph.symbolic else {}
        if graph.uncounted_inputs is None:
            graph.uncounted_inputs = uncounted_storages(args)
        run = GraphRun(graph, "forward", 0.0, bindings, observed=observed)
        if graph.planned_level is not None:
            run.level_growth = device_memory.allocated(graph.device) - graph.planned_level
        with self._lock:
            if self._step_start is None:
                self._step_start = time.perf_counter()
                self._device = graph.device
                device_memory.reset_peak(self._device)
                # the copy engine's counters and the host tier's peak, from here on
                self._engine_base = _engine_bytes()
                _copy_spans(self._step_start)  # drop what earlier steps moved
                _memory_timeline(self._device, self._step_start)
                _host_step_begin()
            self._pending += 1
            self._runs.append(run)
        run.peak_before = device_memory.peak(graph.device)
        self.latest_forward = run
        return run

    def forward_pending(self, graph: GraphRecord) -> bool:
        """A forward of ``graph`` ran in the open step and its backward is still to come.
        Without the lock: a collection may run ``forward_dropped`` (a finalizer, on this thread)
        at any allocation, and it takes the lock; the list is read once (a new step replaces it)."""
        runs = self._runs
        return any(r.graph is graph and r.phase == "forward" and not r.backward_seen for r in list(runs))

    def forward_outputs(self, run: GraphRun, outputs: Sequence[Any]) -> None:
        """Watch the outputs the user receives (weakly: watching keeps nothing alive), to
        learn which the step drops before its backward: their storages, or, where backward
        keeps the storage anyway (it is saved), the tensors handed out."""
        for pos in run.graph.watch_outputs:
            t = outputs[pos] if pos < len(outputs) else None
            if isinstance(t, torch.Tensor):
                if pos in run.graph.watch_objects:
                    ref = weakref.ref(t)
                    run.output_refs.append((pos, lambda ref=ref: ref() is None))
                else:
                    run.output_refs.append((pos, StorageWeakRef(t.untyped_storage()).expired))

    def backward_begin(self, graph: GraphRecord, observed: Observed | None = None) -> GraphRun:
        self._note_gap(device_memory.peak(graph.device))  # (while its forward still counts as pending)
        run = GraphRun(graph, "backward", 0.0, observed=observed)
        with self._lock:
            for r in self._runs:
                if r.graph is graph and r.phase == "forward" and not r.backward_seen:
                    r.backward_seen = True
                    run.level_growth = r.level_growth
                    gone = frozenset(pos for pos, expired in r.output_refs if expired())
                    run.alive_refs = [(pos, expired) for pos, expired in r.output_refs if pos not in gone]
                    if observed is not None:
                        observed.dropped_seen = gone
                    r.output_refs = []
                    break
            self._runs.append(run)
        run.peak_before = device_memory.peak(graph.device)
        return run

    def _note_gap(self, peak: int) -> None:
        """Code that ran between two graph runs of the step (eagerly: after a graph break, an
        ``autograd.Function`` dynamo does not trace, a loss computed outside the model) raised
        the step's device peak to ``peak``: it allocated ``peak`` less what the device held when
        the previous run ended. The graphs whose backward is still to come held their saved
        tensors meanwhile: each learns those bytes as allocated between its forward and its
        backward (not in a plan's first step, whose compile-time garbage is still held)."""
        if self._end_peak is None or self._end_level is None or peak <= self._end_peak:
            return
        outside = peak - self._end_level
        with self._lock:
            pending = [r for r in self._runs if r.phase == "forward" and not r.backward_seen]
        for r in pending:
            observed = r.observed
            if observed is not None and observed.steps_run >= 1:
                observed.outside_bytes = max(observed.outside_bytes, outside)

    def _uncounted_bytes(self) -> int:
        """Device bytes of the open step's graphs' inputs the counter does not see (each storage
        once); called with the lock held."""
        uncounted: dict[int, int] = {}
        for r in self._runs:
            uncounted.update(r.graph.uncounted_inputs or {})
        return sum(uncounted.values())

    def _note_excess(self, run: GraphRun) -> None:
        """Where the step's device peak rose during ``run``, its highest point is known: the
        bytes above what its plan predicted (moved by the level its forward found) are the
        executor's excess. The first step's are not counted (dynamo's and AOTAutograd's
        compile-time garbage is still held then)."""
        graph, observed = run.graph, run.observed
        if run.peak_before is None or graph.predicted_peak_bytes is None or observed is None or observed.steps_run < 1:
            return
        after = device_memory.peak(graph.device)
        if after <= run.peak_before:
            return  # its highest point is below one the step reached before it
        with self._lock:
            uncounted = self._uncounted_bytes()
        excess = after + uncounted - graph.predicted_peak_bytes - (run.level_growth or 0)
        observed.peak_excess = max(observed.peak_excess, excess)

    def watch(self, run: GraphRun, outputs: Any) -> None:
        """Notice when a forward's autograd graph is freed without its backward running (an
        exception in backward, a loss dropped), so that its step still ends."""
        node = _compiled_backward_node(outputs)
        if node is not None:
            weakref.finalize(node, self.forward_dropped, run)

    def forward_dropped(self, run: GraphRun) -> None:
        """The forward ``run`` will have no backward (its autograd graph was freed, or it raised)."""
        with self._lock:
            if run.backward_seen or run not in self._runs:
                return
            run.backward_seen = True
            self._pending -= 1
            if self._pending > 0:
                return
            # no backward will end this step: it is not a step to report, nor one to take
            participants = self._participants
            self._open_step()
        for runtime in participants:
            runtime.backward_interrupted()

    def end(self, run: GraphRun, start: float) -> None:
        run.start = start
        run.seconds = time.perf_counter() - start
        self._note_excess(run)
        self._end_peak = device_memory.peak(run.graph.device)
        self._end_level = device_memory.allocated(run.graph.device)
        if run.phase != "backward":
            return
        if run.failed:
            # its gradients are partly handed over: the step cannot be taken (the optimizer's
            # runtime rolls back what ran, at zero_grad() or when the model is read)
            with self._lock:
                participants = self._participants
                self._open_step()
            for runtime in participants:
                runtime.backward_interrupted()
            return
        with self._lock:
            self._pending -= 1
            if self._pending > 0:
                return
            assert self._step_start is not None
            uncounted = self._uncounted_bytes()
            d2h, h2d = _engine_bytes()
            participants = self._participants
            self._extra_at_end = (self.d2h_bytes, self.h2d_bytes)
            self._last = Report(
                engine_base=self._engine_base,
                runs=self._runs,
                started_at=self._step_start,
                step_seconds=time.perf_counter() - self._step_start,
                d2h_bytes=self.d2h_bytes + d2h - self._engine_base[0],
                h2d_bytes=self.h2d_bytes + h2d - self._engine_base[1],
                host_peak_bytes=_host_peak(),
                measured_peak_bytes=device_memory.peak(self._device) + uncounted,
                ssd_base=self._ssd_mark,
                copy_events=_copy_spans(self._step_start),
                memory_timeline=_memory_timeline(self._device, self._step_start),
                uncounted_bytes=uncounted,
            )
            self._open_step()
        self._ssd_counted(self._last)
        # weakly: a finished step must not keep an optimizer (and its parameters) alive
        self._finished_participants = [weakref.ref(r) for r in participants]
        # outside the lock (it may submit work), once autograd has finished the whole backward
        # pass: gradients of code run eagerly (a graph break) are accumulated by then
        after_backward(lambda: [runtime.backward_ended() for runtime in participants])
        if participants or self._last is None:
            return
        self._write_dump(self._last)

    def _write_dump(self, report: Report) -> None:
        folders = {r.graph.dump_dir for r in report.runs if r.graph.dump_dir}
        for folder in folders:
            report.write_trace(f"{folder}/step_trace.json")
            try:
                report.plot_memory(f"{folder}/step_memory.png")
            except ImportError:
                _warn_no_matplotlib()

    def abandon_step(self) -> None:
        """Forget the open step (an exception interrupted its backward)."""
        with self._lock:
            self._open_step()

    def join_step(self, runtime) -> None:
        """An offload runtime has work in the open step: tell it when backward ends."""
        with self._lock:
            if runtime not in self._participants:
                self._participants.append(runtime)

    def optimizer_step_done(self) -> None:
        """With a lohan optimizer a step ends when its step() returns: extend the last report
        (its time, and the weights the optimizer copied back)."""
        report = self._last
        if report is None or report.started_at is None:
            return
        report.step_seconds = time.perf_counter() - report.started_at
        for ref in self._finished_participants:
            runtime = ref()
            if runtime is not None:
                # copied in one C call: the optimizer thread appends events while deferred updates
                # run, and a Python loop over the deque would see it change
                events = runtime.events.copy()
                report.optimizer_events.extend(e for e in events if e.start >= report.started_at)
        report.copy_events.extend(_copy_spans(report.started_at))
        if report.engine_base is not None:
            d2h, h2d = _engine_bytes()
            report.d2h_bytes = self._extra_at_end[0] + d2h - report.engine_base[0]
            report.h2d_bytes = self._extra_at_end[1] + h2d - report.engine_base[1]
        self._ssd_counted(report)
        self._write_dump(report)

    def _ssd_counted(self, report: Report) -> None:
        """The SSD tier's reads and writes from the end of the step before ``report``'s to now."""
        read, written = self._ssd_mark = _ssd_bytes()
        report.ssd_read_bytes = read - report.ssd_base[0]
        report.ssd_write_bytes = written - report.ssd_base[1]

    def reset(self) -> None:
        with self._lock:
            self._last = None
            self._finished_participants = []
            self._open_step()


TRACKER = StepTracker()


def last_report() -> Report | None:
    """Report of the most recent completed training step (None before the first)."""
    return TRACKER.last_report()
