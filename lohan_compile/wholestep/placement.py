"""Where the model state lives: per optimizer group, host memory or SSD (``place``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..plan.profile import GiB, HardwareProfile
from ..plan.state import STATE_BYTES_PER_PARAM, packed_budget, staging_blocks
from ..units import format_bytes
from .layout import Layout

HOST_RESERVE_FRACTION = 0.05  # host memory left to the OS, Python, the framework
UPDATE_WINDOW = 2  # deferred updates run this many layers ahead of the forward
ACTIVATION_STAGING_BYTES = 8 * GiB  # pinned host buffers that activations going to or from SSD pass through


@dataclass
class Placement:
    """Per optimizer group: whether its bf16 weights, gradients and optimizer state live on SSD."""

    weights_ssd: set[str] = field(default_factory=set)
    grads_ssd: set[str] = field(default_factory=set)
    state_ssd: set[str] = field(default_factory=set)
    host_bytes: int = 0  # weights, gradients and state kept in host memory
    staging_bytes: int = 0  # pinned buffers the SSD traffic passes through
    ssd_bytes: int = 0
    host_capacity: int = 0
    problem: str | None = None  # why it does not fit, if it does not


def shard_params(params: int, gpus: int) -> int:
    """One rank's share of a group's parameters when ``gpus`` ranks share its optimizer state."""
    return -(-params // gpus)


def place(layout: Layout, hw: HardwareProfile, *, grad_bytes: int = 2, weight_bytes: int = 2,
          state_bytes: int = STATE_BYTES_PER_PARAM, allow_ssd: bool = True, keep_free: int = 0,
          state_on_ssd: bool = False, gpus: int = 1, staging_rule: str = "group") -> Placement:
    """Host memory first, in the order the step touches the bytes most (weights: fetched twice per
    step; gradients; optimizer state), one group at a time; the rest on SSD. ``keep_free``:
    host bytes left for what the step itself puts there (swapped activations). With ``gpus``
    ranks, ``hw`` is one rank's share of the server and the placement is one rank's: its own
    copy of the weights, and its 1/``gpus`` share of each group's gradients and state.
    ``staging_rule``: the host buffers SSD traffic passes through, for updates of a whole group at a
    time, ``UPDATE_WINDOW`` groups in flight (``"group"``), or for lohan's runtime, which
    updates one parameter at a time (``"parameter"``: ``plan.state.staging_blocks``, as the
    host tier packs them)."""
    available = max(int((hw.host_memory or 0) * (1 - HOST_RESERVE_FRACTION)) - keep_free, 0)
    staging = 0
    for _ in range(3):  # the staging buffers the SSD traffic needs come out of the same memory
        capacity = max(available - staging, 0)
        placement = Placement(host_capacity=available)
        used = 0
        for per_param, on_ssd, forced, shards in ((weight_bytes, placement.weights_ssd, False, 1),
                                                  (grad_bytes, placement.grads_ssd, state_on_ssd, gpus),
                                                  (state_bytes, placement.state_ssd, state_on_ssd, gpus)):
            for group in layout.group_order:
                nbytes = shard_params(layout.groups.get(group, 0), shards) * per_param
                if nbytes and used + nbytes <= capacity and not forced:
                    used += nbytes
                elif nbytes:
                    on_ssd.add(group)
                    placement.ssd_bytes += nbytes
        placement.host_bytes = used
        on_any_ssd = placement.state_ssd | placement.grads_ssd | placement.weights_ssd
        if staging_rule == "parameter":
            # (the runtime's reserve is sized by the largest parameter, wherever that one lives)
            largest = max((w.params for w in layout.weights), default=0) if on_any_ssd else 0
            placement.staging_bytes = packed_budget(staging_blocks(largest, weight_bytes)) if largest else 0
        else:
            biggest = max((shard_params(layout.groups.get(group, 0), gpus) * (state_bytes + grad_bytes)
                           + layout.groups.get(group, 0) * weight_bytes
                           for group in layout.group_order if group in on_any_ssd), default=0)
            placement.staging_bytes = 2 * UPDATE_WINDOW * biggest
        if placement.staging_bytes <= staging:
            break
        staging = placement.staging_bytes
    total_host = placement.host_bytes + placement.staging_bytes
    model_state_bytes = placement.host_bytes + placement.ssd_bytes
    if placement.ssd_bytes and not allow_ssd:
        placement.problem = (f"host memory: the model state needs {format_bytes(model_state_bytes)} in the "
                             f"host tier, {format_bytes(available)} is available, and this policy has no SSD tier")
    elif placement.ssd_bytes and hw.ssd_count <= 0:
        placement.problem = (f"host memory: the model state needs {format_bytes(model_state_bytes)}, "
                             f"{format_bytes(available)} is available; give SSDs (--ssd-count) or more host memory")
    elif total_host > available:
        placement.problem = (f"host memory: staging buffers ({format_bytes(placement.staging_bytes)}) and the "
                             f"state kept in host memory exceed the {format_bytes(available)} available")
    elif hw.ssd_capacity and placement.ssd_bytes > hw.ssd_capacity * hw.ssd_count:
        placement.problem = (f"SSD: {format_bytes(placement.ssd_bytes)} of state does not fit "
                             f"{hw.ssd_count} x {format_bytes(hw.ssd_capacity)}")
    return placement
