"""``CPUAdamW``: fused mixed-precision AdamW on the CPU, as a ``torch.optim.Optimizer``.

Standalone, it is a drop-in for ``torch.optim.AdamW`` on CPU tensors::

    opt = lohan.CPUAdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                         max_grad_norm=1.0)
    loss.backward(); opt.step(); opt.zero_grad()

The math is torch.optim.AdamW's single-tensor path, op for op but for one
division (see ``csrc/adam_body.h``; results agree with torch to about 1e-7 of
each tensor's largest value after 100 steps); with ``max_grad_norm`` a step equals
``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` followed by AdamW,
with the clipping coefficient fused into the update instead of rewriting the
gradients (``p.grad`` is left as it was).

bf16/fp16 parameters keep an fp32 master copy in ``state["master"]``; every
update runs on the master and writes the parameter, rounded to nearest even,
in the same pass. State tensors always live on the CPU, in fp32; a
``state_allocator`` lets them come from the host tier.

Gradient offloading calls :meth:`CPUAdamW.update_params` per parameter or per
bucket while backward runs, with gradients in host buffers of any of fp32,
bf16 or fp16; the C++ call releases the GIL and runs on the optimizer's own
threads (``num_threads``, default ``torch.get_num_threads()``).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.optim import Optimizer

from .errors import HostMemoryError
from .options import OffloadOptimizer
from .runtime.offload import default_state_allocator, runtime_of

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ISAS = ("auto", "scalar", "avx2", "avx512", "avx512_bf16")

StateAllocator = Callable[[torch.Size, torch.dtype], torch.Tensor]


def _ops():
    # Imported on first use: importing lohan_compile must not build C++.
    from . import adam_ops

    return adam_ops


_live: "weakref.WeakSet[CPUAdamW]" = weakref.WeakSet()


def live_optimizers() -> list["CPUAdamW"]:
    """CPUAdamW instances alive now (the backend looks for one owning a graph's parameters)."""
    return list(_live)


def _describe(p: torch.Tensor) -> str:
    return f"shape {tuple(p.shape)}, {p.dtype}, on {p.device}"


_STATE_NAMES = ("step", "exp_avg", "exp_avg_sq", "master")  # what a parameter's state holds


class CPUAdamW(Optimizer, OffloadOptimizer):
    """AdamW (or Adam with an L2 penalty) over fp32 masters, fused in one pass per element.

    Args:
        params: parameters or param-group dicts, as for any ``torch.optim.Optimizer``.
            float32, bfloat16 or float16, dense and contiguous.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (per group).
        max_grad_norm: clip the global gradient norm (over all groups) to this
            value before the update, exactly as ``clip_grad_norm_`` would; None
            to not clip.
        decoupled_weight_decay: True for AdamW (``p -= lr*wd*p``), False for
            Adam's L2 penalty (``g += wd*p``) (per group).
        maximize: ascend instead of descend (per group).
        num_threads: threads per update; None follows ``torch.get_num_threads()``.
        isa: ``"auto"`` or a forced SIMD path (``"scalar"``, ``"avx2"``,
            ``"avx512"``, ``"avx512_bf16"``), mostly for tests.
        state_allocator: ``f(shape, dtype) -> CPU tensor`` (uninitialised is fine)
            for the fp32 master and moments; default ``torch.empty``.
        overlap: with gradient offloading (``torch.compile(..., backend="lohan",
            options={"optimizer": opt})``), how updates overlap backward:
            ``"speculative"``, ``"deferred"`` or ``"auto"`` (see
            ``lohan_compile/runtime/offload.py``).
        skip_nonfinite: with gradient offloading, skip the whole step when a
            gradient is inf or NaN (as ``GradScaler`` does); standalone
            ``step()`` follows ``torch.optim.AdamW`` and updates anyway.

    After a ``step()``, ``last_grad_norm`` is the global norm of the gradients
    before clipping (what ``clip_grad_norm_`` returns) and ``found_inf`` tells
    whether any gradient element was inf or NaN (the update still ran, as in
    torch).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        max_grad_norm: float | None = None,
        *,
        decoupled_weight_decay: bool = True,
        maximize: bool = False,
        num_threads: int | None = None,
        isa: str = "auto",
        state_allocator: StateAllocator | None = None,
        overlap: str = "auto",
        skip_nonfinite: bool = True,
    ):
        lr = float(lr)
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid epsilon value: {eps}")
        if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}: need two values in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay value: {weight_decay}")
        if max_grad_norm is not None and not float(max_grad_norm) > 0.0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if num_threads is not None and int(num_threads) < 1:
            raise ValueError(f"num_threads must be at least 1 or None, got {num_threads}")
        if isa not in _ISAS:
            raise ValueError(f"isa={isa!r}: choose one of {', '.join(_ISAS)}")
        if overlap not in ("auto", "speculative", "deferred"):
            raise ValueError(f"overlap={overlap!r}: choose one of 'auto', 'speculative', 'deferred'")
        self.overlap = overlap
        self.skip_nonfinite = bool(skip_nonfinite)
        self._offloaded: set[int] = set()  # ids of parameters whose gradients a compiled graph offloads
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.num_threads = None if num_threads is None else int(num_threads)
        self.isa = isa
        self.state_allocator = state_allocator or default_state_allocator
        # state beyond the host budget lives on SSD, as a HostTier's blocks (set by the offload
        # runtime when its tier has an SSD folder); see _stage() for how updates reach it
        self.state_tier = None
        self._io_lock = threading.RLock()
        self._unwritten: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # updated, not yet written back
        self._writing: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] = {}  # written back, not yet done
        self._prefetched: dict[int, tuple[torch.Tensor, Any]] = {}  # read ahead of its update
        self.state_reads_ahead = 0  # SSD state reads that were started before their update
        self.last_grad_norm: float | None = None
        self.found_inf = False
        self._group_of: dict[torch.Tensor, int] = {}
        defaults = dict(
            lr=lr,
            betas=(float(betas[0]), float(betas[1])),
            eps=float(eps),
            weight_decay=float(weight_decay),
            decoupled_weight_decay=bool(decoupled_weight_decay),
            maximize=bool(maximize),
        )
        super().__init__(params, defaults)
        _live.add(self)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # a set is refused by the base class: unordered
            params = list(params)  # a generator must be read once, here
            for i, p in enumerate(params):
                self._check_param(p, f"parameter {i} of the new param group")
        param_group = {**param_group, "params": params}
        super().add_param_group(param_group)
        self._index_groups()

    def _index_groups(self) -> None:
        self._group_of = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", True)
            group.setdefault("maximize", False)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("num_threads", None)
        self.__dict__.setdefault("isa", "auto")
        self.__dict__.setdefault("state_allocator", default_state_allocator)
        self.__dict__.setdefault("last_grad_norm", None)
        self.__dict__.setdefault("found_inf", False)
        self.__dict__.setdefault("overlap", "auto")
        self.__dict__.setdefault("skip_nonfinite", True)
        self.__dict__.setdefault("_offloaded", set())
        self._index_groups()

    @staticmethod
    def _check_param(p: Any, where: str) -> None:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"CPUAdamW: {where} is a {type(p).__name__}, not a tensor")
        if p.layout != torch.strided:
            raise ValueError(f"CPUAdamW: {where} is a {p.layout} tensor; only dense parameters are supported")
        if p.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"CPUAdamW: {where} has dtype {p.dtype}; supported are float32, bfloat16 and float16"
            )
        if not p.is_contiguous():
            raise ValueError(
                f"CPUAdamW: {where} ({_describe(p)}) is not contiguous; the fused kernel updates "
                "parameters in place as flat arrays (make the parameter contiguous first)"
            )

    # ------------------------------------------------------------------- state

    def _needs_master(self, p: torch.Tensor) -> bool:
        # an offloaded parameter is the device's copy: its master lives on the host
        return p.dtype != torch.float32 or p.device.type != "cpu" or id(p) in self._offloaded

    def _alloc(self, shape: torch.Size) -> torch.Tensor:
        t = self.state_allocator(shape, torch.float32)
        if t.device.type != "cpu" or t.dtype != torch.float32 or tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"CPUAdamW: state_allocator returned {_describe(t)}; expected a CPU float32 "
                f"tensor of shape {tuple(shape)}"
            )
        if not t.is_contiguous():
            raise ValueError("CPUAdamW: state_allocator returned a non-contiguous tensor")
        return t

    def owns(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is in one of this optimizer's parameter groups."""
        return param in self._group_of

    def _state_of(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            # made whole before it is kept: a failure (a full disk) leaves no half state behind
            new = {"step": torch.tensor(0.0, dtype=torch.float32), "exp_avg": self._new_state(p.shape),
                   "exp_avg_sq": self._new_state(p.shape)}
            if self._needs_master(p):
                new["master"] = self._new_state(p.shape, p.detach())
            state.update(new)
        return state

    # ---------------------------------------------------------- state on SSD
    #
    # An SSD-resident state tensor is a block of the state tier (no host memory behind it). An
    # update stages it: the block is read into a host buffer, updated there, and written back
    # after the *next* update's reads were issued (the I/O threads then read ahead of the
    # writes); a block read again before its write-back was issued is taken from that buffer.

    def _on_ssd(self, t: Any) -> bool:
        tier = self.state_tier
        return (tier is not None and isinstance(t, torch.Tensor) and t.numel() > 0 and t.data_ptr() == 0
                and tier.location(t) == "ssd")

    def _new_state(self, shape: torch.Size, init: torch.Tensor | None = None) -> torch.Tensor:
        """A new fp32 state tensor holding ``init`` (zeros when None), in host memory or on SSD."""
        t = self._alloc(shape)
        if not self._on_ssd(t):
            return t.zero_() if init is None else t.copy_(init)
        src = self.state_tier.empty(tuple(shape), torch.float32, where="staging")
        src.zero_() if init is None else src.copy_(init)
        self.state_tier.copy_(t, src).wait()
        return t

    def read_state(self, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Copy a state tensor (in host memory or on SSD) into ``out``."""
        if not self._on_ssd(t):
            return out.copy_(t)
        with self._io_lock:
            self._finish_writes()
            self.state_tier.copy_(out, t).wait()
        return out

    def write_state(self, t: torch.Tensor, src: torch.Tensor) -> None:
        """Overwrite a state tensor (in host memory or on SSD) with ``src`` (either too)."""
        if self._on_ssd(src):
            src = self.read_state(src, self.state_tier.empty(tuple(src.shape), src.dtype, where="staging"))
        if not self._on_ssd(t):
            t.copy_(src)
            return
        with self._io_lock:
            self._finish_writes()
            self._drop_prefetch(t)
            self.state_tier.copy_(t, src.contiguous()).wait()

    def prefetch_state(self, params: Sequence[torch.Tensor]) -> None:
        """Start reading the SSD-resident state of ``params`` ahead of their updates (best effort:
        skipped when the host budget has no room for it now)."""
        if self.state_tier is None:
            return
        with self._io_lock:
            for p in params:
                for t in (self.state.get(p) or {}).values():
                    key = id(t)
                    if (not self._on_ssd(t) or key in self._unwritten or key in self._writing
                            or key in self._prefetched):
                        continue
                    try:
                        h = self.state_tier.empty(tuple(t.shape), t.dtype, where="staging")
                    except HostMemoryError:
                        return
                    self._prefetched[key] = (h, self.state_tier.copy_(h, t))

    def _drop_prefetch(self, t: torch.Tensor) -> None:
        entry = self._prefetched.pop(id(t), None)
        if entry is not None:
            entry[1].wait()  # a read in flight into a buffer about to be dropped

    def _stage(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Host tensors to run an update on, for ``tensors`` (state, some on SSD); and the
        (block, host buffer) pairs to write back after it."""
        tier = self.state_tier
        out, staged, reads = [], [], []
        with self._io_lock:
            for t in tensors:
                if not self._on_ssd(t):
                    out.append(t)
                    continue
                key = id(t)
                if key in self._unwritten:  # updated earlier, write-back not issued: still in the buffer
                    _, h = self._unwritten.pop(key)
                elif key in self._writing:  # its write-back is in flight: that buffer holds it too
                    _, h, ev = self._writing.pop(key)
                    ev.wait()
                elif key in self._prefetched:  # read ahead
                    h, ev = self._prefetched.pop(key)
                    reads.append(ev)
                    self.state_reads_ahead += 1
                else:
                    h = tier.empty(tuple(t.shape), t.dtype, where="staging")
                    reads.append(tier.copy_(h, t))
                out.append(h)
                staged.append((t, h))
            # now the previous update's write-backs, behind this update's reads
            for key, (t, h) in self._unwritten.items():
                self._writing[key] = (t, h, tier.copy_(t, h))
            self._unwritten.clear()
        for ev in reads:
            ev.wait()
        return out, staged

    def _staged_done(self, staged: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with self._io_lock:
            for key in list(self._writing):  # the previous write-backs: done by now, mostly
                t, h, ev = self._writing.pop(key)
                ev.wait()
            for t, h in staged:
                self._unwritten[id(t)] = (t, h)

    def _finish_writes(self) -> None:
        """Every updated SSD block written back (before reading state any other way)."""
        with self._io_lock:
            tier = self.state_tier
            for key, (t, h) in self._unwritten.items():
                self._writing[key] = (t, h, tier.copy_(t, h))
            self._unwritten.clear()
            for key in list(self._writing):
                self._writing.pop(key)[2].wait()

    # ------------------------------------------------------------------ update

    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step over every parameter that has a gradient (after optional clipping)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        runtime = self.__dict__.get("_lohan_offload")
        # the inverse of the loss scale the gradients carry: set by GradScaler.step (runtime.amp)
        inv_scale = self.__dict__.get("_inv_loss_scale")
        if runtime is not None and runtime.in_step():
            runtime.step(inv_scale)  # the gradients were offloaded during backward
            return loss
        if runtime is not None and runtime.shared:
            # data parallel: this rank updates none of the parameters whose gradients came, yet
            # it takes part in the step's exchanges, as every rank must
            runtime.step_without_gradients(inv_scale)
            return loss
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"parameter {pi} of param group {gi}"
                if p.device.type != "cpu":
                    raise RuntimeError(
                        f"CPUAdamW.step(): {where} is on {p.device}; step() updates CPU "
                        "parameters. With parameters on an accelerator, hand host gradients and "
                        "host weight buffers to update_params()."
                    )
                params.append(p)
                grads.append(self._checked_grad(p, p.grad, where))
        self.found_inf = False
        if not params:
            self.last_grad_norm = 0.0 if self.max_grad_norm is not None else None
            return loss
        grad_scale = 1.0
        if inv_scale is not None:
            # loss-scaled: unscaled in the update, skipped on an inf or NaN (as GradScaler does)
            stats = _ops().grad_stats(grads, isa=self.isa, num_threads=self._threads())
            self.last_grad_norm, clip = self.clip_coefficient(stats.sumsq, inv_scale)
            self.found_inf = stats.nonfinite
            if not stats.nonfinite:
                self._update(params, grads, [None] * len(params), clip * inv_scale)
        elif self.max_grad_norm is not None:
            stats = _ops().grad_stats(grads, isa=self.isa, num_threads=self._threads())
            self.last_grad_norm, grad_scale = self.clip_coefficient(stats.sumsq)
            stats = self._update(params, grads, [None] * len(params), grad_scale)
            self.found_inf = stats.nonfinite
        else:
            stats = self._update(params, grads, [None] * len(params), grad_scale)
            self.last_grad_norm = stats.norm
            self.found_inf = stats.nonfinite
        return loss

    def accumulate(self):
        """Context manager for micro-batches that do not step: with gradient offloading their
        gradients add up on the host (``param.grad`` stays None), as DDP's ``no_sync()``::

            for micro in batches[:-1]:
                with opt.accumulate():
                    loss(micro).backward()
            loss(batches[-1]).backward()
            opt.step()
        """
        return runtime_of(self).accumulate()

    def synchronize(self) -> None:
        """Wait until every parameter holds its updated weight.

        With ``overlap="deferred"`` (and gradient offloading), ``step()`` returns while the
        updates still run, in the order the next forward reads the weights; the compiled
        forward waits for each weight itself. Code that reads parameters outside a compiled
        forward (saving a checkpoint, eager evaluation) calls this first;
        ``state_dict()`` of this optimizer does it itself.
        """
        runtime = self.__dict__.get("_lohan_offload")
        if runtime is not None:
            runtime.finish_pending()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # a step that an exception interrupted is rolled back to where it began
        runtime = self.__dict__.get("_lohan_offload")
        if runtime is not None and runtime.in_step():
            # gradients of a step that step() did not finish (an exception interrupted it, or it
            # is discarded) are dropped, as zero_grad() drops them in eager: roll back what ran
            runtime.abort()
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        runtime = self.__dict__.get("_lohan_offload")
        if runtime is not None:
            runtime.finish_pending()  # a deferred step's updates still running
            if runtime.in_step():
                runtime.abort()  # the state of a step in flight is not a state to save
        sd = super().state_dict()
        if self.state_tier is not None:
            sd["state"] = {k: dict(v) for k, v in sd["state"].items()}  # not the optimizer's own dicts
            # state on SSD is read back into ordinary tensors: what is saved holds the values
            self._finish_writes()
            for st in sd["state"].values():
                for name, t in list(st.items()):
                    if self._on_ssd(t):
                        st[name] = self.read_state(t, torch.empty(t.shape, dtype=t.dtype))
        if runtime is not None and runtime.shared:
            # data parallel, the update shared: this rank's part only (``full_state_dict()``
            # gathers the whole one)
            group = runtime.group()
            sd["lohan_shard"] = {"rank": torch.distributed.get_rank(group),
                                 "world": torch.distributed.get_world_size(group)}
        return sd

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, Any]:
        """The optimizer state of every parameter, as one process training alone would save it.

        Under data parallelism the ranks share the update: each rank's ``state_dict()`` holds the
        state of the parameters it updates (``"lohan_shard"`` says which rank of how many). This
        gathers the whole state from the ranks that hold it; every rank must call it (it is a
        collective), and every rank receives the whole state. What it returns loads into a
        ``CPUAdamW`` of one process, or of any number of processes (each then keeps the part it
        updates). Without data parallelism it is ``state_dict()``."""
        sd = self.state_dict()
        runtime = self.__dict__.get("_lohan_offload")
        if runtime is None or not runtime.shared:
            return sd
        group = runtime.group()
        rank = torch.distributed.get_rank(group)
        index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        state = dict(sd["state"])
        for param, owner in runtime.shared_params():
            i = index[id(param)]
            mine = state.get(i) if owner == rank else None
            # which of the state's tensors the owner holds (none: never updated)
            has = torch.tensor([mine is not None and name in mine for name in _STATE_NAMES], dtype=torch.int64,
                               device=param.device)
            torch.distributed.broadcast(has, group_src=owner, group=group)
            if not has.any():
                continue
            got = {}
            for name, held in zip(_STATE_NAMES, has.tolist()):
                if not held:
                    continue
                # (sent from and to the parameter's device: an NCCL group has no CPU tensors)
                if mine is not None:
                    t = mine[name].detach().to(param.device, torch.float32).contiguous()
                else:
                    t = torch.empty(() if name == "step" else param.shape, dtype=torch.float32, device=param.device)
                torch.distributed.broadcast(t, group_src=owner, group=group)
                got[name] = t.cpu() if mine is None else mine[name]
            state[i] = got
        sd = {**sd, "state": dict(sorted(state.items()))}
        sd.pop("lohan_shard", None)
        return sd

    def clip_coefficient(self, sumsq: float, inv_scale: float | None = None) -> tuple[float, float]:
        """``(total_norm, coefficient)`` that ``clip_grad_norm_(max_norm=max_grad_norm)``
        computes from the gradients' global squared norm (``inv_scale``: of gradients that carry
        a loss scale, unscaled first, as after ``GradScaler.unscale_``).

        The coefficient is computed on fp32 scalars with torch's own expression
        (``max_norm / (total_norm + 1e-6)``, clamped to 1), so it rounds as
        torch's does. Without ``max_grad_norm`` the coefficient is 1.
        """
        if inv_scale is not None:
            sumsq = sumsq * inv_scale * inv_scale
        total = torch.tensor(math.sqrt(sumsq), dtype=torch.float32)
        if self.max_grad_norm is None:
            return float(total), 1.0
        clip_coef = self.max_grad_norm / (total + 1e-6)
        return float(total), float(torch.clamp(clip_coef, max=1.0))

    @torch._disable_dynamo
    @torch.no_grad()
    def update_params(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None] | None = None,
        *,
        grad_scale: float = 1.0,
        weights_out: Sequence[torch.Tensor | None] | None = None,
        groups: Sequence[dict[str, Any]] | None = None,
    ):
        """Update some parameters now: the entry point of gradient offloading.

        Args:
            params: parameters of this optimizer (any groups, any order, each once).
            grads: one CPU gradient per parameter (fp32, bf16 or fp16, the
                parameter's shape, contiguous), or None to use ``p.grad``.
            grad_scale: multiplies every gradient before the update, e.g.
                ``1/loss_scale * clip coefficient`` (see :meth:`clip_coefficient`).
            weights_out: where to write each updated weight (a CPU tensor of the
                parameter's shape, fp32/bf16/fp16), or None: then a CPU
                bf16/fp16 parameter is written in place, an fp32 CPU parameter
                is its own master, and a parameter on another device needs a
                host buffer here.

        Each parameter's step count advances by one. Safe to call from a thread
        other than the one running the model (the C++ part releases the GIL),
        as long as no two calls update the same parameter at once. Returns
        :class:`~lohan_compile.adam_ops.GradStats` of the scaled gradients.
        """
        params = list(params)
        n = len(params)
        grads_in = [None] * n if grads is None else list(grads)
        outs_in = [None] * n if weights_out is None else list(weights_out)
        if len(grads_in) != n or len(outs_in) != n:
            raise ValueError(
                f"CPUAdamW.update_params: got {n} params, {len(grads_in)} grads and "
                f"{len(outs_in)} weights_out"
            )
        if len({id(p) for p in params}) != n:
            raise ValueError("CPUAdamW.update_params: a parameter is listed twice")
        checked = []
        for i, (p, g) in enumerate(zip(params, grads_in)):
            where = f"update_params: parameter {i}"
            if p not in self._group_of:
                raise ValueError(f"CPUAdamW.{where} ({_describe(p)}) is not in this optimizer")
            g = p.grad if g is None else g
            if g is None:
                raise ValueError(f"CPUAdamW.{where} has no gradient (none passed, p.grad is None)")
            checked.append(self._checked_grad(p, g, where, host_grad=p.device.type != "cpu"))
        return self._update(params, checked, outs_in, grad_scale, groups)

    def _checked_grad(self, p: torch.Tensor, g: torch.Tensor, where: str,
                      host_grad: bool = False) -> torch.Tensor:
        # The common case in one expression (this runs for every parameter of every step).
        if (g.layout == torch.strided and g.dtype in _FLOAT_DTYPES and g.shape == p.shape
                and g.device.type == "cpu" and (host_grad or g.device == p.device)
                and g.is_contiguous() and p.is_contiguous() and p.layout == torch.strided
                and p.dtype in _FLOAT_DTYPES):
            return g
        if g.layout != torch.strided:
            raise RuntimeError(f"CPUAdamW does not support sparse gradients ({where} has a {g.layout} gradient)")
        if g.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"CPUAdamW: the gradient of {where} is {g.dtype}; supported are float32, bfloat16 and float16")
        if g.shape != p.shape:
            raise ValueError(
                f"CPUAdamW: the gradient of {where} has shape {tuple(g.shape)}, the parameter "
                f"{tuple(p.shape)}"
            )
        if g.device.type != "cpu":
            raise ValueError(
                f"CPUAdamW: the gradient of {where} is on {g.device}; gradients must be CPU "
                f"tensors (parameter: {_describe(p)})"
            )
        if not host_grad and g.device != p.device:
            raise ValueError(f"CPUAdamW: the gradient of {where} is on {g.device}, the parameter on {p.device}")
        self._check_param(p, where)
        # A strided gradient (e.g. from an expand) is legal in torch: copy it flat.
        return g if g.is_contiguous() else g.contiguous()

    def _threads(self) -> int:
        return self.num_threads or torch.get_num_threads()

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                outs: list[torch.Tensor | None], grad_scale: float,
                groups: Sequence[dict[str, Any]] | None = None):
        ops = _ops()
        # One kernel call per (group, writes-a-weight-copy): the kernel takes
        # one set of hyperparameters and an all-or-none weight_out list.
        buckets: dict[tuple[int, bool], list[int]] = defaultdict(list)
        resolved_outs: list[torch.Tensor | None] = []
        for i, p in enumerate(params):
            out = outs[i]
            if out is None and (p.dtype != torch.float32 or p.device.type != "cpu"):
                if p.device.type != "cpu":
                    raise ValueError(
                        f"CPUAdamW.update_params: parameter {i} is on {p.device}; pass a host "
                        "buffer for its updated weight in weights_out"
                    )
                out = p
            if out is not None:
                if out.device.type != "cpu" or out.shape != p.shape or out.dtype not in _FLOAT_DTYPES \
                        or not out.is_contiguous():
                    raise ValueError(
                        f"CPUAdamW.update_params: weights_out[{i}] is {_describe(out)}; expected a "
                        f"contiguous CPU float tensor of shape {tuple(p.shape)}"
                    )
            resolved_outs.append(out)
            buckets[(self._group_of[p], out is not None)].append(i)
        if groups is None:
            groups = self.param_groups
        elif len(groups) != len(self.param_groups):
            raise ValueError(
                f"CPUAdamW.update_params: got hyperparameters for {len(groups)} param groups, "
                f"the optimizer has {len(self.param_groups)}"
            )
        for gi, _ in buckets:
            if groups[gi].get("amsgrad", False):
                raise ValueError("CPUAdamW does not implement amsgrad")
        total = ops.NO_GRADS
        if self.state_tier is not None:
            # with state on SSD, an update stages at most one parameter-sized batch at a time
            # (the host budget keeps room for two: this one and the previous one's write-back)
            limit = max((p.numel() for g in self.param_groups for p in g["params"]), default=0)
            split: dict[tuple[int, bool, int], list[int]] = {}
            for (gi, has_out), idx in buckets.items():
                n, part = 0, 0
                for i in idx:
                    if n and n + params[i].numel() > limit:
                        n, part = 0, part + 1
                    n += params[i].numel()
                    split.setdefault((gi, has_out, part), []).append(i)
            batches = [((gi, has_out), idx) for (gi, has_out, _), idx in split.items()]
        else:
            batches = list(buckets.items())
        for (gi, has_out), idx in batches:
            group = groups[gi]
            beta1, beta2 = group["betas"]
            masters, exp_avgs, exp_avg_sqs, step_ts = [], [], [], []
            for i in idx:
                st = self._state_of(params[i])
                masters.append(st.get("master", params[i]))
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                step_ts.append(st["step"])
            staged: list = []
            if self.state_tier is not None:
                k = len(idx)
                host, staged = self._stage(masters + exp_avgs + exp_avg_sqs)
                masters, exp_avgs, exp_avg_sqs = host[:k], host[k:2 * k], host[2 * k:]
            # the kernel takes each tensor's step count after this update
            steps = (torch.stack(step_ts) + 1).tolist()
            stats = ops.adam_update(
                masters, exp_avgs, exp_avg_sqs, [grads[i] for i in idx],
                [resolved_outs[i] for i in idx] if has_out else [], steps,
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                eps=group["eps"], weight_decay=group["weight_decay"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                grad_scale=-grad_scale if group["maximize"] else grad_scale,
                isa=self.isa, num_threads=self._threads(),
            )
            if self.state_tier is not None:
                self._staged_done(staged)
            # Counted only once the kernel ran: a rejected call leaves no trace.
            torch._foreach_add_(step_ts, 1.0)
            # The kernel writes through raw pointers: bump the version counters
            # of what it wrote, as torch's in-place optimizer ops do. A parameter
            # whose new weight went to weights_out was not written.
            written = masters + exp_avgs + exp_avg_sqs
            if has_out:
                written += [resolved_outs[i] for i in idx]
            torch.autograd.graph.increment_version(written)
            total = total + stats
        return total

    # ------------------------------------------------------------ checkpoints

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``state_dict()`` (or from ``torch.optim.AdamW``).

        Unlike the base class, which casts floating state to each parameter's
        dtype, the fp32 master and moments stay fp32 (bit-exact resume of bf16
        training); tensors are copied, never shared with ``state_dict``. A
        bf16/fp16 parameter whose saved state has no master (a torch AdamW
        checkpoint) starts its master from the parameter.
        """
        runtime = self.__dict__.get("_lohan_offload")
        if runtime is not None:
            if runtime.failed is not None:
                runtime.failed = None  # the state loaded here replaces the torn one
            runtime.finish_pending()
            if runtime.in_step():
                runtime.abort()
        state_dict = state_dict.copy()
        shard = state_dict.pop("lohan_shard", None)
        if shard is not None:
            here = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                    if torch.distributed.is_available() and torch.distributed.is_initialized() else (0, 1))
            if here != (shard["rank"], shard["world"]):
                raise ValueError(
                    f"this optimizer state is rank {shard['rank']}'s part of {shard['world']} (data parallel, "
                    f"the update shared), and this process is rank {here[0]} of {here[1]}: the other "
                    "parameters' state is not in it. Save opt.full_state_dict() instead (it loads anywhere), "
                    "or load each rank's own part on the same number of ranks.")
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, s in zip(groups, saved_groups):
            if len(g["params"]) != len(s["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    "of optimizer's group"
                )
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k not in id_map:
                state[k] = v
                continue
            p = id_map[k]
            state[p] = self._loaded_state(p, v)
        new_groups = []
        for g, s in zip(groups, saved_groups):
            s["params"] = g["params"]
            if "param_names" in g and "param_names" not in s:
                s["param_names"] = g["param_names"]
            new_groups.append(s)
        self.__setstate__({"state": state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded_state(self, p: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in saved.items():
            if key == "step":
                out["step"] = torch.as_tensor(value, dtype=torch.float32).detach().clone().cpu()
            elif key in ("exp_avg", "exp_avg_sq", "master"):
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"loaded state {key!r} has shape {tuple(value.shape)}, the parameter "
                        f"{tuple(p.shape)}"
                    )
                if key == "master" and not self._needs_master(p):
                    continue  # an fp32 CPU parameter is its own master
                out[key] = self._new_state(p.shape, value.detach())
            else:
                out[key] = deepcopy(value)
        if "exp_avg" in out and self._needs_master(p) and "master" not in out:
            out["master"] = self._new_state(p.shape, p.detach())
        return out
