"""The host tier: host memory outside the c10 allocator, an SSD tier, a copy engine.

Two ways in:

* **Graph ops** (what the compiler inserts into forward/backward graphs)::

      h = torch.ops.lohan.swap_out(x)          # device -> host tier; returns at once
      h = torch.ops.lohan.wait_tensor(h)       # x may be freed after this
      ...
      d = torch.ops.lohan.swap_in(h)           # host tier -> device (c10 memory, this thread)
      d = torch.ops.lohan.wait_tensor(d)       # d is valid from here on

  They use the *current* tier (``configure()`` / ``use()``; a default one
  with no budget and no SSD otherwise). ``swap_out`` keeps ``x`` alive until
  its wait; ``wait_tensor`` releases it on the calling thread. When the
  budget is full and the tier has an ``ssd_dir``, ``swap_out`` returns an
  SSD-resident tensor instead (``location(h) == "ssd"``): it has no host
  memory (its data pointer is null) and only ``swap_in`` or ``copy_`` may
  read it.

* **Direct use**::

      tier = HostTier("8GiB", ssd_dir="/nvme/tmp")
      h = tier.empty((1024, 1024), torch.float16)       # host-tier tensor
      ev = tier.copy_(h, x)                              # async; ev.wait() / ev.query()

Blocks return to their arena (or SSD extent) when the last tensor using
them dies. Errors come as ``lohan.HostMemoryError`` (budget) and
``lohan.StorageError`` (disk), with what happened and what to do.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import threading
import weakref
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence

import torch

from ..errors import HostMemoryError, StorageError
from ..layout import dense_layout
from ..ops import load
from ..plan.state import arena_chunk_bytes
from ..units import format_bytes, parse_bytes

_ERRNO_RE = re.compile(r"\(errno (\d+)\)")


def _translate(e: BaseException) -> BaseException | None:
    """The lohan error type for a torch error raised by the C++ host tier, if any."""
    msg = str(e)
    if isinstance(e, torch.OutOfMemoryError) and "lohan host tier" in msg:
        return HostMemoryError(msg)
    if isinstance(e, RuntimeError) and "lohan SSD tier:" in msg and not isinstance(e, StorageError):
        err = StorageError(msg)
        m = _ERRNO_RE.search(msg)
        if m:
            err.errno = int(m.group(1))
        return err
    return None


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Re-raise host-tier failures as ``HostMemoryError`` / ``StorageError``.

    The graph ops raise torch's types (``torch.OutOfMemoryError``,
    ``RuntimeError``); a runtime that runs graphs can wrap them in this.
    """
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        mapped = _translate(e)
        if mapped is None:
            raise
        raise mapped from None


def _translated(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, MemoryError) as e:
            mapped = _translate(e)
            if mapped is None:
                raise
            raise mapped from None

    return wrapper


def _ops():
    load()  # the extension and its ops' fake kernels
    return torch.ops.lohan


@dataclass(frozen=True)
class HostStats:
    """Exact statistics of a tier's host arenas (and SSD files, when it has them)."""

    in_use_bytes: int
    requested_bytes: int
    peak_in_use_bytes: int
    reserved_bytes: int
    peak_reserved_bytes: int
    free_bytes: int
    largest_free_bytes: int
    free_blocks: int
    live_blocks: int
    arenas: int
    pinned_bytes: int
    allocs: int
    frees: int
    failed_allocs: int
    budget_bytes: int | None
    alignment: int
    copy_d2h_bytes: int
    copy_h2d_bytes: int
    copy_other_bytes: int
    staging_in_use_bytes: int = 0
    ssd_in_use_bytes: int = 0
    ssd_peak_in_use_bytes: int = 0
    ssd_file_bytes: int = 0
    ssd_live_blocks: int = 0
    ssd_writes: int = 0
    ssd_reads: int = 0
    ssd_bytes_written: int = 0
    ssd_bytes_read: int = 0
    ssd_failed_ios: int = 0
    ssd_staging_bytes: int = 0

    @property
    def fragmentation(self) -> float:
        """1 - largest free block / free bytes: 0 when the free space is one block.

        Free space in different arenas counts as fragmented (a block cannot
        span arenas); ``trim()`` returns empty arenas to the OS."""
        if self.free_bytes == 0:
            return 0.0
        return 1.0 - self.largest_free_bytes / self.free_bytes

    def __str__(self) -> str:
        budget = "unlimited" if self.budget_bytes is None else format_bytes(self.budget_bytes)
        text = (
            f"host tier: {format_bytes(self.in_use_bytes)} in use "
            f"(peak {format_bytes(self.peak_in_use_bytes)}), "
            f"{format_bytes(self.reserved_bytes)} reserved in {self.arenas} arenas of {budget}, "
            f"fragmentation {self.fragmentation:.1%}"
        )
        if self.ssd_file_bytes:
            text += f"; SSD {format_bytes(self.ssd_in_use_bytes)} in use"
        return text


