"""``HardwareProfile``: the speeds and sizes the planner plans for. Graph-free.

A profile is plain data. It comes from a preset (published specifications,
below) or from measuring a machine (``lohan_compile.hardware``, cached on disk);
the planner never needs the hardware it plans for.

Throughputs are *achievable* rates, not datasheet peaks: each preset states
the datasheet figure and the fraction assumed reachable in training, so the
assumption is visible and can be changed with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from .simulate import Sharing

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    matmul_flops: float  # FLOP/s for matmul-like work (matmul, attention, convolution)
    memory_bandwidth: float  # device-memory bytes/s for memory-bound ops
    d2h_bandwidth: float  # device -> host bytes/s
    h2d_bandwidth: float  # host -> device bytes/s
    device_memory: int  # bytes
    host_memory_bandwidth: float = 50 * GB
    cpu_adam_params_per_s: float = 1e9  # parameters per second through the CPU AdamW step
    ssd_read_bandwidth: float = 0.0  # bytes/s per SSD
    ssd_write_bandwidth: float = 0.0
    ssd_count: int = 0
    ssd_capacity: int = 0  # bytes per SSD (0: not stated, not checked)
    host_memory: int | None = None  # bytes of host memory available for the host tier
    op_overhead_s: float = 5e-6  # fixed cost per op (kernel launch, dispatch)
    full_duplex: bool = True  # d2h and h2d run at full speed at the same time
    # bytes/s each device sends (and receives) in an all-reduce among the server's devices (the
    # "bus bandwidth" NCCL's tests report); 0: none stated, the devices reduce through host
    # memory over PCIe (``allreduce_bandwidth``)
    interconnect_bandwidth: float = 0.0
    # compute/copy interference: zero on a GPU; measured on the CPU stand-in
    compute_slowdown: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    queue_slowdown: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    source: str = ""  # where the figures come from

    @property
    def allreduce_bandwidth(self) -> float:
        """Bytes/s of an all-reduce's traffic per device: the interconnect's, or, without one,
        half the slower PCIe direction (each byte goes to host memory and comes back)."""
        return self.interconnect_bandwidth or min(self.d2h_bandwidth, self.h2d_bandwidth) / 2

    @property
    def sharing(self) -> Sharing:
        return Sharing(dict(self.compute_slowdown), dict(self.queue_slowdown))

    def with_(self, **changes: Any) -> "HardwareProfile":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "HardwareProfile":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# -- presets --------------------------------------------------------------------
# Datasheet figures (dense, no sparsity) and the fraction assumed achievable:
# - matmul: 60% of peak tensor throughput in bf16/fp16 with fp32 accumulation,
#   typical of large transformer GEMMs in training;
# - device memory: 80% of peak bandwidth;
# - PCIe: about 80% of the link rate per direction with pinned memory
#   (PCIe 4.0 x16: 31.5 GB/s raw -> 25 GB/s; PCIe 5.0 x16: 63 GB/s -> 50 GB/s).

_MATMUL_EFF = 0.60
_MEM_EFF = 0.80

RTX4090 = HardwareProfile(
    name="rtx4090",
    # Ada whitepaper: 165.2 TFLOPS FP16/BF16 tensor with FP32 accumulate; 1008 GB/s GDDR6X; 24 GB
    matmul_flops=_MATMUL_EFF * 165.2e12,
    memory_bandwidth=_MEM_EFF * 1008 * GB,
    d2h_bandwidth=25 * GB,
    h2d_bandwidth=25 * GB,
    device_memory=24 * GiB,
    op_overhead_s=5e-6,
    source="NVIDIA Ada whitepaper (RTX 4090), PCIe 4.0 x16",
)

A100 = HardwareProfile(
    name="a100",
    # A100 80GB PCIe datasheet: 312 TFLOPS BF16 tensor; 1935 GB/s HBM2e; 80 GB; PCIe 4.0 x16
    matmul_flops=_MATMUL_EFF * 312e12,
    memory_bandwidth=_MEM_EFF * 1935 * GB,
    d2h_bandwidth=25 * GB,
    h2d_bandwidth=25 * GB,
    device_memory=80 * GiB,
    op_overhead_s=5e-6,
    source="NVIDIA A100 80GB PCIe datasheet, PCIe 4.0 x16",
)

H100 = HardwareProfile(
    name="h100",
    # H100 SXM datasheet: 989 TFLOPS BF16 tensor (dense); 3.35 TB/s HBM3; 80 GB; PCIe 5.0 x16 host link
    matmul_flops=_MATMUL_EFF * 989e12,
    memory_bandwidth=_MEM_EFF * 3350 * GB,
    d2h_bandwidth=50 * GB,
    h2d_bandwidth=50 * GB,
    device_memory=80 * GiB,
    op_overhead_s=4e-6,
    # NVLink 4: 900 GB/s per GPU, both directions together; an all-reduce's bus bandwidth taken
    # as 40% of it
    interconnect_bandwidth=0.40 * 900 * GB,
    source="NVIDIA H100 SXM datasheet, PCIe 5.0 x16, NVLink 4",
)

LOHAN_TESTBED = RTX4090.with_(
    name="lohan-testbed",
    # Two Xeon Gold 5320 (26 cores each, AVX-512), DDR4-3200 on 16 channels: 409.6 GB/s peak,
    # taken as 70% achievable; 256 GB of host memory as in the paper's emulated setting;
    # 12 Intel D7-P5510 3.84 TB NVMe (datasheet: 6.5 GB/s sequential read, 3.4 GB/s write each).
    host_memory_bandwidth=0.70 * 409.6 * GB,
    host_memory=256 * 10**9,
    # CPU Adam moves ~36 B per parameter (fp32 master, m, v read and written; fp16 grad in,
    # fp16 weight out): bandwidth-bound at the host memory rate.
    cpu_adam_params_per_s=0.70 * 409.6 * GB / 36,
    ssd_read_bandwidth=6.5 * GB,
    ssd_write_bandwidth=3.4 * GB,
    ssd_count=12,
    ssd_capacity=3_840_000_000_000,
    source="LoHan paper testbed: RTX 4090, 2x Xeon Gold 5320, DDR4-3200 x16, 12x D7-P5510",
)

PRESETS: dict[str, HardwareProfile] = {p.name: p for p in (RTX4090, A100, H100, LOHAN_TESTBED)}


def preset(name: str) -> HardwareProfile:
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown hardware preset {name!r}.{hint} Presets: {', '.join(PRESETS)}, or 'auto'") from None
