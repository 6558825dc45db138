"""Measuring this machine for the planner: ``measure()`` (the CPU standing in for a GPU),
``measure_cuda()``, ``auto()`` (measured once, cached on disk) and ``resolve()`` (a profile
from an option value). The profile itself and the presets are graph-free data in
``lohan_compile.plan.profile``, re-exported here."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from .plan.profile import (  # noqa: F401  (re-exported: the profile and the presets)
    A100,
    GB,
    GiB,
    H100,
    LOHAN_TESTBED,
    PRESETS,
    RTX4090,
    HardwareProfile,
    preset,
)

# -- measuring this machine ---------------------------------------------------------

CACHE_VERSION = 1


def cache_path(device: str = "cpu") -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lohan_compile"
    import torch

    key = f"{platform.node()}|{platform.machine()}|{os.cpu_count()}|{torch.__version__}|{torch.get_num_threads()}"
    if device == "cuda":
        key += f"|{torch.cuda.get_device_name()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return root / f"hardware-v{CACHE_VERSION}-{digest}.json"


_measured: dict[str, HardwareProfile] = {}
_measure_lock = threading.Lock()


def auto(*, refresh: bool = False, device: str = "cpu") -> HardwareProfile:
    """This machine's profile: measured once, then read from the cache file.

    ``device="cpu"`` measures the CPU standing in for a GPU; ``"cuda"`` the current GPU
    and its host link (what a graph whose tensors are on the GPU is planned with).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"hardware.auto(device={device!r}): 'cpu' or 'cuda'")
    with _measure_lock:
        if device in _measured and not refresh:
            return _measured[device]
        path = cache_path(device)
        if path.exists() and not refresh:
            try:
                _measured[device] = HardwareProfile.from_json(json.loads(path.read_text()))
                return _measured[device]
            except (ValueError, TypeError, OSError):
                pass  # a corrupt or old cache is measured again
        profile = _measured[device] = measure_cuda() if device == "cuda" else measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes measuring at once (pytest -n)
            tmp.write_text(json.dumps(profile.to_json(), indent=2))
            tmp.replace(path)
        except OSError:
            pass  # no writable cache: measure again next time
        return profile


def resolve(hardware: Any) -> HardwareProfile:
    """A profile from an option value: "auto" (this machine's CPU standing in for a GPU; the
    backend turns "auto" into the GPU's own profile for graphs on a GPU), a preset name, or a
    HardwareProfile."""
    if isinstance(hardware, HardwareProfile):
        return hardware
    if hardware == "auto":
        return auto()
    return preset(hardware)


def _median_time(fn, repeat: int = 7, min_time: float = 0.02) -> float:
    times = []
    for _ in range(repeat):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        times.append(elapsed / n)
    return statistics.median(times)


