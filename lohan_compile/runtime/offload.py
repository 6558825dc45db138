"""Active gradient offloading: the runtime behind the graph ops of ``offload_grads``.

The backward graph copies each parameter's gradient to the host tier as soon as
it is final (``lohan::swap_out`` / ``lohan::wait_tensor``) and hands the host
copy to this runtime (``lohan::grad_ready``); after the parameter's last use in
backward, ``lohan::weight_ready`` says its device weight may be rewritten. The
runtime runs ``CPUAdamW`` updates on a worker thread (the C++ kernel releases
the GIL) while backward goes on, and copies each updated weight back to the
device with the copy engine once both the update and the weight's last use are
done. ``opt.step()`` waits for what is outstanding and finishes the step.

Two ways to run the updates (``CPUAdamW(overlap=...)``), with the same results:

- ``"speculative"``: each update runs during backward as soon as its gradient
  is final, as if no clipping were needed, after copying the parameter's
  master and moments aside (12 host bytes per parameter, held until
  ``step()``). ``step()`` then knows the global gradient norm: when it says to
  clip, when a gradient is not finite (the step is skipped), or when a
  hyperparameter changed after backward, the copies are restored and the
  updates run again (one optimizer step after backward: the cost of a
  roll-back, likely in the first steps of fine-tuning when norms are large).
- ``"deferred"``: gradients wait on the host (their norm is summed as they
  arrive) and ``step()`` runs every update; nothing extra is kept, and nothing
  of the optimizer overlaps backward.

``"auto"`` (the default) chooses from measured costs: deferred when roll-backs
are common (more than 3 of the last 10 steps clipped or were skipped) or the
roll-back copies do not fit the host budget; otherwise it times a few steps of
each design and keeps the faster, measuring again every 200 steps. Either way an exception in the middle of a step leaves
the state from before the step: ``zero_grad()``, ``state_dict()`` or the next
backward roll back what ran.

A parameter whose gradient comes from several graphs of a step (a weight tied
across a graph break) is final only when the step's backward has ended; in the
first step, before the runtime knows the step's graphs, every parameter is
treated so. Gradients of micro-batches run inside ``opt.accumulate()`` add up
on the host.

Gradients that autograd accumulates into ``param.grad`` outside the compiled
graphs (code dynamo runs eagerly: a graph break, an ``autograd.Function`` it
does not trace, a loss computed from a weight outside the compiled model) come
to the runtime too: a hook on every parameter of the optimizer copies such a
gradient to the host tier, clears ``.grad`` and hands it over like a graph's,
so it is clipped, checked and updated with the rest of the step. A parameter
that only such code reads is taken on at its first gradient (its optimizer
state moves to the host tier, and the modules of the compiled model that own
it get the hooks that make reads outside the step wait, when the compiled code
next runs); its update is never deferred: ``step()`` returns once it reached
the device weight.
"""

from __future__ import annotations

import atexit
import collections
import functools
import math
import queue
import signal
import statistics
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import ops
from ..errors import HostMemoryError, LohanError
from ..plan.state import packed_budget, staging_blocks
from ..units import format_bytes
from . import amp, hosttier, keys, stream
from .step import TRACKER, after_backward

def _exact_sum(values: list[float]) -> float:
    """The correctly rounded sum (``math.fsum``), inf or NaN as a plain sum gives them."""
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):
        return sum(values)


def _grad_ready_impl(host_grad: torch.Tensor, key: int, stats: torch.Tensor | None = None) -> None:
    runtime = runtime_for(key)
    runtime.grad_ready(key, host_grad, counted=stats is not None and runtime.took_stats(stats, [key]))


def _grads_ready_impl(host_bucket: torch.Tensor, keys: list[int], stats: torch.Tensor | None = None) -> None:
    # a bucket of small gradients, flattened in ``keys`` order: each gets its slice (of memory:
    # an SSD block is read whole)
    if keys:  # (into a block that stays: its slices are the step's gradients, not staging)
        host_bucket = runtime_for(keys[0]).tier.in_memory(host_bucket, where="host")
    runtimes = {id(runtime_for(k)) for k in keys}
    counted = stats is not None and len(runtimes) == 1 and runtime_for(keys[0]).took_stats(stats, keys)
    offset = 0
    for key in keys:
        runtime = runtime_for(key)
        shape = runtime.params[key].shape
        n = shape.numel()
        runtime.grad_ready(key, host_bucket.narrow(0, offset, n).view(shape), counted=counted)
        offset += n
    if offset != host_bucket.numel():
        raise LohanError(f"gradient bucket of {host_bucket.numel()} elements, parameters of {offset}")


def _weight_ready_impl(key: int) -> None:
    runtime_for(key).weight_ready(key)


def _weight_wait_impl(weight: torch.Tensor, key: int) -> torch.Tensor:
    runtime_for(key).wait_weight(key)
    return torch.ops.aten.alias.default(weight)


ops.implement("grad_ready", _grad_ready_impl)
ops.implement("grads_ready", _grads_ready_impl)
ops.implement("weight_ready", _weight_ready_impl)
ops.implement("weight_wait", _weight_wait_impl)


# -- which runtime each key's gradient goes to (keys: runtime/keys.py) --------------------

_runtime_lock = threading.Lock()
_runtime_of_key: dict[int, weakref.ref] = {}  # key -> its OffloadRuntime


_runtimes: "weakref.WeakSet[OffloadRuntime]" = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    # finish queued work and stop the threads before the interpreter tears down
    for runtime in list(_runtimes):
        runtime.close()


def _work(tasks: queue.Queue, runtime_ref: weakref.ref) -> None:
    ops.background_thread()  # its updates run beside backward: on lohan's pool, not torch's team
    while True:
        fn, args = tasks.get()
        try:
            if fn is None:
                return
            fn(*args)
        except BaseException as e:  # handed to the step thread at its next call
            runtime = runtime_ref()
            if runtime is not None:
                runtime._error = e
        finally:
            del fn, args
            tasks.task_done()


def offloaded_among(params) -> list[torch.Tensor]:
    """Those of ``params`` whose gradients a live runtime offloads (their ``.grad`` stays None)."""
    ids = set()
    for runtime in list(_runtimes):
        opt = runtime.opt_ref()
        if opt is not None:
            ids |= opt._offloaded
    if not ids:
        return []
    if isinstance(params, torch.Tensor):
        params = [params]
    return [p for p in params if isinstance(p, torch.Tensor) and id(p) in ids]


def _guard_grad_utility(name: str, fn: Callable) -> Callable:
    """torch's gradient utilities read ``param.grad``: on offloaded parameters they would
    silently do nothing, so they raise and say what to use instead."""

    @functools.wraps(fn)
    def guarded(parameters, *args, **kwargs):
        if isinstance(parameters, (list, tuple, torch.Tensor)):
            params = parameters
        else:
            params = list(parameters)  # a generator: read it once, pass the list on
        if offloaded_among(params):
            raise LohanError(
                f"torch.nn.utils.{name} reads param.grad, but lohan offloads these parameters' gradients "
                "during backward (param.grad stays None). Give the limit to the optimizer instead: "
                "CPUAdamW(..., max_grad_norm=...) clips exactly as clip_grad_norm_ does; its "
                "last_grad_norm is the norm clip_grad_norm_ returns."
            )
        return fn(params, *args, **kwargs)

    return guarded


