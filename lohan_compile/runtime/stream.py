"""Parameter streaming: the runtime behind the graph ops of ``stream_params``.

A streamed parameter keeps its shape, strides and identity (compiled graphs and
dynamo's guards see the same tensor) but not its device memory: between uses
its storage is resized to zero bytes, and its value lives in a host-tier
buffer. The graph ops bring it back where the plan says:

- ``lohan::fetch_param(key)`` gives the storage its bytes back (device memory,
  allocated on the step thread) and starts copying the host value in (copy
  engine). A deferred optimizer update of the parameter still running is
  waited for first: it writes the host value the copy reads.
- ``lohan::param_wait(t, key)`` waits for that copy before the first use of
  ``t`` (the parameter, or a view of it that forward saved for backward: views
  share the storage, so they see the bytes again) and returns ``t``.
- ``lohan::release_param(key)`` resizes the storage to zero after the last use.

A parameter the optimizer updates has two host buffers: ``host`` (the value
fetches read) and ``spare`` (where an update writes the new weight). Once the
update is done and backward no longer reads the weight, the two trade places
(``OffloadRuntime._writeback``), so a fetch never reads a half-written weight
and an update never waits for backward. Frozen parameters have one buffer.

Outside the compiled model a streamed parameter has no data: ``materialized``
brings all of a module's back for a block of code (evaluation without
compiling, ``save_pretrained``), ``state_dict`` returns a full state dict.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .. import ops
from ..errors import LohanError
from . import device, hosttier, keys

def _fetch_impl(key: int) -> None:
    if key >= 0:  # (-1: planned by explain() on meta, never run)
        entry(key).fetch()


def _wait_impl(t: torch.Tensor, key: int) -> torch.Tensor:
    if key >= 0:
        entry(key).wait()
    return torch.ops.aten.alias.default(t)


def _release_impl(key: int) -> None:
    if key >= 0:
        entry(key).release()


ops.implement("fetch_param", _fetch_impl)
ops.implement("param_wait", _wait_impl)
ops.implement("release_param", _release_impl)


@dataclass(eq=False)
class Streamed:
    """One streamed parameter: where its value lives and whether the device has it now."""

    key: int
    param_ref: weakref.ref
    nbytes: int
    host: torch.Tensor  # the value fetches read (host tier)
    spare: torch.Tensor | None = None  # an update's output (trainable parameters only)
    copy: Any = None  # the fetch in flight (a CopyEvent), or None
    tier: Any = None
    # the optimizer runtime that updates it (held weakly), when one does: ``wait_weight(key)``
    # returns once no update of this weight is in flight
    updater: weakref.ref | None = None
    reserve: int = 0  # host bytes its buffers leave free (else they live on SSD)

    def __repr__(self) -> str:
        # (never the tensors: an SSD block has no memory to print)
        where = self.tier.location(self.host) if self.tier is not None else "?"
        return f"Streamed(key={self.key}, {self.nbytes} bytes, value in {where}, resident={self.resident})"

    @property
    def param(self) -> torch.Tensor:
        p = self.param_ref()
        if p is None:
            raise LohanError("a streamed parameter was garbage collected while a compiled graph uses it")
        return p

    @property
    def resident(self) -> bool:
        return self.param.untyped_storage().nbytes() > 0

    def fetch(self, *, after_update: bool = True) -> None:
        p = self.param
        if p.untyped_storage().nbytes() > 0:
            return  # already on the device (another graph of the step fetched it)
        if after_update:
            self.wait_for_update()  # a deferred update of this weight writes the host value this copy reads
        # the device memory comes from the step thread (DESIGN: device tier allocated where
        # the step runs); the copy engine only writes into it
        p.untyped_storage().resize_(self.nbytes)
        if p.device.type != "cpu" and self.tier.is_on_ssd(self.host):
            # an accelerator reads SSD through host memory: the read now, the upload at the wait
            staging = self.tier.empty_like(self.host, where="staging")
            self.copy = _Staged(self.tier.copy_(staging, self.host), staging, p.detach(), self.tier)
        else:
            # (an SSD block is read straight into the CPU stand-in's device memory)
            self.copy = self.tier.copy_(p.detach(), self.host)
        with _lock:
            _counters["fetches"] += 1
            _counters["fetched_bytes"] += self.nbytes

    def wait(self) -> None:
        if self.copy is not None:
            self.copy.wait()
            self.copy = None
        if self.param.untyped_storage().nbytes() == 0:
            raise LohanError("internal: a streamed parameter is read before it was fetched")

    def release(self) -> None:
        # a copy still writing into the storage must finish before the storage goes
        self.wait()
        self.param.untyped_storage().resize_(0)

    def wait_for_update(self) -> None:
        updater = self.updater() if self.updater is not None else None
        if self.updater is not None and updater is None:
            raise LohanError("the CPUAdamW that updates a streamed parameter no longer exists")
        if updater is not None:
            updater.wait_weight(self.key)

    def swap_buffers(self) -> None:
        """After an update wrote ``spare``: it becomes the value fetches read."""
        self.host, self.spare = self.spare, self.host

    def value(self) -> torch.Tensor:
        """A copy of the parameter's current value, in ordinary CPU memory (outside the host
        tier and its budget: what ``state_dict()`` returns). Waits for nothing else."""
        out = torch.empty(self.host.shape, dtype=self.host.dtype)
        if self.tier.is_on_ssd(self.host):
            self.tier.copy_(out, self.host).wait()
        else:
            out.copy_(self.host)
        return out

    def set_value(self, value: torch.Tensor) -> None:
        """What the next fetch reads becomes ``value`` (in memory, any float dtype: cast)."""
        if not self.tier.is_on_ssd(self.host):
            self.host.copy_(value)
            return
        staging = self.tier.empty_like(self.host, where="staging").copy_(value)
        self.tier.copy_(self.host, staging).wait()

    def new_buffer(self) -> torch.Tensor:
        """Room for the parameter's value: host memory while the budget keeps ``reserve`` spare,
        else an SSD block."""
        return self.tier.empty(tuple(self.param.shape), self.param.dtype,
                               where=self.tier.home_for(self.nbytes, self.reserve))


class _Staged:
    """A fetch from SSD to an accelerator: the read into host memory (started), then the upload,
    started when the fetch is waited for."""

    def __init__(self, read: Any, staging: torch.Tensor, target: torch.Tensor, tier: Any) -> None:
        self.read, self.staging, self.target, self.tier = read, staging, target, tier

    def wait(self) -> None:
        self.read.wait()
        self.tier.copy_(self.target, self.staging).wait()
        self.staging = None


# re-entrant: a collection while it is held may run ``drop`` (a weakref callback) on this thread
_lock = threading.RLock()
_by_key: dict[int, Streamed] = {}  # keys: runtime/keys.py
_counters = {"fetches": 0, "fetched_bytes": 0}


def entry(key: int) -> Streamed:
    s = _by_key.get(key)
    if s is None:
        raise LohanError(f"internal: no streamed parameter has key {key}")
    return s


def lookup(param: torch.Tensor) -> Streamed | None:
    key = keys.existing_key(param)
    if key is None:
        return None
    s = _by_key.get(key)
    return s if s is not None and s.param_ref() is param else None


_resident: dict[int, weakref.ref] = {}  # id(param) -> param (tensors compare by value: not a set)


def keep_resident(param: torch.Tensor) -> None:
    """A compiled graph reads ``param`` without fetching it: later compiles must not stream it."""
    if param.device.type != "meta" and lookup(param) is None:
        with _lock:
            _resident[id(param)] = weakref.ref(param)


def kept_resident(param: torch.Tensor) -> bool:
    ref = _resident.get(id(param))
    return ref is not None and ref() is param


def counters() -> dict[str, int]:
    with _lock:
        return dict(_counters)


@contextlib.contextmanager
def fetched_for_reading(params: list[torch.Tensor]) -> Iterator[None]:
    """Inside the block, the streamed ones among ``params`` hold their value on the device (read
    only; those that had none lose it again at the end)."""
    fetched = []
    try:
        for p in params:
            s = lookup(p)
            if s is not None and not s.resident:
                with unset_fake_temporarily():
                    s.fetch()
                    s.wait()
                fetched.append(s)
        yield
    finally:
        with unset_fake_temporarily():
            for s in fetched:
                s.release()


def release_at_rest(param: torch.Tensor) -> None:
    """A registered parameter's device copy goes now: the first step fetches it like every later
    one, so a model whose weights exceed the budget is within it from the first step."""
    s = lookup(param)
    if s is not None and s.copy is not None:  # a fetch still copying into the storage
        s.copy.wait()
        s.copy = None
    with unset_fake_temporarily():
        param.untyped_storage().resize_(0)


def register(param: torch.Tensor, *, trainable: bool, updater: Any = None, release: bool = True,
             reserve: int = 0) -> Streamed:
    """Stream ``param`` from now on (compile time, once the passes ran): copy its value to the
    host tier and free its device memory (every use is preceded by a ``fetch_param``;
    ``release`` False: the caller frees it with ``release_at_rest`` once it has read the value).
    ``updater``: the optimizer runtime that updates it, if any (fetches wait for its update of
    the weight). Its buffers go to host memory while the host budget keeps ``reserve`` bytes
    free beside them, to the tier's SSD beyond. Registering again returns the same entry."""
    existing = lookup(param)
    if existing is not None:
        if trainable and existing.spare is None:
            existing.spare = existing.new_buffer()
        if updater is not None:
            existing.updater = weakref.ref(updater)
        return existing
    if not param.is_contiguous():
        raise LohanError(f"offload_params: a parameter of shape {tuple(param.shape)} is not contiguous")
    tier = hosttier.current()
    nbytes = param.numel() * param.element_size()
    with unset_fake_temporarily(), torch.no_grad():
        if param.untyped_storage().nbytes() != nbytes or param.storage_offset() != 0:
            raise LohanError(
                "offload_params: a parameter shares its storage with other tensors (a view of a larger "
                "buffer); streaming it would free memory they use. Make it a parameter of its own."
            )
        # a storage made before the device counter was installed (the model is usually built
        # first) moves into one the counter sees: every fetch resizes it, and is counted
        device.adopt(param)
        # both buffers in the same place: host memory only where both fit there
        where = tier.home_for((2 if trainable else 1) * nbytes, reserve)
        host = tier.empty(tuple(param.shape), param.dtype, where=where)
        if where == "ssd":  # (written from CPU memory: an accelerator's copy comes down first)
            tier.copy_(host, param.detach() if param.device.type == "cpu" else param.detach().cpu()).wait()
        else:
            host.copy_(param.detach())
        spare = tier.empty(tuple(param.shape), param.dtype, where=where) if trainable else None
    if release:
        release_at_rest(param)
    key = keys.key_for(param)
    with _lock:
        s = Streamed(key, weakref.ref(param, _forget(key)), nbytes, host, spare, None, tier,
                     weakref.ref(updater) if updater is not None else None, reserve)
        _by_key[key] = s
    return s