def measure(*, quick: bool = False) -> HardwareProfile:
    """Measure this machine (see ``_measure``), outside any fake or tracing mode of a compile."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        return _measure(quick=quick)


def _measure(*, quick: bool) -> HardwareProfile:
    """Measure this machine as the CPU stand-in for a GPU (DESIGN.md).

    Compute: fp32 matmul FLOP/s and memory-bound bytes/s on the device tier
    (the c10 CPU allocator). Transfers: copy bandwidth between device-tier and
    host-tier buffers. Sharing: how much a copy running on another thread
    slows a matmul and the other way round (they share cores and memory).
    """
    import torch

    n = 512 if quick else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_mm = _median_time(lambda: torch.mm(a, b))
    matmul_flops = 2 * n**3 / t_mm

    size = (16 if quick else 64) * 2**20
    x = torch.empty(size // 4)
    y = torch.empty(size // 4)
    x.fill_(1.0)
    y.fill_(2.0)
    t_add = _median_time(lambda: torch.add(x, y, out=x))
    memory_bandwidth = 3 * size / t_add  # read x, read y, write x

    t_copy = _median_time(lambda: y.copy_(x))
    copy_bandwidth = 2 * size / t_copy  # read + write

    comp_slow, copy_slow = _measure_sharing(a, b, x, y, t_mm, t_copy)
    return HardwareProfile(
        name="auto",
        matmul_flops=matmul_flops,
        memory_bandwidth=memory_bandwidth,
        d2h_bandwidth=copy_bandwidth / 2,
        h2d_bandwidth=copy_bandwidth / 2,
        device_memory=_physical_memory(),
        host_memory_bandwidth=memory_bandwidth,
        cpu_adam_params_per_s=memory_bandwidth / 28,  # fp32 AdamW: 16 B read + 12 B written per parameter
        host_memory=_physical_memory(),
        op_overhead_s=_measure_overhead(),
        compute_slowdown={q: comp_slow for q in ("d2h", "h2d")},
        queue_slowdown={q: copy_slow for q in ("d2h", "h2d")},
        source=f"measured on {platform.node()} ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})",
    )


def measure_cuda(*, quick: bool = False) -> HardwareProfile:
    """Measure the current GPU: fp32 matmul FLOP/s (at the process's matmul precision),
    device-memory bandwidth, pinned-host copy bandwidth each way, launch overhead; the host
    side (memory bandwidth, CPU AdamW rate) as ``measure`` finds it. Copies run on the GPU's
    copy engines, so they do not slow compute (no sharing terms)."""
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        dev = torch.device("cuda", torch.cuda.current_device())

        def timed(fn, repeat: int = 5) -> float:
            fn()  # warm up (cuBLAS picks its kernel, lazy allocations)
            torch.cuda.synchronize(dev)
            times = []
            for _ in range(repeat):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e-3)
            return statistics.median(times)

        n = 2048 if quick else 8192
        a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
        matmul_flops = 2 * n**3 / timed(lambda: torch.mm(a, b))
        del a, b
        size = (64 if quick else 512) * 2**20
        x = torch.ones(size // 4, device=dev)
        y = torch.full((size // 4,), 2.0, device=dev)
        memory_bandwidth = 3 * size / timed(lambda: torch.add(x, y, out=x))
        host = torch.empty(size // 4, pin_memory=True)
        d2h = size / timed(lambda: host.copy_(x, non_blocking=True))
        h2d = size / timed(lambda: x.copy_(host, non_blocking=True))
        small = torch.zeros(1, device=dev)
        overhead = timed(lambda: [torch.add(small, small) for _ in range(100)]) / 100
        del x, y, host, small
        torch.cuda.empty_cache()
        cpu = measure(quick=True)
        props = torch.cuda.get_device_properties(dev)
        return HardwareProfile(
            name="auto",
            matmul_flops=matmul_flops,
            memory_bandwidth=memory_bandwidth,
            d2h_bandwidth=d2h,
            h2d_bandwidth=h2d,
            device_memory=props.total_memory,
            host_memory_bandwidth=cpu.host_memory_bandwidth,
            cpu_adam_params_per_s=cpu.cpu_adam_params_per_s,
            host_memory=_physical_memory(),
            op_overhead_s=overhead,
            source=f"measured on {platform.node()}: {props.name}, host {os.cpu_count()} CPUs",
        )


def _measure_overhead() -> float:
    import torch

    s = torch.zeros(1)
    return _median_time(lambda: torch.add(s, s))


def _measure_sharing(a, b, x, y, t_mm_alone: float, t_copy_alone: float) -> tuple[float, float]:
    """Slowdown of a matmul while copies run on a second thread, and of copies during matmuls."""
    import torch

    stop = threading.Event()
    copies = [0]

    def copier() -> None:
        while not stop.is_set():
            y.copy_(x)  # torch releases the GIL inside the op
            copies[0] += 1

    thread = threading.Thread(target=copier, daemon=True)
    thread.start()
    try:
        time.sleep(0.005)
        start_copies, start = copies[0], time.perf_counter()
        t_mm_shared = _median_time(lambda: torch.mm(a, b))
        elapsed = time.perf_counter() - start
        done = copies[0] - start_copies
    finally:
        stop.set()
        thread.join()
    t_copy_shared = elapsed / max(done, 1)
    comp_slow = max(0.0, t_mm_shared / t_mm_alone - 1.0)
    copy_slow = max(0.0, t_copy_shared / t_copy_alone - 1.0)
    return comp_slow, copy_slow


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