def _scaled_step(name: str, fn: Callable) -> Callable:
    """GradScaler unscales and checks ``param.grad``: for an optimizer whose gradients lohan
    offloads, ``unscale_`` and ``step`` go through ``runtime.amp`` (the optimizer unscales and
    checks them itself)."""
    offloaded = {"unscale_": amp.unscale_, "step": amp.step}[name]

    @functools.wraps(fn)
    def routed(self, optimizer, *args, **kwargs):
        if getattr(optimizer, "_offloaded", None):
            return offloaded(self, optimizer, *args, **kwargs)
        return fn(self, optimizer, *args, **kwargs)

    return routed


def _noted_scale(fn: Callable) -> Callable:
    """``GradScaler.scale``, telling ``runtime.amp`` that losses are scaled before any backward
    runs (updates during backward then keep roll-back copies)."""

    @functools.wraps(fn)
    def noted(self, outputs):
        amp.note_scale(self)
        return fn(self, outputs)

    return noted


def install_guards() -> None:
    """Wrap torch's gradient utilities so that on offloaded gradients ``clip_grad_norm_`` and
    ``clip_grad_value_`` raise and say what to use instead, and ``GradScaler.unscale_``/``step``
    work (``runtime.amp``). Idempotent; called when the first offload runtime is made."""
    from torch.amp.grad_scaler import GradScaler

    if not getattr(GradScaler.scale, "_lohan_guard", False):
        noted = _noted_scale(GradScaler.scale)
        noted._lohan_guard = True
        GradScaler.scale = noted
    for name in ("unscale_", "step"):
        original = getattr(GradScaler, name)
        if not getattr(original, "_lohan_guard", False):
            guarded = _scaled_step(name, original)
            guarded._lohan_guard = True
            setattr(GradScaler, name, guarded)

    import torch.nn.utils as utils
    import torch.nn.utils.clip_grad as clip_grad

    for name in ("clip_grad_norm_", "clip_grad_value_", "clip_grad_norm"):
        original = getattr(clip_grad, name, None)
        if original is None or getattr(original, "_lohan_guard", False):
            continue
        guarded = _guard_grad_utility(name, original)
        guarded._lohan_guard = True
        setattr(clip_grad, name, guarded)
        if getattr(utils, name, None) is original:
            setattr(utils, name, guarded)


def key_of(param: torch.Tensor) -> int | None:
    """The key of ``param`` if an optimizer runtime offloads its gradient, else None."""
    key = keys.existing_key(param)
    with _runtime_lock:
        ref = _runtime_of_key.get(key) if key is not None else None
    return key if ref is not None and ref() is not None else None


def runtime_offloading(param: torch.Tensor) -> "OffloadRuntime | None":
    """The live runtime that takes ``param``'s gradients, if one does."""
    key = key_of(param)
    return runtime_for(key) if key is not None else None


def runtime_for(key: int) -> "OffloadRuntime":
    with _runtime_lock:
        ref = _runtime_of_key.get(key)
    runtime = ref() if ref is not None else None
    if runtime is None:
        raise LohanError("the CPUAdamW this compiled graph offloads gradients to no longer exists")
    return runtime


_eager_taken = False  # a parameter was taken on at its first eager gradient (runtime/modules.py)


def take_eager_registrations() -> bool:
    """Whether parameters were taken on at their first eager gradient since the last call."""
    global _eager_taken
    taken, _eager_taken = _eager_taken, False
    return taken


def _eager_grad_hook(runtime_ref: "weakref.ref[OffloadRuntime]") -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        runtime = runtime_ref()
        if runtime is not None and param.grad is not None:
            runtime.eager_grad(param)

    return hook


def owner_ranks(opt: Any, world: int) -> dict[int, int]:
    """Under data parallelism over ``world`` ranks, the rank whose ``CPUAdamW`` updates each of
    ``opt``'s trainable parameters (by ``id``): largest first, each to the rank holding the
    fewest bytes so far, ties by position in ``param_groups``, so every rank (the same optimizer
    built the same way) makes the same table. Empty (every rank updates everything) when there
    are fewer parameters than ranks."""
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if len(params) < world:
        return {}
    load = [0] * world
    table = {}
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel() * params[i].element_size(), i)):
        rank = min(range(world), key=load.__getitem__)
        load[rank] += params[i].numel() * params[i].element_size()
        table[id(params[i])] = rank
    return table


def runtime_of(opt: Any) -> "OffloadRuntime":
    """The offload runtime of a CPUAdamW (made on first use)."""
    runtime = opt.__dict__.get("_lohan_offload")
    if runtime is None:
        runtime = OffloadRuntime(opt)
        opt.__dict__["_lohan_offload"] = runtime
    return runtime


@dataclass
class Event:
    """One piece of optimizer work, for timelines: when it ran, on which parameter."""

    kind: str  # "update", "stats", "rollback", "writeback"
    key: int
    start: float
    end: float


@dataclass
class _Step:
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # key -> host gradient (summed)
    counted: set[int] = field(default_factory=set)  # keys whose gradient is in sumsq
    producers: dict[int, int] = field(default_factory=dict)  # grad_ready calls in this backward
    received: set[int] = field(default_factory=set)  # keys with a gradient in this step (step thread)
    updated: set[int] = field(default_factory=set)  # keys whose update has run
    speculative: set[int] = field(default_factory=set)  # updated during backward, with a roll-back copy
    backups: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    hyper: dict[int, tuple] = field(default_factory=dict)  # hyperparameters each update used
    weight_free: set[int] = field(default_factory=set)  # keys past their last use in backward
    written: set[int] = field(default_factory=set)  # keys whose current update was written back
    # keys whose device weight this step changed (a write-back, also of an update since undone)
    weights_changed: set[int] = field(default_factory=set)
    copies: list[Any] = field(default_factory=list)
    copy_of: dict[int, Any] = field(default_factory=dict)  # key -> its writeback's copy event
    # key -> the updated weight of a resident parameter, until its write-back copies it to the
    # device (beyond host memory: a buffer of that update alone)
    weight_out: dict[int, torch.Tensor] = field(default_factory=dict)
    sumsq: float = 0.0
    nonfinite: bool = False
    # each gradient's sum of squares, computed in the host tier (worker thread) or on the device
    # as it left (step thread; then nothing reads it back for the norm); added up exactly at
    # step() (math.fsum: the step's norm does not depend on where or in what order they came)
    sumsq_of: dict[int, float] = field(default_factory=dict)
    device_sumsq_of: dict[int, float] = field(default_factory=dict)
    device_nonfinite: bool = False
    speculate: bool | None = None  # the design this step uses (decided once, at its first need)
    begun: bool = False  # a gradient arrived (set on the step thread)
    backward_done: bool = False
    interrupted: bool = False  # a backward of the step raised: it can never be taken

    @property
    def active(self) -> bool:
        return self.begun


