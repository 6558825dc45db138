"""The simulator program of a whole step: ``build_program``.

Around the plan's own program (``plan.program.program_for``: the ops, the activations'
swaps and recomputations) it adds everything else the step moves: weight fetches, gradient
copies, the optimizer's reads, updates and writes, activations spilled to SSD. Copies to
the device are issued just in time and copies from it waited for once expected done
(``plan.schedule``), on the compute timeline stretched by the plan's recomputations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..plan.problem import Action, Decision, Problem, Rates, effective_first_use
from ..plan.profile import GiB, HardwareProfile
from ..plan.program import program_for
from ..plan.schedule import Inbound, Outbound, just_in_time, op_timeline, release_points
from ..plan.simulate import Alloc, Compute, Free, Issue, Op, Wait
from ..plan.state import STATE_BYTES_PER_PARAM, STREAM_MIN_BYTES
from .layout import Layout
from .placement import (
    ACTIVATION_STAGING_BYTES,
    HOST_RESERVE_FRACTION,
    UPDATE_WINDOW,
    Placement,
    shard_params,
)

CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS/flash workspaces: not in the allocator's count, but on the card


@dataclass
class Design:
    """How a policy runs the step around the activation decisions."""

    stream_weights: bool
    optimizer: str  # "deferred" (lohan) or "after-backward" (the ZeRO baselines)
    prefetch_ahead: int | None = None  # None: just in time
    grad_bytes: int | None = None  # per parameter, in the host tier (None: the weights' dtype)
    serial_optimizer: bool = False  # read, update, write one group after another
    checkpoint_layers: bool = False  # recompute each block's forward in backward
    allow_ssd: bool = True
    state_on_ssd: bool = False  # optimizer state (and its gradients) on NVMe even if host memory could hold them
    # seconds of GPU compute per second the cost model estimates: a baseline's own kernel and
    # framework efficiency, calibrated against its published throughput (1.0: as estimated)
    compute_scale: float = 1.0
    # the host buffers SSD traffic passes through (``placement.place``): "group" (a group's
    # update at a time, UPDATE_WINDOW in flight) or "parameter" (lohan's runtime)
    staging_rule: str = "group"
    # a deferred update writes a weight on SSD there, and the forward's fetch reads it back
    # (lohan's runtime); False: the fetch takes it from the update's staging buffer
    weights_reread: bool = False

    def grad_bytes_for(self, itemsize: int) -> int:
        return itemsize if self.grad_bytes is None else self.grad_bytes


# lohan's runtime, as it runs: gradients leave in the weights' dtype
OURS = Design(stream_weights=True, optimizer="deferred", staging_rule="parameter", weights_reread=True)


def _scaled(problem: Problem, scale: float) -> Problem:
    """``problem`` with every op and recomputation taking ``scale`` times as long."""
    return replace(problem, ops=[replace(o, seconds=o.seconds * scale) for o in problem.ops],
                   candidates=[replace(c, recompute_seconds=c.recompute_seconds * scale)
                               if c.recompute_seconds is not None else c for c in problem.candidates],
                   fw_seconds=problem.fw_seconds * scale, bw_seconds=problem.bw_seconds * scale)


def _fixed_distance(inbound: list[Inbound], ahead: int) -> dict[str, int]:
    """The op before which each copy is issued: ``ahead`` ops before its need, never before its
    floor (a fixed prefetch distance, as the baselines' prefetch buckets do)."""
    return {t.key: max(t.floor, t.need - ahead) for t in inbound}


def _layer_of_name(name: str) -> int | None:
    head, dot, _ = name.partition(".")
    return int(head[1:]) if dot and head.startswith("L") and head[1:].isdigit() else None


def per_rank(hw: HardwareProfile, gpus: int) -> HardwareProfile:
    """One of ``gpus`` data-parallel ranks' share of a server: its own GPU and PCIe link; an equal
    share of the host memory and its bandwidth, of the CPU (the optimizer's rate) and of each
    SSD's bandwidth and capacity."""
    if gpus == 1:
        return hw
    return hw.with_(
        name=f"{hw.name} (1 of {gpus} GPUs)",
        host_memory=hw.host_memory // gpus if hw.host_memory else hw.host_memory,
        host_memory_bandwidth=hw.host_memory_bandwidth / gpus,
        cpu_adam_params_per_s=hw.cpu_adam_params_per_s / gpus,
        ssd_read_bandwidth=hw.ssd_read_bandwidth / gpus, ssd_write_bandwidth=hw.ssd_write_bandwidth / gpus,
        ssd_capacity=hw.ssd_capacity // gpus)


def _reduce_d2h_seconds(gpus: int, hw: HardwareProfile) -> float:
    """Seconds per gradient byte an all-reduce among ``gpus`` devices holds the d2h link (each
    sends 2 (gpus - 1) / gpus of the bytes; none with an interconnect)."""
    if gpus == 1 or hw.interconnect_bandwidth:
        return 0.0
    return 2 * (gpus - 1) / gpus / hw.d2h_bandwidth


def _reduce(name: str, nbytes: int, gpus: int, hw: HardwareProfile) -> list[Op]:
    """A gradient's all-reduce: on the interconnect when the server has one; else through host
    memory, each byte the rank sends crossing its PCIe link out and each it receives in."""
    if gpus == 1:
        return []
    moved = 2 * (gpus - 1) / gpus * nbytes
    if hw.interconnect_bandwidth:
        return [Issue(f"reduce:{name}", "net", moved / hw.interconnect_bandwidth, nbytes=int(moved))]
    return [Issue(f"reduce:{name}:out", "d2h", moved / hw.d2h_bandwidth, nbytes=int(moved)),
            Issue(f"reduce:{name}:in", "h2d", moved / hw.h2d_bandwidth, nbytes=int(moved))]


def _share_updated_weights(group: str, params: int, gpus: int, hw: HardwareProfile) -> list[Op]:
    """The other ranks' updates of ``group`` copied into this rank's host copy of its bf16
    weights: (gpus - 1) / gpus of them read and written in host memory."""
    if gpus == 1:
        return []
    moved = 2 * params * (gpus - 1) / gpus
    return [Issue(f"share:{group}", "cpu", 2 * moved / hw.host_memory_bandwidth, after=(f"update:{group}",))]


def build_program(layout: Layout, decisions: dict[str, Decision], design: Design, placement: Placement,
                  hw: HardwareProfile, gpus: int = 1) -> tuple[list[Op], dict[str, int]]:
    """The simulator program of the step, and the bytes resident per tier when it starts.

    With ``gpus`` data-parallel ranks, the program is one rank's (every rank runs the same one
    at the same time) and ``hw`` is that rank's share of the server (``per_rank``): its own GPU
    and PCIe link, 1/``gpus`` of the host memory, its bandwidth, the CPU and the SSDs. Each
    gradient is all-reduced as backward makes it (over the interconnect, or through host memory
    over the rank's PCIe link when there is none) and the rank copies out its 1/``gpus`` share;
    the rank updates its share of each group's optimizer state; the updated weights then reach
    every rank's own host copy (a copy in host memory, on the CPU queue) before a fetch or an
    upload reads them."""
    problem = layout.problem
    full_recompute_s = layout.full_recompute_s
    if design.compute_scale != 1.0:
        problem = _scaled(problem, design.compute_scale)
        full_recompute_s *= design.compute_scale
    d2h_s_per_byte, h2d_s_per_byte = 1.0 / hw.d2h_bandwidth, 1.0 / hw.h2d_bandwidth
    ssd_read_s_per_byte = 1.0 / max(hw.ssd_read_bandwidth * max(hw.ssd_count, 1), 1e-9)
    ssd_write_s_per_byte = 1.0 / max(hw.ssd_write_bandwidth * max(hw.ssd_count, 1), 1e-9)
    extra: dict[tuple[str, int], list[Op]] = {}

    def at(slot: str, i: int, *ops: Op) -> None:
        extra.setdefault((slot, i), []).extend(ops)

    # the compute timeline the transfers are scheduled on: recomputations run before the first
    # backward op of what they remake; a checkpointed block's forward before its backward
    recompute_before: dict[int, float] = {}
    for c in problem.candidates:
        if decisions[c.key].action is Action.RECOMPUTE:
            recompute_before[c.first_bw_use] = recompute_before.get(c.first_bw_use, 0.0) + (c.recompute_seconds or 0.0)
    if design.checkpoint_layers:
        layer_bw_start: dict[int, int] = {}
        for i in range(problem.n_fw, len(problem.ops)):
            layer = _layer_of_name(problem.ops[i].name)
            if layer is not None and layer not in layer_bw_start:
                layer_bw_start[layer] = i
        for layer, i in layer_bw_start.items():
            recompute_before[i] = recompute_before.get(i, 0.0) + full_recompute_s
            at("recompute", i, Compute(f"recompute:L{layer}", full_recompute_s))
    starts, ends = op_timeline([o.seconds for o in problem.ops], recompute_before)

    streamed = {w.name for w in layout.weights if design.stream_weights and w.bytes >= STREAM_MIN_BYTES}
    resident = {"device": CONTEXT_BYTES + sum(w.bytes for w in layout.weights if w.name not in streamed),
                "host": placement.host_bytes + placement.staging_bytes, "ssd": placement.ssd_bytes}

    # h2d: weights (forward, backward) and swap-ins share the link
    inbound: list[Inbound] = []
    for w in layout.weights:
        if w.name in streamed:
            if w.fw_uses:
                inbound.append(Inbound(f"fetch:{w.name}:fw", w.fw_uses[0], w.bytes * h2d_s_per_byte, floor=0))
            if w.bw_uses:
                inbound.append(Inbound(f"fetch:{w.name}:bw", w.bw_uses[0], w.bytes * h2d_s_per_byte,
                                       floor=problem.n_fw))
    first_use = effective_first_use(problem, decisions)
    swapped = [c for c in problem.candidates if decisions[c.key].action is Action.SWAP]
    # swapped activations live in host memory while there is room beside the model state, on
    # SSD beyond it (through pinned staging buffers)
    room = (int(hw.host_memory * (1 - HOST_RESERVE_FRACTION)) - resident["host"] - ACTIVATION_STAGING_BYTES
            if hw.host_memory else math.inf)
    spilled: set[str] = set()
    for c in sorted(swapped, key=lambda c: c.produced_at):
        if c.bytes <= room:
            room -= c.bytes
        elif design.allow_ssd and hw.ssd_count > 0:
            spilled.add(c.key)
        else:
            room -= c.bytes  # no SSD: the host peak will say it does not fit
    for c in swapped:
        if not decisions[c.key].late_prefetch:
            ssd_read_s = c.bytes * ssd_read_s_per_byte if c.key in spilled else 0.0
            inbound.append(Inbound(f"swap_in:{c.key}", first_use[c.key], c.bytes * h2d_s_per_byte + ssd_read_s,
                                   floor=problem.n_fw))
    if design.prefetch_ahead is None:
        # the link serves the copies in order of need
        issue = just_in_time(starts, sorted(inbound, key=lambda t: (t.need, t.key)))
    else:
        issue = _fixed_distance(inbound, design.prefetch_ahead)
    # d2h: swap-outs and gradients share the link, in the order they are made
    outbound = [Outbound(f"swap_out:{c.key}", c.produced_at, c.bytes * d2h_s_per_byte, c.last_fw_use)
                for c in swapped]
    reduce_s = _reduce_d2h_seconds(gpus, hw)
    outbound += [Outbound(f"grad:{w.name}", w.grad_op, w.bytes * (reduce_s + d2h_s_per_byte / gpus), w.grad_op)
                 for w in layout.weights if w.grad_op is not None]
    release = release_points(ends, sorted(outbound, key=lambda t: (t.made, t.key)), last=len(ends) - 1)
    decisions = dict(decisions)
    for c in swapped:
        d = decisions[c.key]
        # a swap-out is waited for in forward at the latest
        decisions[c.key] = replace(
            d, release_at=c.produced_at if d.early_release else min(release[f"swap_out:{c.key}"], problem.n_fw - 1),
            prefetch_at=first_use[c.key] if d.late_prefetch else issue[f"swap_in:{c.key}"])

    # the optimizer
    updates: dict[str, str] = {}  # group -> its deferred update
    update_at: dict[str, int] = {}  # group -> the op before which its deferred update is issued
    group_params = {group: shard_params(params, gpus) for group, params in layout.groups.items()}

    itemsize = layout.itemsize
    grad_bytes = design.grad_bytes_for(itemsize)

    def ssd_read_bytes(group: str) -> int:
        return group_params[group] * ((STATE_BYTES_PER_PARAM if group in placement.state_ssd else 0)
                                      + (grad_bytes if group in placement.grads_ssd else 0))

    def ssd_write_bytes(group: str) -> int:
        # (the rank's state is its share; its copy of the weights is whole, every rank's updates in it)
        return (group_params[group] * (STATE_BYTES_PER_PARAM if group in placement.state_ssd else 0)
                + layout.groups[group] * (itemsize if group in placement.weights_ssd else 0))

    if design.optimizer == "deferred":
        # each group is updated UPDATE_WINDOW groups ahead of the forward that needs it
        order = [g for g in layout.group_order if g in group_params]
        for position, group in enumerate(order):
            issue_op = layout.first_fw_op.get(order[position - UPDATE_WINDOW], 0) if position >= UPDATE_WINDOW else 0
            update_ops: list[Op] = []
            if position >= 2 * UPDATE_WINDOW:
                reused = order[position - 2 * UPDATE_WINDOW]
                if reused in placement.state_ssd | placement.grads_ssd:
                    update_ops.append(Wait(f"write:{reused}"))  # its staging buffer is reused
            read = ssd_read_bytes(group)
            after: tuple[str, ...] = ()
            if read:
                update_ops.append(Issue(f"read:{group}", "ssd_read", read * ssd_read_s_per_byte, nbytes=read))
                after = (f"read:{group}",)
            update_ops.append(Issue(f"update:{group}", "cpu", group_params[group] / hw.cpu_adam_params_per_s,
                                    after=after))
            write = ssd_write_bytes(group)
            if write:
                update_ops.append(Issue(f"write:{group}", "ssd_write", write * ssd_write_s_per_byte,
                                        after=(f"update:{group}",), nbytes=write))
            share = _share_updated_weights(group, layout.groups[group], gpus, hw)
            at("prefetch", issue_op, *update_ops, *share)
            updates[group] = share[0].name if share else f"update:{group}"
            update_at[group] = issue_op
    else:
        # after backward, every group in order; serial: each waits for the one before
        prev: str | None = None
        optimizer_ops: list[Op] = []
        for group in layout.group_order:
            if group not in group_params:
                continue
            read = ssd_read_bytes(group)
            after = (prev,) if (prev and design.serial_optimizer) else ()
            if read:
                optimizer_ops.append(Issue(f"read:{group}", "ssd_read", read * ssd_read_s_per_byte, after=after,
                                           nbytes=read))
                after = (f"read:{group}",)
            optimizer_ops.append(Issue(f"update:{group}", "cpu", group_params[group] / hw.cpu_adam_params_per_s,
                                       after=after))
            prev = f"update:{group}"
            share = _share_updated_weights(group, layout.groups[group], gpus, hw)
            optimizer_ops.extend(share)
            updated = share[0].name if share else prev
            write = ssd_write_bytes(group)
            if write:
                optimizer_ops.append(Issue(f"write:{group}", "ssd_write", write * ssd_write_s_per_byte, after=(prev,),
                                           nbytes=write))
                prev = f"write:{group}"
            if not design.stream_weights:  # updated weights go back to the device
                optimizer_ops.append(Issue(f"upload:{group}", "h2d", itemsize * layout.groups[group] * h2d_s_per_byte,
                                           after=(updated,), nbytes=itemsize * layout.groups[group]))
                prev = f"upload:{group}" if design.serial_optimizer else prev
        optimizer_ops += [Wait(o.name) for o in optimizer_ops if isinstance(o, Issue)]
        at("release", len(problem.ops) - 1, *optimizer_ops)

    # weights
    for w in layout.weights:
        update = (updates[w.group],) if w.group in updates else ()
        if w.name in streamed:
            for phase, uses in (("fw", w.fw_uses), ("bw", w.bw_uses)):
                if not uses:
                    continue
                name = f"fetch:{w.name}:{phase}"
                fetch_ops: list[Op] = [Alloc(f"w:{w.name}:{phase}", w.bytes)]
                after = update if phase == "fw" else ()  # the forward fetch waits for the group's update
                if phase == "bw" and w.group in placement.weights_ssd:
                    fetch_ops.append(Issue(f"wread:{w.name}", "ssd_read", w.bytes * ssd_read_s_per_byte, nbytes=w.bytes))
                    after = (f"wread:{w.name}",)
                elif phase == "fw" and w.group in placement.weights_ssd and (design.weights_reread or not update):
                    # (read back once its update is written)
                    written = (f"write:{w.group}",) if update and ssd_write_bytes(w.group) else update
                    fetch_ops.append(Issue(f"wread:{w.name}:fw", "ssd_read", w.bytes * ssd_read_s_per_byte,
                                           after=written, nbytes=w.bytes))
                    after = (f"wread:{w.name}:fw",)
                fetch_ops.append(Issue(name, "h2d", w.bytes * h2d_s_per_byte, after=after, nbytes=w.bytes))
                when = max(issue[name], update_at.get(w.group, 0)) if phase == "fw" else issue[name]
                at("prefetch", when, *fetch_ops)
                at("wait", uses[0], Wait(name))
                at("free", uses[-1], Free(f"w:{w.name}:{phase}"))
        elif update and w.fw_uses:
            # a weight kept on the device still receives its update over the link
            name = f"upload:{w.name}"
            at("prefetch", update_at[w.group], Issue(name, "h2d", w.bytes * h2d_s_per_byte, after=update, nbytes=w.bytes))
            at("wait", w.fw_uses[0], Wait(name))
    # gradients leave as they are made; their buffers are counted by these g: allocations
    for w in layout.weights:
        if w.grad_op is None:
            continue
        name = f"grad:{w.name}"
        at("alloc", w.grad_op, Alloc(f"g:{w.name}", w.bytes))
        reduce = _reduce(w.name, w.bytes, gpus, hw)
        at("swap_out", w.grad_op, *reduce,
           Issue(name, "d2h", w.bytes / gpus * d2h_s_per_byte, after=tuple(op.name for op in reduce),
                 nbytes=w.bytes // gpus))
        after_ops: list[Op] = [Wait(name), Free(f"g:{w.name}")]
        if w.group in placement.grads_ssd:
            after_ops.append(Issue(f"gwrite:{w.name}", "ssd_write", w.bytes / gpus * ssd_write_s_per_byte,
                                   nbytes=w.bytes // gpus))
        at("release", release[name], *after_ops)
    # activations spilled to SSD: d2h into a staging buffer, then written; read back, then h2d
    spilled_order = sorted((c for c in swapped if c.key in spilled), key=lambda c: c.produced_at)
    for position, c in enumerate(spilled_order):
        d = decisions[c.key]
        out, back = f"swap_out:{c.key}", f"swap_in:{c.key}"
        at("alloc", c.produced_at, Alloc(c.key, c.bytes))
        at("swap_out", c.produced_at, Alloc(f"stage:{c.key}", c.bytes, "host"),
           Issue(out, "d2h", c.bytes * d2h_s_per_byte, nbytes=c.bytes))
        release_at = max(d.release_at if d.release_at is not None else c.last_fw_use, c.last_fw_use)
        at("release", release_at, Wait(out), Free(c.key),
           Issue(f"ssdw:{c.key}", "ssd_write", c.bytes * ssd_write_s_per_byte, after=(out,), nbytes=c.bytes),
           Alloc(f"ssd:{c.key}", c.bytes, "ssd"))
        # the pinned staging pool is bounded: a buffer is waited for (its write done) once the
        # swaps after it have used the rest of the pool
        reuser, pooled = None, 0
        for later in spilled_order[position + 1:]:
            pooled += later.bytes
            if pooled + c.bytes > ACTIVATION_STAGING_BYTES:
                reuser = later
                break
        written_at = max(reuser.produced_at, release_at) if reuser is not None else problem.n_fw - 1
        at("release", max(written_at, release_at), Wait(f"ssdw:{c.key}"), Free(f"stage:{c.key}"))
        prefetch_at = min(d.prefetch_at if d.prefetch_at is not None else first_use[c.key], first_use[c.key])
        at("prefetch", prefetch_at, Alloc(f"stage_in:{c.key}", c.bytes, "host"),
           Issue(f"ssdr:{c.key}", "ssd_read", c.bytes * ssd_read_s_per_byte, nbytes=c.bytes),
           Alloc(f"dev:{c.key}", c.bytes),
           Issue(back, "h2d", c.bytes * h2d_s_per_byte, after=(f"ssdr:{c.key}",), nbytes=c.bytes))
        at("wait", first_use[c.key], Wait(back), Free(f"stage_in:{c.key}"), Free(f"ssd:{c.key}"))
        at("free", c.last_bw_use, Free(f"dev:{c.key}"))
    # what this program moves itself leaves the plan's problem: gradients, spilled activations
    moved_here = {w.grad_key for w in layout.weights} | spilled
    rest = replace(problem, buffers={k: b for k, b in problem.buffers.items() if k not in moved_here},
                   candidates=[c for c in problem.candidates if c.key not in spilled])
    return program_for(rest, decisions, Rates(d2h_s_per_byte, h2d_s_per_byte), extra), resident