@dataclass(frozen=True)
class SSDInfo:
    folder: str  # the first private folder
    direct_io: bool
    io_mode: str
    files: tuple[str, ...]
    chunk_bytes: int
    threads: int
    folders: tuple[str, ...] = ()  # one private folder per ssd_dir folder


class CopyEvent:
    """An asynchronous copy: ``wait()`` blocks until it is done (and raises if
    it failed), ``query()`` says whether it is. The event keeps both tensors
    alive until the copy completes; dropping it waits."""

    __slots__ = ("_ev",)

    def __init__(self, ev) -> None:
        self._ev = ev

    @_translated
    def wait(self) -> None:
        self._ev.wait()

    def query(self) -> bool:
        return self._ev.query()

    @property
    def nbytes(self) -> int:
        return self._ev.nbytes()


_DIRECT = {"auto": -1, False: 0, True: 1}
_LIVE: "weakref.WeakSet[HostTier]" = weakref.WeakSet()


def ssd_folders(ssd_dir: Any) -> list[str]:
    """``ssd_dir`` (None, one folder, or a list of folders) as a list of paths."""
    if ssd_dir is None:
        return []
    if isinstance(ssd_dir, (str, os.PathLike)):
        return [os.fspath(ssd_dir)]
    return [os.fspath(d) for d in ssd_dir]