def host_reserve_bytes(opt: Any) -> int:
    """Host-tier bytes an offload runtime needs beside the optimizer state it may put on SSD: a
    host gradient and a weight buffer per parameter, and room to stage the largest update (its
    three state tensors read from SSD while the previous one is written back and the next one
    read ahead)."""
    return sum(_reserve_blocks(opt))


def _params_of(opt: Any) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _staging_blocks(opt: Any) -> list[int]:
    """What an update stages in host memory when everything else of the step may be on SSD
    (``plan.state.staging_blocks``: ``lohan plan`` counts the same)."""
    params = _params_of(opt)
    largest = max((p.numel() for p in params), default=0)
    widest = max((p.element_size() for p in params), default=4)
    return staging_blocks(largest, widest)


def _reserve_blocks(opt: Any) -> list[int]:
    """The blocks of ``host_reserve_bytes``: every parameter's gradient and weight buffer, and
    the staging of the largest update."""
    params = _params_of(opt)
    largest = max((p.numel() for p in params), default=0)
    sizes = [4 * p.numel() for p in params] + [p.element_size() * p.numel() for p in params]
    return sizes + [4 * largest] * 9 + [64 << 10]


def smallest_host_budget(opt: Any, *, beyond_host: bool = False) -> int:
    """A ``host_memory_budget`` whose tier holds the blocks of ``host_reserve_bytes`` (or, with
    ``beyond_host``, of the staging alone: gradients and weights then live on SSD too) however
    they are placed (``plan.state.packed_budget``)."""
    return packed_budget(_staging_blocks(opt) if beyond_host else _reserve_blocks(opt))


def _spilling_allocator(tier: Any, reserve: int):
    """State tensors in the host tier while it keeps ``reserve`` bytes for what the step itself
    puts there; on SSD beyond."""

    def alloc(shape, dtype):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        # (in use counts buffers of the reserve already made: errs toward SSD)
        return tier.empty(tuple(shape), dtype, where=tier.home_for(nbytes, reserve))

    return alloc


def _too_small(budget: int, needed: int, why: str) -> HostMemoryError:
    return HostMemoryError(
        f"host_memory_budget={format_bytes(budget)} is too small for gradient offloading: {why}. The "
        f"smallest workable host budget for this optimizer's parameters is {format_bytes(needed)} "
        f"({needed} bytes; the optimizer state beyond it goes to ssd_dir): raise host_memory_budget "
        "to at least that"
    )