def _forget(key: int):
    def drop(_ref) -> None:
        with _lock:
            _by_key.pop(key, None)

    return drop


def _streamed_of(module: torch.nn.Module) -> list[tuple[str, Streamed]]:
    out = []
    for name, p in module.named_parameters(remove_duplicate=True):
        s = lookup(p)
        if s is not None:
            out.append((name, s))
    return out


def _wait_for_updates(module: torch.nn.Module) -> None:
    """Deferred optimizer updates of ``module``'s streamed weights, still running, finish first."""
    for _, s in _streamed_of(module):
        s.wait_for_update()


@contextlib.contextmanager
def materialized(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, every streamed parameter of ``module`` holds its current value on the
    device, as if it were never streamed: evaluate the model without compiling it, read its
    weights, ``save_pretrained``. Read-only: changes made to the weights inside the block are
    dropped at its end (load new weights before compiling, or into the optimizer's state)."""
    _wait_for_updates(module)  # deferred updates write the values read here
    fetched = []
    try:
        for _, s in _streamed_of(module):
            if not s.resident:
                s.fetch()
                fetched.append(s)
        for s in fetched:
            s.wait()
        yield module
    finally:
        for s in fetched:
            s.release()


def state_dict(module: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every streamed parameter's current value (a host copy),
    so it can be saved (``torch.save``, safetensors) while the weights are streamed."""
    _wait_for_updates(module)
    streamed = {id(s.param): s for _, s in _streamed_of(module)}
    sd = module.state_dict(*args, keep_vars=True, **kwargs)
    out = {}
    for name, t in sd.items():
        s = streamed.get(id(t)) if isinstance(t, torch.Tensor) else None
        if s is not None:
            out[name] = s.value()
        else:
            out[name] = t.detach() if isinstance(t, torch.Tensor) else t
    return out