class HostTier:
    """A host memory manager: arenas outside the c10 allocator under a budget,
    an optional SSD tier that blocks spill to, and a copy engine.

    Args:
        host_memory_budget: bound on host bytes the arenas may map (bytes or a
            string such as ``"8GiB"``); ``None``: no bound but the OS's.
        ssd_dir: folder for the SSD tier, or a list of folders (one per drive: blocks are
            striped over them like a RAID 0); a private folder is made inside each.
        arena_bytes: size of one arena (larger requests get their own).
        alignment: block granule and alignment (a power of two >= 4096).
        pin: register arenas as pinned CUDA memory; ``"auto"``: when CUDA is available.
        copy_threads: copy-engine threads (default: 1 on machines with < 4 cores, else 2).
        copy_chunk_bytes: a copy is split into chunks of this size.
        ssd_files, ssd_threads, ssd_chunk_bytes: data files, I/O threads and I/O size.
        direct_io: ``"auto"`` (O_DIRECT where the filesystem takes it), ``True``
            (required), ``False`` (buffered).
        preallocate: reserve SSD space when a block is allocated (a full disk
            then fails the allocation, not a later write).
    """

    def __init__(
        self,
        host_memory_budget: int | str | None = None,
        *,
        ssd_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        arena_bytes: int | str = "256MiB",
        alignment: int = 4096,
        pin: bool | str = "auto",
        copy_threads: int | None = None,
        copy_chunk_bytes: int | str = "2MiB",
        ssd_files: int = 2,
        ssd_threads: int = 4,
        ssd_chunk_bytes: int | str = "4MiB",
        direct_io: bool | str = "auto",
        preallocate: bool = True,
    ) -> None:
        budget = -1 if host_memory_budget is None else parse_bytes(host_memory_budget, name="host_memory_budget")
        if pin == "auto":
            pin = torch.cuda.is_available()
        if not isinstance(pin, bool):
            raise ValueError(f"pin={pin!r}: expected True, False or 'auto'")
        if direct_io not in _DIRECT or (direct_io is not True and direct_io is not False and direct_io != "auto"):
            raise ValueError(f"direct_io={direct_io!r}: expected 'auto', True or False")
        if copy_threads is None:
            copy_threads = 2 if (os.cpu_count() or 1) >= 4 else 1
        _ops()
        if pin:
            # torch's CUDA state first: the arenas are registered through the CUDA runtime, and
            # torch answers is_pinned() only once it has initialised CUDA itself
            torch.cuda.init()
        with translate_errors():
            obj = torch.classes.lohan.HostTier(
                budget,
                parse_bytes(arena_bytes, name="arena_bytes"),
                int(alignment),
                pin,
                int(copy_threads),
                parse_bytes(copy_chunk_bytes, name="copy_chunk_bytes"),
                ssd_folders(ssd_dir),
                int(ssd_files),
                int(ssd_threads),
                parse_bytes(ssd_chunk_bytes, name="ssd_chunk_bytes"),
                _DIRECT[direct_io],
                bool(preallocate),
            )
        self._init(obj)

    def _init(self, obj) -> None:
        self._obj = obj
        _LIVE.add(self)

    @classmethod
    def _wrap(cls, obj) -> "HostTier":
        self = cls.__new__(cls)
        self._init(obj)
        return self

    @staticmethod
    def arena_bytes_for(budget: int) -> int:
        """The arena chunk a tier with host budget ``budget`` grows by (an eighth of it, 1 to 256 MiB)."""
        return arena_chunk_bytes(budget)

    @classmethod
    def from_options(cls, options, **kwargs: Any) -> "HostTier":
        """A tier for ``lohan_compile.Options`` (``host_memory_budget``, ``ssd_dir``)."""
        return cls(options.host_memory_budget, ssd_dir=options.ssd_dir, **kwargs)

    # ---- allocation
    @_translated
    def empty(
        self,
        shape,
        dtype: torch.dtype = torch.float32,
        *,
        stride=None,
        where: str = "host",
    ) -> torch.Tensor:
        """An uninitialised host-tier tensor. ``where``: ``"host"`` (host memory), ``"ssd"`` (an
        SSD block, no host memory), ``"staging"`` (host memory for a short while: a read of an
        SSD block, an update's buffers; counted apart, as what the spill reserve is kept for)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if stride is None:
            stride = _contiguous_strides(shape)
        elif not dense_layout(shape, stride):
            raise ValueError(f"stride={stride}: host-tier tensors are dense (no gaps, no overlap)")
        if where not in ("host", "ssd", "staging"):
            raise ValueError(f"where={where!r}: expected 'host', 'ssd' or 'staging'")
        return self._obj.empty_strided(shape, stride, dtype, where == "ssd", where == "staging")

    def home_for(self, nbytes: int, reserve: int = 0) -> str:
        """Where a block of ``nbytes`` that is to stay should live: ``"host"`` while the host
        memory holds it with ``reserve`` bytes of the budget to spare (always, without a budget or
        an SSD tier), else ``"ssd"``."""
        stats = self.stats()
        if not self._obj.has_ssd() or stats.budget_bytes is None:
            return "host"
        # (staging in flight comes out of the reserve, not out of this block's room)
        held = stats.in_use_bytes - min(stats.in_use_bytes, stats.staging_in_use_bytes)
        return "host" if held + nbytes + reserve <= stats.budget_bytes else "ssd"

    def is_on_ssd(self, t: torch.Tensor) -> bool:
        """An SSD-resident tensor of this tier (no host memory behind it)."""
        return t.numel() > 0 and t.data_ptr() == 0 and self.location(t) == "ssd"

    def in_memory(self, t: torch.Tensor, *, where: str = "staging") -> torch.Tensor:
        """``t`` itself, or for an SSD-resident ``t`` a host-memory copy of it, read now into a
        staging block (``where="host"``: a block that is to stay). The block is read as it is
        on disk: an optimizer's state tensor whose write-back may be pending is read through
        ``CPUAdamW.read_state`` instead."""
        if not self.is_on_ssd(t):
            return t
        out = self.empty_like(t, where=where)
        self.copy_(out, t).wait()
        return out

    def empty_like(self, t: torch.Tensor, *, where: str = "host") -> torch.Tensor:
        """Host-tier tensor with ``t``'s shape and dtype, in ``t``'s layout when dense."""
        stride = t.stride() if _non_overlapping_dense(t) else None
        return self.empty(t.shape, t.dtype, stride=stride, where=where)

    # ---- copies
    @_translated
    def copy_(self, dst: torch.Tensor, src: torch.Tensor) -> CopyEvent:
        """Starts copying ``src`` into ``dst`` (same sizes and dtype; ``dst`` in
        ``src``'s layout or contiguous). Either side may be host-tier, device or
        SSD-resident. Returns at once; ``wait()`` on the event."""
        return CopyEvent(self._obj.copy(dst, src))

    @_translated
    def to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, CopyEvent]:
        """Asynchronous copy of ``t`` into the host tier (an SSD block when the budget is full)."""
        h = self._obj.swap_out(t)
        return h, _PendingEvent(h, t.numel() * t.element_size())

    @_translated
    def to_device(self, h: torch.Tensor, device: torch.device | str | None = None) -> tuple[torch.Tensor, CopyEvent]:
        """Asynchronous copy of a host-tier tensor into new device-tier memory."""
        d = self._obj.swap_in(h, None if device is None else torch.device(device))
        return d, _PendingEvent(d, h.numel() * h.element_size())

    def location(self, t: torch.Tensor) -> str:
        """``"host"``, ``"ssd"`` (host-tier block in memory or on disk), else ``"device"``."""
        return self._obj.location(t)

    # ---- bookkeeping
    def stats(self) -> HostStats:
        raw = dict(self._obj.stats())
        budget = raw.pop("budget_bytes")
        known = {f.name for f in fields(HostStats)}
        return HostStats(budget_bytes=None if budget < 0 else budget, **{k: v for k, v in raw.items() if k in known})

    def reset_peak(self) -> None:
        self._obj.reset_peak()

    def trim(self) -> int:
        """Unmaps empty arenas; returns the bytes given back to the OS."""
        return self._obj.trim()

    def set_budget(self, host_memory_budget: int | str | None) -> None:
        self._obj.set_budget(-1 if host_memory_budget is None else parse_bytes(host_memory_budget))

    @property
    def spill_reserve(self) -> int:
        """Bytes of the budget that blocks able to spill (``swap_out``'s) leave free."""
        return self._obj.spill_reserve()

    def set_spill_reserve(self, nbytes: int) -> None:
        """With an SSD tier, ``swap_out`` puts a block on SSD once host memory would keep fewer
        than ``nbytes`` of the budget free: room that staging (the optimizer's reads and writes of
        SSD-resident state) always finds."""
        self._obj.set_spill_reserve(int(nbytes))

    def check(self) -> None:
        """Raises ``RuntimeError`` if an allocator invariant is broken (tests)."""
        self._obj.check()

    @property
    def ssd(self) -> SSDInfo | None:
        info = dict(self._obj.ssd_info())
        if not info:
            return None
        return SSDInfo(
            folder=info["folder"],
            direct_io=info["direct_io"] == "1",
            io_mode=info["io_mode"],
            files=tuple(info["files"].split("\n")),
            chunk_bytes=int(info["chunk_bytes"]),
            threads=int(info["threads"]),
            folders=tuple(info["folders"].split("\n")),
        )

    def ssd_extent(self, t: torch.Tensor) -> tuple[str, int, int]:
        """(file, offset, bytes on disk) of an SSD-resident tensor."""
        f, off, n = self._obj.ssd_extent(t)
        return self.ssd.files[f], off, n

    @property
    def pinned(self) -> bool:
        return self._obj.pinned()

    @property
    def copy_threads(self) -> int:
        return self._obj.copy_threads()

    @property
    def closed(self) -> bool:
        return self._obj.closed()

    def close(self) -> None:
        """Stops the copy and I/O threads (after queued work) and removes the SSD files."""
        self._obj.close()

    def __enter__(self) -> "HostTier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        ssd = self.ssd
        where = f", ssd_dir folder {ssd.folder} ({ssd.io_mode})" if ssd else ""
        return f"HostTier({self.stats()}{where})"


class _PendingEvent(CopyEvent):
    """The event of a swap: waiting is ``wait_tensor`` on its target."""

    __slots__ = ("_target", "_nbytes", "_done")

    def __init__(self, target: torch.Tensor, nbytes: int) -> None:
        self._target = target
        self._nbytes = nbytes
        self._done = False

    @_translated
    def wait(self) -> None:
        if not self._done:
            _ops().wait_tensor(self._target)
            self._done = True

    def query(self) -> bool:
        return self._done

    @property
    def nbytes(self) -> int:
        return self._nbytes


def _non_overlapping_dense(t: torch.Tensor) -> bool:
    return dense_layout(t.shape, t.stride())


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# ---- the current tier (what the graph ops use) ------------------------------------

_current_lock = threading.Lock()


def current() -> HostTier:
    """The tier the graph ops use (a default one, unbounded and without SSD, if none was set)."""
    _ops()
    return HostTier._wrap(torch.classes.lohan.HostTier.current())


def current_if_set() -> HostTier | None:
    """The current tier, or None when none was set or created yet."""
    _ops()
    obj = torch.classes.lohan.HostTier.current_if_set()
    return None if obj is None else HostTier._wrap(obj)


def set_current(tier: HostTier | None) -> None:
    _ops()
    with _current_lock:
        torch.classes.lohan.HostTier.set_current(None if tier is None else tier._obj)


def configure(host_memory_budget: int | str | None = None, **kwargs: Any) -> HostTier:
    """Makes a new tier (``HostTier`` arguments) the current one and returns it."""
    tier = HostTier(host_memory_budget, **kwargs)
    set_current(tier)
    return tier


@contextlib.contextmanager
def use(tier: HostTier) -> Iterator[HostTier]:
    """Makes ``tier`` current inside the block (then restores the previous one)."""
    _ops()
    previous = torch.classes.lohan.HostTier.current()
    set_current(tier)
    try:
        yield tier
    finally:
        torch.classes.lohan.HostTier.set_current(previous)


# ---- the graph ops, callable from Python -----------------------------------------


SPAN_KINDS = ("d2h", "h2d", "other", "ssd_write", "ssd_read")


def record_copy_timeline(on: bool = True) -> None:
    """Start (or stop and clear) logging every chunk the copy engine and the SSD tier move."""
    _ops()._copy_timeline_record(bool(on))


def take_copy_timeline() -> list[tuple[str, int, float, float]]:
    """The chunks moved since the last call: ``(kind, bytes, start, end)``, times in
    ``time.perf_counter()`` seconds; kinds in ``SPAN_KINDS``."""
    flat = _ops()._copy_timeline_take()
    return [(SPAN_KINDS[flat[i]], flat[i + 1], flat[i + 2] * 1e-9, flat[i + 3] * 1e-9) for i in range(0, len(flat), 4)]


@_translated
def swap_out(t: torch.Tensor) -> torch.Tensor:
    return _ops().swap_out(t)


@_translated
def swap_in(h: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    return _ops().swap_in(h, None if device is None else torch.device(device))


@_translated
def wait_tensor(t: torch.Tensor) -> torch.Tensor:
    return _ops().wait_tensor(t)


@_translated
def drain() -> int:
    """Waits for every graph copy still pending (a swap whose wait never ran); returns their number."""
    return _ops()._host_tier_drain()


def pending() -> int:
    """Graph copies submitted and not yet waited on."""
    return _ops()._host_tier_pending()


def bytes_moved() -> dict[str, int]:
    """Bytes moved since the process started: device->host, host->device, SSD written, SSD read."""
    d2h, h2d, ssd_w, ssd_r = _ops()._host_tier_bytes_moved()
    return {"d2h_bytes": d2h, "h2d_bytes": h2d, "ssd_write_bytes": ssd_w, "ssd_read_bytes": ssd_r}


@_translated
def cleanup_stale(ssd_dir: str | os.PathLike) -> int:
    """Removes the private folders that dead runs left in ``ssd_dir``; returns how many.

    Every new SSD tier does this at start; live runs' folders are never touched.
    """
    return _ops()._ssd_cleanup_stale(os.fspath(ssd_dir))


@atexit.register
def _close_all() -> None:
    # Remove SSD files and stop threads on a normal exit, before interpreter teardown.
    try:
        set_current(None)
    except Exception:
        pass
    for tier in list(_LIVE):
        try:
            tier.close()
        except Exception:
            pass
