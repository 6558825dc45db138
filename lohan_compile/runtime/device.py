"""Device-tier memory counters: ``allocated()``, ``peak()``, ``reset_peak()``.

On CUDA these are ``torch.cuda.memory_allocated`` and friends. On the CPU
stand-in, lohan installs a counting wrapper around c10's CPU allocator
(``csrc/device_counter.cpp``) the first time it is needed; it counts the
allocations made after it was installed, so ``allocated()`` misses tensors
that existed before. ``counted(t)`` says whether a tensor's storage is among
the counted blocks, so a caller can add what was allocated earlier itself.
"""

from __future__ import annotations

import contextlib

import torch

_installed = False


def _ops():
    from ..ext import load

    load()
    return torch.ops.lohan


def install() -> None:
    """Start counting CPU allocations (idempotent)."""
    global _installed
    if not _installed:
        _ops().device_counter_install()
        _installed = True


def _stats() -> list[int]:
    install()
    return list(_ops().device_counter_stats())


def allocated(device: torch.device | None = None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _stats()[0]


def peak(device: torch.device | None = None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _stats()[1]


def reset_peak(device: torch.device | None = None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    install()
    _ops().device_counter_reset_peak()


def raise_peak(value: int, device: torch.device | None = None) -> None:
    """CPU stand-in: the peak is at least ``value`` again (after a measurement reset it); on
    CUDA torch keeps no such setter: nothing happens."""
    if device is not None and device.type == "cuda":
        return
    install()
    _ops().device_counter_raise_peak(int(value))


def counted(t: torch.Tensor) -> bool:
    """Whether the storage of ``t`` (on the CPU stand-in) is a block the counter sees."""
    if t.device.type == "cuda":
        return True
    install()
    return bool(_ops().device_counter_contains(t.untyped_storage().data_ptr()))


def adopt(t: torch.Tensor) -> bool:
    """CPU stand-in: move the storage of ``t`` into a block the counter sees (same bytes, same
    storage object) and have its later resizes counted; False if it was counted already.
    For a tensor made before the counter was installed that the runtime will resize."""
    if t.device.type != "cpu":
        return False
    install()
    return bool(_ops().device_counter_adopt(t))


@contextlib.contextmanager
def paused():
    """Tests: inside the block, new CPU storages are made as before the counter was installed."""
    install()
    _ops().device_counter_pause(True)
    try:
        yield
    finally:
        _ops().device_counter_pause(False)


def check_reads(what: str, tensors: list, device: torch.device | None) -> None:
    """LOHAN_DEBUG: compute (``what``: a segment or an op) reads device-tier memory only. On a
    GPU run a CPU tensor with elements is refused (a 0-dim CPU scalar is fine: kernels take
    it as an argument); on the CPU stand-in, a host-tier block (in memory or on SSD) is."""
    from .hosttier import current_if_set

    tier = current_if_set() if device is None or device.type != "cuda" else None
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        if device is not None and device.type == "cuda":
            bad = t.device.type == "cpu" and t.dim() > 0
            where = "CPU memory"
        else:
            where = tier.location(t) if tier is not None else "device"
            bad = where != "device"
            where = f"host-tier memory ({where})"
        if bad:
            from ..errors import LohanError

            raise LohanError(
                f"LOHAN_DEBUG: {what} reads its input {i} ({tuple(t.shape)}, {t.dtype}) from {where}, not "
                "device memory: a plan moved a tensor to the host and compute read it there (a swap-in "
                "missing or misplaced). Please report this with the dump of LOHAN_DUMP_DIR."
            )


def record_timeline(on: bool = True) -> None:
    """Start (or stop and clear) recording the counted bytes after every allocation and free
    (CPU stand-in; on CUDA nothing is recorded)."""
    install()
    _ops().device_counter_record(bool(on))


def take_timeline() -> list[tuple[float, int]]:
    """``(time.perf_counter() seconds, live bytes)`` recorded since the last call."""
    install()
    flat = _ops().device_counter_take_timeline()
    return [(flat[i] * 1e-9, flat[i + 1]) for i in range(0, len(flat), 2)]