def default_state_allocator(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Where ``CPUAdamW`` makes its state unless told otherwise: ordinary CPU memory (an offload
    runtime moves it to the host tier)."""
    return torch.empty(shape, dtype=dtype, device="cpu")


class CtrlCDeferred:
    """Inside the block, Ctrl-C (SIGINT) is held back and raised as ``KeyboardInterrupt`` when
    the block ends: what the block does to the training state happens whole or not at all (a
    signal is handled between any two Python bytecodes, also right after a C++ update returned,
    before the step recorded it). Only in the main thread, and only where SIGINT has Python's
    default handler (a handler of the application's own is left alone)."""

    def __enter__(self) -> "CtrlCDeferred":
        self.received = False
        self.previous = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, kind, value, tb) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            if self.received and kind is None:
                raise KeyboardInterrupt


class OffloadRuntime:
    def __init__(self, opt: Any):
        install_guards()
        self.opt_ref = weakref.ref(opt)
        self.tier = hosttier.current()
        # host bytes that what stays in the tier (optimizer state, streamed weights) leaves free
        # for the step; ``beyond_host``: the step's gradients and updated weights may be on SSD
        # too, and the reserve is only what an update stages
        self.reserve = 0
        self.beyond_host = False
        if opt.state_allocator is default_state_allocator:
            # master weights and moments live in the host tier, not in device memory; with an SSD
            # folder, beyond the host budget on SSD (leaving the budget room to stage updates)
            tier = self.tier
            budget = tier.stats().budget_bytes
            if tier.ssd is not None and budget is not None:
                if budget >= host_reserve_bytes(opt):
                    # the step's gradients and updated weights stay in host memory
                    self.reserve = host_reserve_bytes(opt)
                else:
                    # beyond host memory: gradients, weights and state live on SSD where the host
                    # memory does not hold them, and the host tier keeps room to stage updates
                    needed = smallest_host_budget(opt, beyond_host=True)
                    if budget < needed:
                        raise _too_small(budget, needed, "an update stages its parameter's gradient, "
                                         "optimizer state and weight in host memory")
                    if any(p.device.type == "cuda" for p in _params_of(opt)):
                        # swap_out does not spill CUDA tensors to SSD: every gradient leaving
                        # the GPU needs host memory, which this budget does not have
                        raise HostMemoryError(
                            f"host_memory_budget={format_bytes(budget)} is below what a step's gradients "
                            f"and weight buffers need in host memory ({format_bytes(host_reserve_bytes(opt))}); "
                            "keeping them on SSD instead is not implemented for CUDA parameters yet. Raise "
                            "host_memory_budget to at least that")
                    self.beyond_host = True
                    self.reserve = needed  # (the staging blocks as the arena packs them)
                    # the graph's blocks (swapped activations, gradients on their way out) go to
                    # SSD rather than take that room
                    tier.set_spill_reserve(max(tier.spill_reserve, self.reserve))
                opt.state_tier = tier
                opt.state_allocator = _spilling_allocator(tier, self.reserve)
            else:
                opt.state_allocator = lambda shape, dtype: tier.empty(tuple(shape), dtype)
        # weakly: a runtime outliving its model (a stray reference) must not keep the weights alive
        self.params: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
        self._state_moved: set[int] = set()  # keys whose optimizer state is the runtime's own
        self._update_order: tuple[list[int], list[int]] = ([], [])  # this step's, the last step's
        self.weight_bufs: dict[int, torch.Tensor] = {}
        self.single_producer: dict[int, bool] = {}  # learned from earlier steps
        self.fw_order: list[int] = []  # keys in the order forward first reads them
        self.pending_weights: dict[int, tuple[threading.Event, _Step]] = {}  # a deferred step in flight
        self.accumulating = False
        self.eager_only: set[int] = set()  # keys whose gradients come only from code run eagerly
        # data parallel (``data_parallel``): the process group, and, where the ranks share the
        # update, the rank that updates each parameter (by ``id``: ``owner_ranks``)
        self.group_name: str | None = None
        self.shared: dict[int, int] = {}
        self._grad_hooks: dict[int, Any] = {}  # id(param) -> its eager-gradient hook's handle
        # why the training state is torn (a deferred update failed after step() returned): every
        # later use refuses until a checkpoint is loaded (opt.load_state_dict)
        self.failed: str | None = None
        self.recent_clips: collections.deque = collections.deque(maxlen=10)  # steps that clipped or skipped
        self.loss_scaled = False  # a step's gradients carried a loss scale (GradScaler): defer updates
        # overlap="auto" measures both designs: seconds between consecutive step() returns, per design
        self.step_intervals: dict[str, collections.deque] = {
            "speculative": collections.deque(maxlen=5), "deferred": collections.deque(maxlen=5)}
        self.auto_design = "speculative"  # what auto tries or chose
        self._last_step_end: float | None = None
        self._last_design: str | None = None
        self._steps = 0
        self.events: collections.deque[Event] = collections.deque(maxlen=50_000)  # the last steps' work
        self.state = _Step()
        self._lock = threading.Lock()
        self._tasks: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        # the thread holds the runtime weakly: the runtime dies with its optimizer
        self._worker = threading.Thread(
            target=_work, args=(self._tasks, weakref.ref(self)), name="lohan-optimizer", daemon=True
        )
        self._worker.start()
        _runtimes.add(self)

    @property
    def opt(self):
        opt = self.opt_ref()
        if opt is None:
            raise LohanError("the CPUAdamW of this runtime was garbage collected")
        return opt

    def note_forward_order(self, keys) -> None:
        for k in keys:
            if k not in self.fw_order:
                self.fw_order.append(k)

    def register(self, param: torch.Tensor) -> int:
        """This runtime takes ``param``'s gradients from the graph ops that name its key, and its
        optimizer no longer expects them in ``.grad`` (compile time, once the passes ran)."""
        key = keys.key_for(param)
        with _runtime_lock:
            _runtime_of_key[key] = weakref.ref(self)
        self.opt._offloaded.add(id(param))
        self.params[key] = param
        state = self.opt.state.get(param)
        if state and key not in self._state_moved:
            # State made before this runtime (a checkpoint loaded before the model was compiled,
            # steps taken eagerly) came from torch's allocator: it moves to the host tier, where
            # the runtime keeps optimizer state, with a master if the parameter was updated in
            # place so far. This runs while the backend traces with fake tensors: the copies are
            # of real memory
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily(), torch.no_grad():
                for name in ("master", "exp_avg", "exp_avg_sq"):
                    if name in state:
                        state[name] = self.opt._new_state(param.shape, state[name])
                if "master" not in state:
                    state["master"] = self.opt._new_state(param.shape, param.detach())
        self._state_moved.add(key)
        return key

    def data_parallel(self, group_name: str, *, shared: bool) -> None:
        """Data parallel over the process group ``group_name``: a gradient that comes from code
        outside the compiled graphs is averaged over the ranks here. ``shared``: each parameter
        is updated by one rank (``owner_ranks``); at ``step()`` the global gradient norm and the
        non-finite check combine every rank's part, and each updated weight goes from its owner
        to every other rank."""
        self.group_name = group_name
        if not shared or self.shared:
            return
        self.shared = owner_ranks(self.opt, torch.distributed.get_world_size(self.group()))
        for param, owner in self.shared_params():
            if owner != torch.distributed.get_rank(self.group()):
                # (a whole state loaded before the model was compiled: another rank updates it)
                self.opt.state.pop(param, None)

    def group(self):
        """The process group of data parallelism (``data_parallel``)."""
        return torch.distributed.distributed_c10d._resolve_process_group(self.group_name)

    def shared_params(self) -> list[tuple[torch.Tensor, int]]:
        """The parameters the ranks share the update of, with the rank that updates each, in
        the optimizer's order (the same on every rank)."""
        return [(p, self.shared[id(p)]) for g in self.opt.param_groups for p in g["params"] if id(p) in self.shared]

    def _global_grad_stats(self, st: "_Step") -> None:
        """This rank's sum of squares and non-finite flag, combined over the ranks (each holds
        the averaged gradients of the parameters it updates), with whether a rank cannot take
        the step's weights: then every rank raises, none waits for the others."""
        group = self.group()
        rank = torch.distributed.get_rank(group)
        params = self.shared_params()
        # (a weight streamed here would take the new value into a copy that goes again)
        cannot = any(owner != rank and stream.lookup(p) is not None for p, owner in params)
        device = params[0][0].device if params else torch.device("cpu")  # (NCCL: the devices')
        parts = torch.tensor([st.sumsq, float(st.nonfinite), float(cannot)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(parts, group=group)
        st.sumsq, st.nonfinite = float(parts[0]), bool(parts[1] > 0)
        if parts[2] > 0:
            raise LohanError("lohan: a parameter another rank updates is streamed on a rank: its weight "
                             "cannot receive the update. Pass offload_params=True (then every rank updates "
                             "every parameter) or offload_params=False.")

    def step_without_gradients(self, inv_scale: float | None = None) -> None:
        """``opt.step()`` on a rank that took no gradient this step (it updates none of the
        parameters whose gradients came): the exchanges every rank's step makes, with nothing of
        its own (a zero norm, no updated weight to send)."""
        with CtrlCDeferred():
            self.check_usable()
            st = _Step()
            self._global_grad_stats(st)
            self._broadcast_weights()
        opt = self.opt
        opt.last_grad_norm = opt.clip_coefficient(st.sumsq, inv_scale)[0]
        opt.found_inf = st.nonfinite
        TRACKER.optimizer_step_done()

    def _broadcast_weights(self) -> None:
        """Every shared parameter's weight from the rank that updated it, in the optimizer's order
        (the same on every rank)."""
        group = self.group()
        rank = torch.distributed.get_rank(group)
        for param, owner in self.shared_params():
            # (the owner's streamed weight is on the device only while it is sent)
            with torch.no_grad(), stream.fetched_for_reading([param] if owner == rank else []):
                torch.distributed.broadcast(param.data, group_src=owner, group=group)

    def watch_eager_grads(self) -> None:
        """Hook every parameter of the optimizer (those not hooked yet) so that a gradient
        autograd accumulates into ``.grad`` outside the compiled graphs comes to this runtime."""
        hook = None
        for group in self.opt.param_groups:
            for p in group["params"]:
                if id(p) in self._grad_hooks or not p.requires_grad:
                    continue
                hook = hook or _eager_grad_hook(weakref.ref(self))
                self._grad_hooks[id(p)] = p.register_post_accumulate_grad_hook(hook)

    def eager_grad(self, param: torch.Tensor) -> None:
        """``param.grad`` was accumulated by code outside the compiled graphs (a hook calls
        this during backward): its host copy joins the step's gradients, ``.grad`` is cleared."""
        owner = runtime_offloading(param)
        if owner is not None and owner is not self:
            return  # the gradient is the runtime's that took the parameter on (its own hook)
        grad = param.grad
        key = keys.existing_key(param)
        if key is None or self.params.get(key) is not param:
            key = self.register(param)
            global _eager_taken
            _eager_taken = True  # its module gets the hooks that make reads outside the step wait
            self.eager_only.add(key)
        if self.group_name is not None:
            # (data parallel: the compiled graphs average theirs; autograd runs these hooks in
            # the same order on every rank)
            grad = grad.detach().div(torch.distributed.get_world_size(self.group()))
            torch.distributed.all_reduce(grad, group=self.group())
            owner = self.shared.get(id(param))
            if owner is not None and owner != torch.distributed.get_rank(self.group()):
                param.grad = None  # another rank updates it (and counts it in the norm)
                return
        host = self.tier.empty(tuple(grad.shape), grad.dtype)
        self.tier.copy_(host, grad.detach().contiguous()).wait()
        param.grad = None
        self.grad_ready(key, host)
        if key in self.eager_only:
            # autograd accumulates a gradient once every use of the weight has had its backward:
            # the device weight may take its update
            self.weight_ready(key)
        # the backward pass may run no compiled graph (whose end ends the step's backward): when
        # it finishes with no compiled step open, this backward is the step's (once: a later
        # call finds nothing produced since)
        after_backward(self._eager_backward_done)

    def _eager_backward_done(self) -> None:
        if not TRACKER.step_open():
            self.backward_ended()

    # ---- graph ops (on the step thread) ------------------------------------------------------

    def check_usable(self) -> None:
        if self.failed is not None:
            raise LohanError(self.failed)

    def _deferred_failed(self, err: LohanError) -> LohanError:
        """A deferred update failed after ``step()`` returned: some weights and optimizer state
        hold that step, others do not, and no roll-back copy exists (deferred updates keep
        none). Nothing may train on, or save, such a state."""
        steps = {id(st): st for _, st in self.pending_weights.values()}
        for st in steps.values():  # write-backs still copying would land on weights loaded later
            for copy in st.copies:
                try:
                    copy.wait()
                except Exception:  # noqa: BLE001 - the state is refused anyway
                    pass
        self.pending_weights.clear()
        self.state = _Step()
        self.failed = (
            f"an optimizer update that ran after opt.step() returned failed ({err.__cause__ or err}); the "
            "weights and optimizer state now hold part of that step. Fix the cause, then load the last "
            "checkpoint: model.load_state_dict(...) and opt.load_state_dict(...) (training, state_dict() "
            "and saving refuse until then)"
        )
        return LohanError(self.failed)

    def took_stats(self, stats: torch.Tensor, keys: list[int]) -> bool:
        """Count ``stats`` (``lohan::grad_stats`` of the gradients of ``keys``, one or a bucket,
        computed on the device) into the step's global norm, if each gradient is final (no other
        gradient of the same parameter is added to it this step): then nothing reads them back
        for the norm."""
        st = self.state
        if st.backward_done and not self.accumulating:
            return False  # (grad_ready refuses this backward)
        if self.accumulating or not all(self.single_producer.get(k, False) and k not in st.received for k in keys):
            return False  # (a gradient added to one of an earlier micro-batch: the sum's norm is read)
        for key, (sumsq, nonfinite) in zip(keys, stats.view(-1, 2).tolist()):
            st.device_sumsq_of[key] = sumsq
            st.device_nonfinite |= nonfinite != 0
        return True

    def grad_ready(self, key: int, host_grad: torch.Tensor, *, counted: bool = False) -> None:
        """The gradient of ``key`` is in the host tier (``counted``: its norm is in the step's
        already, from the device)."""
        self.finish_pending()
        st = self.state
        if st.backward_done and not self.accumulating:
            # a new backward while the previous step was not finished by step()
            self.abort()
            raise LohanError(
                "backward ran again before opt.step(): the previous step's updates were rolled back. "
                "Run micro-batches that should not step inside `with opt.accumulate():`"
            )
        if host_grad.numel() > 0 and host_grad.data_ptr() == 0 and not self.beyond_host:
            host_grad = self._into_host_memory(host_grad)
        TRACKER.join_step(self)
        st.begun = True
        st.producers[key] = st.producers.get(key, 0) + 1
        if key in st.received:  # a second gradient: the norm is the sum's, counted in the host tier
            st.device_sumsq_of.pop(key, None)
        st.received.add(key)
        final = self.single_producer.get(key, False) and not self.accumulating
        self._submit(self._take_grad, key, host_grad, final, counted)

    def _into_host_memory(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient the copy out spilled to the SSD tier (the host memory was full of other
        blocks: swapped activations): read back, as the update reads gradients from memory."""
        budget = self.tier.stats().budget_bytes
        try:
            mem = self.tier.empty(tuple(grad.shape), grad.dtype)
        except (HostMemoryError, torch.OutOfMemoryError) as e:
            needed = smallest_host_budget(self.opt) + self.tier.stats().in_use_bytes
            raise _too_small(budget or 0, needed, "a gradient did not fit in host memory beside the "
                             f"blocks the step holds there ({e})") from e
        self.tier.copy_(mem, grad).wait()
        return mem

    def weight_ready(self, key: int) -> None:
        with self._lock:
            self.state.weight_free.add(key)
        self._submit(self._writeback, key)

    def wait_weight(self, key: int) -> None:
        """Forward is about to read this weight: wait for its update and copy, if in flight."""
        self.check_usable()
        pending = self.pending_weights.pop(key, None)
        if pending is None:
            return
        done, st = pending
        done.wait()
        if self._error is not None:
            try:
                self._join()
            except LohanError as e:
                raise self._deferred_failed(e) from e
        with self._lock:
            copy = st.copy_of.get(key)
        if copy is not None:
            copy.wait()

    def adopt_weight(self, key: int, value: torch.Tensor) -> None:
        """A weight was set from outside the step (``load_state_dict``): its fp32 master follows,
        unless the master already rounds to it (a checkpoint's optimizer state loaded first
        keeps its precision). After a failed update the optimizer's checkpoint brings the master."""
        if self.failed is not None:
            return
        self.finish_pending()
        param = self.params.get(key)
        opt = self.opt
        state = opt.state.get(param) if param is not None else None
        if not state or "master" not in state:
            return
        master = state["master"]
        value = value.detach().to("cpu")
        current = opt.read_state(master, torch.empty(master.shape, dtype=master.dtype)) if opt._on_ssd(master) else master
        if not current.to(value.dtype).equal(value):
            opt.write_state(master, value.to(torch.float32))

    def weight_before_step(self, key: int) -> torch.Tensor | None:
        """During a step in flight (between backward and ``step()``), the weight as it was before
        the step, where the step has already written an update to the device (speculative
        updates); None where the device still holds it."""
        st = self.state
        backup = st.backups.get(key) if st.active else None
        if backup is None or key not in st.weights_changed:
            return None
        opt, param = self.opt, self.params[key]
        master = backup[0]
        if opt._on_ssd(master):
            master = opt.read_state(master, torch.empty(master.shape, dtype=master.dtype))
        return master.to(device=param.device, dtype=param.dtype)

    def backward_interrupted(self) -> None:
        """A backward of the open step raised (an error, Ctrl-C): the tracker let the step go."""
        self.state.interrupted = True

    def roll_back_unfinished(self) -> bool:
        """A step whose backward raised (an exception or Ctrl-C) can never be taken: roll back
        what it ran, as ``zero_grad()`` does, so that weights read now are the ones before it
        (gradients accumulating between micro-batches are not such a step). True if there was one."""
        st = self.state
        if not st.active or not st.interrupted:
            return False
        self.abort()
        return True

    def settle(self) -> None:
        """Before weights are read outside the step, during a step in flight: the work backward
        queued (speculative updates) and the copies of updated weights to the device are done."""
        if self.state.active:
            self._join()
            for ev in list(self.state.copies):
                ev.wait()

    def finish_pending(self) -> None:
        """Complete a deferred step still running (before anything else touches the state)."""
        self.check_usable()
        if not self.pending_weights:
            return
        try:
            self._join()
        except LohanError as e:
            raise self._deferred_failed(e) from e
        for key in list(self.pending_weights):
            self.wait_weight(key)

    def backward_ended(self) -> None:
        """The step's last backward graph finished (the step tracker calls this)."""
        st = self.state
        if not st.producers:
            return
        for key, n in st.producers.items():
            self.single_producer[key] = n == 1
        st.producers = {}
        if self.accumulating:
            with self._lock:
                st.weight_free.clear()  # the next micro-batch uses the weights again
            return
        st.backward_done = True
        with self._lock:
            st.weight_free.update(st.grads)
        self._submit(self._finish_backward)

    # ---- the optimizer's side --------------------------------------------------------------

    def in_step(self) -> bool:
        return self.state.active

    def step(self, inv_scale: float | None = None) -> None:
        """Finish the step: wait, clip or skip, redo what must be redone, write weights back.
        ``inv_scale``: the inverse of the loss scale the gradients carry (``runtime.amp``; None:
        not scaled): they are unscaled in the update, the norm is theirs unscaled, and an inf or
        NaN skips the step. All or nothing for Ctrl-C: a SIGINT arriving meanwhile is raised
        when the step is done."""
        with CtrlCDeferred():
            self._step(inv_scale)

    def _step(self, inv_scale: float | None) -> None:
        self.check_usable()
        st = self.state
        if self.accumulating:
            raise LohanError("opt.step() inside `with opt.accumulate():`; step after the block")
        if not st.backward_done:
            raise LohanError("opt.step() was called before backward() finished")
        try:
            self._join()  # (a failure of the work backward queued rolls the step back too)
        except BaseException:
            self.abort()
            raise
        opt = self.opt
        # (the worker is done: both threads' counts meet here)
        st.sumsq = _exact_sum([*st.sumsq_of.values(), *st.device_sumsq_of.values()])
        st.nonfinite |= st.device_nonfinite
        if self.shared:
            self._global_grad_stats(st)
        scaled = inv_scale is not None
        norm, clip = opt.clip_coefficient(st.sumsq, inv_scale)
        # (one multiplication of each gradient unscales and clips it)
        coef = clip * inv_scale if scaled else clip
        skip = st.nonfinite and (opt.skip_nonfinite or scaled)  # (GradScaler skips on inf or NaN)
        self.loss_scaled = scaled  # (the next steps defer their updates while it holds)
        design = "speculative" if self._speculative() else "deferred"  # fixed for this step
        self.recent_clips.append(skip or clip != 1.0)
        try:
            if scaled and (skip or coef != 1.0) and st.updated - st.speculative:
                raise LohanError(
                    "updates ran during backward without a roll-back copy before the loss scale was "
                    "known; the step was rolled back where it could be. Call scaler.scale(loss) on a "
                    "torch.amp.GradScaler before backward (lohan then keeps the copies), and load the "
                    "last checkpoint"
                )
            if skip:
                self._rollback(set(st.speculative), restore_weights=True)
            else:
                redo = set(st.speculative) if coef != 1.0 else {
                    k for k in st.speculative if st.hyper.get(k) != self._hyper(k)
                }
                changed_without_copy = [
                    k for k in st.updated - st.speculative if st.hyper.get(k) != self._hyper(k)
                ]
                if changed_without_copy:
                    raise LohanError(
                        "a hyperparameter changed between backward() and step() after updates had run "
                        "without a roll-back copy; change hyperparameters before backward()"
                    )
                self._rollback(redo, keep=True)
                todo = [k for k in st.grads if k not in st.updated]
                now = [k for k in todo if k in self.eager_only]  # no module hook waits for these
                if now:
                    todo = [k for k in todo if k not in self.eager_only]
                    self._update(now, coef)
                    for k in now:  # on the device before step() returns (deferred updates may not be)
                        self._writeback(k)
                        if k in st.copy_of:
                            st.copy_of[k].wait()
                # (shared: every weight is on its owner's device before the broadcast)
                if todo and not self._speculative() and not self.shared:
                    # deferred: the updates run in the order forward reads the weights, while
                    # step() returns; the next forward waits only for the weight it needs.
                    # They use the hyperparameters of this call: a scheduler that steps right
                    # after step() returns must not change the lr of updates still queued
                    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                    order = {k: i for i, k in enumerate(self.fw_order)}
                    todo.sort(key=lambda k: order.get(k, len(order)))
                    for k in todo:
                        done = threading.Event()
                        self.pending_weights[k] = (done, st)
                        self._submit(self._update_and_write, st, k, coef, done, groups)
                else:
                    self._update(todo, coef)
                    for k in todo:
                        self._writeback(k)
            if not self.pending_weights:
                self._wait_copies()
            if self.shared:
                self._broadcast_weights()
        except BaseException:
            self.abort()
            raise
        opt.last_grad_norm = norm
        opt.found_inf = st.nonfinite
        self.state = _Step()
        if not self.shared:  # (shared: the updates finish inside step(), whatever the design)
            self._measure_design(design)
        TRACKER.optimizer_step_done()

    def abort(self) -> None:
        """Return to the state before the step: undo updates, restore device weights."""
        if self.failed is not None:
            return  # nothing to return to: a checkpoint is loaded next
        try:
            self.finish_pending()
            self._join()
        except LohanError:
            if self.failed is not None:
                return
        st = self.state
        self._wait_copies()
        # updates with a roll-back copy are undone; a deferred update only runs inside step()
        final = st.updated - set(st.backups)  # ran final, without a copy (no clipping, no skipping)
        self._rollback(set(st.backups), restore_weights=True)
        self._wait_copies()
        self.state = _Step()
        if final:
            self.failed = (
                f"a step was abandoned after {len(final)} of its updates had run final during backward "
                "(without max_grad_norm and with skip_nonfinite=False they keep no roll-back copy), so "
                "the weights and optimizer state hold part of that step. Load the last checkpoint: "
                "model.load_state_dict(...) and opt.load_state_dict(...) (training, state_dict() and "
                "saving refuse until then)"
            )

    def accumulate(self):
        runtime = self

        class _Accumulate:
            def __enter__(self_inner):
                runtime.accumulating = True
                return runtime.opt

            def __exit__(self_inner, *exc):
                runtime.accumulating = False
                if exc[0] is not None:
                    runtime.abort()

        return _Accumulate()

    # ---- the worker thread -----------------------------------------------------------------

    def _submit(self, fn: Callable, *args: Any) -> None:
        if self._error is not None:
            self._join()
        self._tasks.put((fn, args))

    def _join(self) -> None:
        self._tasks.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise LohanError(f"the optimizer thread failed: {type(err).__name__}: {err}") from err

    # ---- work on the worker thread ---------------------------------------------------------

    def _take_grad(self, key: int, host_grad: torch.Tensor, final: bool, counted: bool = False) -> None:
        st = self.state
        tier = self.tier
        if not host_grad.is_contiguous():
            # a gradient computed as a transposed view arrives with its strides; the kernel
            # reads it flat, in the parameter's order (host-tier memory, not the device's)
            host_grad = self._kept(tier.in_memory(host_grad))
        if key in st.grads:
            # (what was counted of the first gradient is not the sum's)
            st.counted.discard(key)
            st.sumsq_of.pop(key, None)
            total = tier.in_memory(st.grads[key], where="host")  # (the sum stays: not staging)
            total.add_(tier.in_memory(host_grad))
            st.grads[key] = self._kept(total) if tier.is_on_ssd(st.grads[key]) else total
        elif self.accumulating and host_grad.dtype != torch.float32:
            st.grads[key] = self._kept(tier.in_memory(host_grad), torch.float32)
        else:
            st.grads[key] = host_grad
        if final:
            if counted:
                st.counted.add(key)
            else:
                self._count([key])
            if self._speculative():
                self._speculate([key])

    def _kept(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` (in memory, any layout) as a contiguous host-tier tensor of ``dtype`` that stays:
        in host memory while the budget keeps the staging reserve, on SSD beyond (a step beyond
        host memory). Copies are made in the host tier, never in the device's allocator."""
        dtype = t.dtype if dtype is None else dtype
        nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
        if self.beyond_host and self.tier.home_for(nbytes, self.reserve) == "ssd":
            if not (t.is_contiguous() and t.dtype == dtype):
                t = self.tier.empty(tuple(t.shape), dtype, where="staging").copy_(t)
            block = self.tier.empty(tuple(t.shape), dtype, where="ssd")
            self.tier.copy_(block, t).wait()
            return block
        if not (self.tier.location(t) == "host" and t.is_contiguous() and t.dtype == dtype):
            t = self.tier.empty(tuple(t.shape), dtype).copy_(t)
        return t

    def _finish_backward(self) -> None:
        st = self.state
        late = [k for k in st.grads if k not in st.counted]
        self._count(late)
        if self._speculative():
            self._speculate([k for k in late if k not in st.updated])
        # updates that ran before their weight was free (a gradient that came outside the compiled
        # graphs, whose weight_ready never comes): every weight is free now. (Here, on the worker,
        # after every gradient of the step was taken: backward_ended may run before the last of
        # them reached st.grads)
        with self._lock:
            st.weight_free.update(st.grads)
        for k in st.updated - st.written:
            self._writeback(k)

    def _count(self, keys) -> None:
        if not keys:
            return
        from .. import adam_ops

        st = self.state
        start = time.perf_counter()
        # one at a time: each gradient's own sum (the staging reserve holds one read from SSD)
        for k in keys:
            stats = adam_ops.grad_stats([self.tier.in_memory(st.grads[k])], num_threads=self._threads())
            st.sumsq_of[k] = stats.sumsq
            st.nonfinite |= stats.nonfinite
        self.events.append(Event("stats", keys[0], start, time.perf_counter()))
        st.counted.update(keys)

    def _speculate(self, keys) -> None:
        st = self.state
        if not self._may_roll_back():
            # no clipping and no skipping: nothing at step() can change these updates, so they
            # are final as they run (no roll-back copies)
            self._update(keys, 1.0)
        else:
            for k in keys:
                self._backup(k)
            self._update(keys, 1.0)
            st.speculative.update(keys)
        for k in keys:
            self._writeback(k)

    def _may_roll_back(self) -> bool:
        opt = self.opt
        # (a loss scale, known at step(), changes every update and skips on inf or NaN)
        return opt.max_grad_norm is not None or opt.skip_nonfinite or self.loss_scaled or amp.scaling_seen()

    # ---- pieces ------------------------------------------------------------------------------

    def _speculative(self) -> bool:
        """Speculate (update during backward) or defer? Decided once per step. ``auto``:
        defer when roll-backs are common (more than 3 of the last 10 steps clipped or were
        skipped: each one redoes the step's updates after backward) or the roll-back copies
        do not fit the host budget; otherwise the design whose measured step time is lower
        (``_measure_design``)."""
        st = self.state
        if st.speculate is None:
            st.speculate = self._choose()
        return st.speculate

    def _choose(self) -> bool:
        mode = self.opt.overlap
        if mode in ("speculative", "deferred"):
            return mode == "speculative"
        if len(self.recent_clips) >= 3 and sum(self.recent_clips) > 0.3 * len(self.recent_clips):
            return False
        if self.loss_scaled or amp.scaling_seen():
            return False  # every speculative update would be redone with the loss scale
        if not self._may_roll_back():
            return True  # updates are final as they run: overlapping backward costs nothing extra
        stats = self.tier.stats()
        budget = stats.budget_bytes
        need = 12 * sum(p.numel() for p in self.params.values())
        if budget and stats.in_use_bytes + need > budget:
            return False
        return self.auto_design == "speculative"

    def _measure_design(self, design: str) -> None:
        """``auto``'s costs, measured: the time from one ``step()`` return to the next covers a
        whole step (forward, which waits for a deferred step's updates; backward, beside which
        speculative updates run; and what ``step()`` still waits for). Three such intervals of
        each design (not counting the one after a switch), then the faster; measured afresh
        every 200 steps, as the run's costs drift."""
        now = time.perf_counter()
        if self._last_step_end is not None and self._last_design == design:
            self.step_intervals[design].append(now - self._last_step_end)
        self._last_step_end, self._last_design = now, design
        self._steps += 1
        if self._steps % 200 == 0:
            for times in self.step_intervals.values():
                times.clear()
        spec, defer = self.step_intervals["speculative"], self.step_intervals["deferred"]
        if len(spec) < 3:
            self.auto_design = "speculative"
        elif len(defer) < 3:
            self.auto_design = "deferred"
        else:
            self.auto_design = "speculative" if statistics.median(spec) <= statistics.median(defer) else "deferred"

    def _threads(self) -> int:
        return self.opt._threads()

    def _hyper(self, key: int) -> tuple:
        opt = self.opt
        g = opt.param_groups[opt._group_of[self.params[key]]]
        return (g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"], g["decoupled_weight_decay"],
                g["maximize"])

    def _streamed(self, key: int):
        return stream.lookup(self.params[key])

    def _weight_out(self, key: int) -> torch.Tensor:
        """Host memory an update of ``key`` writes its new weight into."""
        s = self._streamed(key)
        if s is not None and not self.tier.is_on_ssd(s.spare):
            return s.spare  # a streamed weight's update goes beside the value fetches read
        p = self.params[key]
        if s is not None or self.beyond_host:
            # staged: on its way to the SSD block (streamed) or the device, then dropped
            return self.tier.empty(tuple(p.shape), p.dtype, where="staging")
        buf = self.weight_bufs.get(key)
        if buf is None:
            buf = self.weight_bufs[key] = self.tier.empty(tuple(p.shape), p.dtype)
        return buf

    def _weight_written(self, st: _Step, key: int, out: torch.Tensor) -> None:
        """An update wrote ``out`` (from ``_weight_out``): a streamed weight's goes to its spare
        buffer on SSD now; a resident one's waits for the write-back."""
        s = self._streamed(key)
        if s is not None:
            if out is not s.spare:
                self.tier.copy_(s.spare, out).wait()
        else:
            st.weight_out[key] = out

    def _state_value(self, t: torch.Tensor) -> torch.Tensor:
        """A state tensor in host memory: itself, or read from SSD into staging (after the
        write-back of an update not yet written)."""
        if not self.opt._on_ssd(t):
            return t
        return self.opt.read_state(t, self.tier.empty(tuple(t.shape), t.dtype, where="staging"))

    def _master_value(self, key: int) -> torch.Tensor:
        """The fp32 master of ``key`` in host memory."""
        return self._state_value(self.opt.state[self.params[key]]["master"])

    def _backup(self, key: int) -> None:
        state = self.opt._state_of(self.params[key])
        # the roll-back copies are host memory too (the host tier, never the device's allocator)
        opt = self.opt

        def keep(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 0:  # the step count
                return self.tier.empty((), t.dtype).copy_(t)
            src = self._state_value(t)
            return opt._new_state(t.shape, src)  # beside the state: on SSD when the host budget is full

        self.state.backups[key] = tuple(
            keep(t) for t in (state["master"], state["exp_avg"], state["exp_avg_sq"], state["step"]))

    def _rollback(self, keys, *, restore_weights: bool = False, keep: bool = False) -> None:
        """Undo the updates of ``keys`` from their roll-back copies (``keep``: keep the copies,
        for an update about to be redone that an interruption may still have to undo)."""
        st = self.state
        opt = self.opt
        for key in keys:
            backup = st.backups.get(key) if keep else st.backups.pop(key, None)
            if backup is None:
                raise LohanError("internal: an update to undo has no roll-back copy")
            state = opt.state[self.params[key]]
            start = time.perf_counter()
            for name, saved in zip(("master", "exp_avg", "exp_avg_sq", "step"), backup):
                opt.write_state(state[name], saved)
            self.events.append(Event("rollback", key, start, time.perf_counter()))
            st.speculative.discard(key)
            st.updated.discard(key)
            st.hyper.pop(key, None)
            if restore_weights and key in st.weights_changed:
                s = self._streamed(key)
                if s is not None:
                    s.set_value(self._master_value(key))  # the value the next fetch reads
                else:
                    st.weight_out.pop(key, None)
                    buf = self._weight_out(key)
                    buf.copy_(self._master_value(key))
                    copy = self.tier.copy_(self.params[key].detach(), buf)
                    if self.beyond_host:
                        copy.wait()  # (buf is staging: one at a time)
                    else:
                        st.copies.append(copy)
            st.written.discard(key)
            if restore_weights:
                st.weights_changed.discard(key)

    def _update_and_write(self, st: _Step, key: int, coef: float, done: threading.Event,
                          groups: list[dict[str, Any]]) -> None:
        try:
            self._update([key], coef, st, groups)
            self._writeback(key, st)
        finally:
            done.set()

    def _update(self, keys, coef: float, st: _Step | None = None,
                groups: list[dict[str, Any]] | None = None) -> None:
        if not keys:
            return
        st = self.state if st is None else st
        # hyperparameters as they were before the update: a change the main thread makes while
        # the update runs then shows as a change at step() (and the update is redone), never hidden
        hyper = {k: self._hyper(k) for k in keys}
        start = time.perf_counter()
        # beyond host memory, one parameter at a time: the staging reserve holds one update
        for batch in ([[k] for k in keys] if self.beyond_host else [keys]):
            outs = [self._weight_out(k) for k in batch]
            self.opt.update_params([self.params[k] for k in batch],
                                   [self.tier.in_memory(st.grads[k]) for k in batch], grad_scale=coef,
                                   weights_out=outs, groups=groups)
            for k, out in zip(batch, outs):
                self._weight_written(st, k, out)
                if self.beyond_host:
                    # its staged weight leaves now where backward is done with the weight
                    # (the staging reserve holds two updates' outputs, not all of them)
                    st.updated.add(k)
                    self._writeback(k, st)
        end = time.perf_counter()
        if self.opt.state_tier is not None:
            self._read_ahead(keys)
        for k in keys:
            st.hyper[k] = hyper[k]
            st.updated.add(k)
            self.events.append(Event("update", k, start, end))

    def _read_ahead(self, keys) -> None:
        """Optimizer state on SSD: start reading what the next update will need, in the order
        the updates ran last step (an update of a key already updated starts a new order)."""
        order, prev = self._update_order
        if any(k in order for k in keys):
            prev[:] = order
            order.clear()
        order.extend(keys)
        if keys[-1] in prev:
            i = prev.index(keys[-1]) + 1
            nxt = [self.params[k] for k in prev[i:i + max(1, len(keys))] if k in self.params]
            self.opt.prefetch_state(nxt)

    def _writeback(self, key: int, st: _Step | None = None) -> None:
        """Copy an updated weight to the device once its update and its last use are both done."""
        st = self.state if st is None else st
        with self._lock:
            if key in st.written or key not in st.weight_free or key not in st.updated:
                return
            st.written.add(key)
            st.weights_changed.add(key)
            s = self._streamed(key)
            if s is not None:
                # streamed: the device holds no copy at rest; the next fetch reads the new value
                # (backward no longer reads this weight, and the update that wrote it is done)
                s.swap_buffers()
                return
            out = st.weight_out.pop(key, None)
            copy = self.tier.copy_(self.params[key].detach(), self.weight_bufs[key] if out is None else out)
            if not self.beyond_host:
                st.copies.append(copy)
                st.copy_of[key] = copy
                return
        # beyond host memory its buffer is staging, which holds two updates' outputs: freed once
        # copied (waited outside the lock, which backward's weight_ready takes)
        copy.wait()

    def _wait_copies(self) -> None:
        for ev in self.state.copies:
            ev.wait()
        self.state.copies.clear()

    def close(self) -> None:
        """Stop the worker thread (after the work already queued)."""
        if self._worker.is_alive():
            self._tasks.put((None, ()))
            self._worker.join()
        self._wait_copies()

    def __del__(self) -> None:
        if getattr(self, "_worker", None) is not None and self._worker.is_alive():
            self._tasks.put((None, ()))
