"""Plan a whole training step of a large model on described hardware, from one traced block.

A 96-layer model is one decoder block repeated. ``trace`` traces a block and
the head (final norm, LM head, loss) once each on the ``meta`` device, as the
target runs them (the GPU's fused attention, the target's dtype), through the
same passes as training; ``WholeStep`` lays the step out as the GPU would run
it: the embedding, every block's forward, the head, every block's backward,
the embedding's backward; and adds, around the compute, everything else the
step moves:

- activations: the planner's keep / swap / recompute decision for each saved
  value of the block, the same in every layer, and for the hidden state
  entering each layer (its "checkpoint");
- weights (``offload_params``): each weight of 1 MiB or more is fetched to the
  device before its first use in forward and again in backward, and freed
  after its last use in each (small ones stay on the device); weights are
  read from host memory, or from SSD when the host cannot hold them;
- gradients: each leaves the device right after backward makes it;
- the optimizer: lohan's exact-clipping design for large models is
  *deferred*: gradients wait in the host tier (or SSD) until backward ends and
  the global norm is known, and each layer is updated at the start of the next
  step's forward, just before its weights are fetched (the fetch waits for its
  update). Optimizer state (fp32 master, two moments: 12 bytes per parameter)
  lives in host memory, spilled to SSD layer by layer beyond it; an update of a
  layer on SSD reads its state ahead, runs on the CPU, and writes it back,
  through pinned staging buffers that are counted in the host tier;
- fixed device costs: the CUDA context and kernel workspaces (``CONTEXT_BYTES``).

Transfers are issued just in time on each link (h2d carries weights and
swap-ins, d2h swap-outs and gradients), computed from the estimated compute
timeline (``plan.schedule``); the simulator (``plan.simulate``) then runs the whole step with every
queue (compute, both PCIe directions, the CPU optimizer, SSD reads and writes)
and reports step time, peaks per tier and exposed waits.

Baselines (``BASELINES``) are modeled from what their systems do, documented
where they are built: ``zero-infinity`` (DeepSpeed ZeRO-3 with parameter and
optimizer offload: every layer checkpointed, its input offloaded to the CPU
synchronously, the rest recomputed; weights fetched one op ahead; the optimizer
step after backward, reading, updating and writing each group one after the
other) and ``zero-offload`` (weights on the device, optimizer on the CPU after
backward, every layer checkpointed).

Throughput is reported as model TFLOPS: 6 x parameters x tokens per step
divided by the step time; recomputation is not counted.

The parts: ``trace`` (the block and the head traced on ``meta``), ``layout`` (the
whole step as one ``Problem``, with its weights), ``placement`` (host memory or SSD
for each group's state), ``program`` (the simulator program of a plan); this module
holds the policies and the baselines (``WholeStep``) and what callers import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..plan.profile import HardwareProfile
from ..plan.policies import recomputable_set
from ..plan.problem import Action, Candidate, Decision, Transfer
from ..plan.simulate import Timeline, simulate
from ..plan.state import STATE_BYTES_PER_PARAM, STREAM_MIN_BYTES
from ..units import format_bytes
from .layout import Layout, Weight, layout
from .placement import (
    ACTIVATION_STAGING_BYTES,
    HOST_RESERVE_FRACTION,
    UPDATE_WINDOW,
    Placement,
    place,
)
from .program import CONTEXT_BYTES, OURS, Design, build_program, per_rank
from .trace import HEAD_CHUNK_BYTES, Part, Traced, trace

__all__ = [
    "ACTIVATION_STAGING_BYTES", "BASELINES", "CONTEXT_BYTES", "HEAD_CHUNK_BYTES", "HOST_RESERVE_FRACTION", "OURS",
    "POLICIES", "STATE_BYTES_PER_PARAM", "STREAM_MIN_BYTES", "UPDATE_WINDOW", "ZERO_INFINITY_COMPUTE_SCALE",
    "Design", "Layout", "Part", "Placement", "StepPlan", "Traced", "Weight", "WholeStep", "build_program",
    "layout", "per_rank", "place", "trace",
]

# ZeRO-Infinity's compute seconds per second our cost model estimates for the same kernels. Not
# assumed but fitted: the one free parameter of the baseline's model, set so that it matches the
# throughput Fuyou's paper publishes for it (45 TFLOPS fine-tuning GPT-3 13B on an RTX 4090
# server) by least squares in log TFLOPS over batch 32, 48 and 64 on the lohan-testbed preset
# (bench/calibrate_zero_infinity.py refits it, setting it on this module). The remainder of what
# makes it slow (synchronous checkpoint copies, fetches one op ahead, the serial optimizer after
# backward) is modeled, not fitted; this factor stands for what is not (ZeRO-3's per-module hooks
# and partitioning, its unfused kernels, the launch gaps around every fetch).
ZERO_INFINITY_COMPUTE_SCALE = 1.31
POLICIES = ("auto", "keep-all", "swap-all", "recompute-all")
BASELINES = ("zero-infinity", "zero-offload")


@dataclass
class StepPlan:
    """A policy's plan of the whole step and its simulated outcome."""

    policy: str
    feasible: bool
    why: str  # why it is infeasible; or what bounds the step
    step_s: float | None = None
    tflops: float | None = None
    peaks: dict[str, int] = field(default_factory=dict)  # tier -> bytes
    traffic: dict[str, int] = field(default_factory=dict)  # link -> bytes moved per step
    busy: dict[str, float] = field(default_factory=dict)  # resource -> seconds busy
    exposed: dict[str, float] = field(default_factory=dict)  # kind of wait -> seconds blocked
    actions: dict[str, str] = field(default_factory=dict)  # block value -> keep/swap/recompute
    offload_params: bool = False
    budget_bytes: int = 0
    placement: Placement | None = None
    timeline: Timeline | None = None

    def to_json(self) -> dict[str, Any]:
        keys = ("policy", "feasible", "why", "step_s", "tflops", "peaks", "traffic", "busy", "exposed", "actions",
                "offload_params", "budget_bytes")
        return {k: getattr(self, k) for k in keys}


def _expand(step_layout: Layout, base_actions: dict[str, Decision]) -> dict[str, Decision]:
    """Each candidate's decision: the one of the block value it is a copy of."""
    return {c.key: base_actions.get(step_layout.base[c.key], Decision(Action.KEEP))
            for c in step_layout.problem.candidates}


def _bases(step_layout: Layout) -> dict[str, list[Candidate]]:
    """Each block value's copies in the step (one per layer)."""
    out: dict[str, list[Candidate]] = {}
    for c in step_layout.problem.candidates:
        out.setdefault(step_layout.base[c.key], []).append(c)
    return out


class WholeStep:
    """Plans of a traced model's whole step on ``hardware`` under ``budget`` device bytes.

    ``gpus``: data-parallel ranks in the server, each running the traced step on its own
    micro-batch (the global batch is ``gpus`` times the traced one) and sharing the server's host
    memory, CPU and SSDs (``per_rank``); the plan and its peaks are one rank's, its TFLOPS the
    server's."""

    def __init__(self, traced: Traced, hardware: HardwareProfile | None = None, budget: int | None = None,
                 gpus: int = 1):
        if gpus < 1:
            raise ValueError(f"gpus must be at least 1, got {gpus}")
        self.traced = traced
        self.gpus = gpus
        self.server = hardware or traced.hardware
        self.hw = per_rank(self.server, gpus)
        self.budget = budget if budget is not None else self.hw.device_memory
        self.lay = layout(traced)
        self.bases = _bases(self.lay)
        self.block_recomputable = recomputable_set(traced.block.problem)

    # one simulation
    def evaluate(self, policy: str, base_actions: dict[str, Decision], design: Design) -> StepPlan:
        keep_free = 0
        for _ in range(2):  # a second placement leaves host room for the swapped activations
            placement = place(self.lay, self.hw, grad_bytes=design.grad_bytes_for(self.lay.itemsize),
                              weight_bytes=self.lay.itemsize, allow_ssd=design.allow_ssd, keep_free=keep_free,
                              state_on_ssd=design.state_on_ssd and self.hw.ssd_count > 0, gpus=self.gpus,
                              staging_rule=design.staging_rule)
            plan = StepPlan(policy, False, "", offload_params=design.stream_weights, budget_bytes=self.budget,
                            placement=placement,
                            actions={k: d.action.value for k, d in sorted(base_actions.items())})
            if placement.problem:
                plan.why = placement.problem
                return plan
            program, resident = build_program(self.lay, _expand(self.lay, base_actions), design, placement, self.hw,
                                              self.gpus)
            timeline = simulate(program, initial=resident)
            if (not self.hw.host_memory or timeline.peaks["host"] <= self.hw.host_memory or keep_free
                    or not design.allow_ssd or self.hw.ssd_count <= 0):
                break
            keep_free = timeline.peaks["host"] - resident["host"]  # the activations swapped to the host
        plan.timeline = timeline
        plan.step_s = timeline.step_seconds
        plan.tflops = (6 * self.traced.spec.active_parameters() * self.traced.tokens * self.gpus
                       / timeline.step_seconds / 1e12)
        plan.peaks = dict(timeline.peaks)
        plan.busy = {r: timeline.busy(r) for r in ("compute", "h2d", "d2h", "cpu", "ssd_read", "ssd_write", "net")}
        plan.traffic = {q: int(timeline.moved.get(q, 0)) for q in ("h2d", "d2h", "net", "ssd_read", "ssd_write")}
        by_name = {iv.name: iv for iv in timeline.intervals}
        for name, seconds in timeline.exposed.items():
            # the plan's swaps are named by Transfer records; the rest of the step's copies by
            # strings "kind:what"
            kind = name.kind if isinstance(name, Transfer) else name.split(":")[0]
            if kind in ("fetch", "upload") and seconds > 0 and isinstance(name, str):
                # a weight that waited for its deferred update: the optimizer held it back
                group = name.split(":")[1].split("/")[0]
                update = by_name.get(f"share:{group}") or by_name.get(f"update:{group}")
                copy = by_name.get(name)
                if (update is not None and copy is not None
                        and abs(copy.start - update.end) <= 1e-9 * max(1.0, update.end)):
                    kind = "update"
            plan.exposed[kind] = plan.exposed.get(kind, 0.0) + seconds
        over = []
        if timeline.peaks["device"] > self.budget:
            over.append(f"device peak {format_bytes(timeline.peaks['device'])} > budget {format_bytes(self.budget)}")
        if self.hw.host_memory and timeline.peaks["host"] > self.hw.host_memory:
            over.append(f"host peak {format_bytes(timeline.peaks['host'])} > {format_bytes(self.hw.host_memory)}")
        plan.feasible = not over
        plan.why = "; ".join(over) if over else self._bottleneck(plan)
        return plan

    def _bottleneck(self, plan: StepPlan) -> str:
        step = plan.step_s or 1.0
        compute = plan.busy["compute"] / step
        if plan.exposed:
            kind, s = max(plan.exposed.items(), key=lambda kv: kv[1])
            if s > 0.02 * step:
                what = {"fetch": "weight fetches (h2d)", "swap_in": "activation swap-ins (h2d)",
                        "swap_out": "activation swap-outs (d2h)", "grad": "gradient copies (d2h)",
                        "update": "the CPU optimizer", "write": "SSD writes", "read": "SSD reads",
                        "upload": "weight uploads (h2d)", "ssdw": "activations written to SSD",
                        "ssdr": "activations read from SSD", "hooks": "framework hooks",
                        "reduce": "gradient all-reduce"}.get(kind, kind)
                return f"compute busy {compute:.0%} of the step; waits on {what}: {s:.2f} s"
        return f"compute-bound: compute busy {compute:.0%} of the step"

    # fixed policies
    def fixed(self, policy: str, design: Design) -> StepPlan:
        decisions: dict[str, Decision] = {}
        for base, copies in self.bases.items():
            if policy == "swap-all":
                action = Action.SWAP if copies[0].swappable else Action.KEEP
            elif policy == "recompute-all":
                action = Action.RECOMPUTE if self._can_recompute(base) else Action.KEEP
            else:
                action = Action.KEEP
            decisions[base] = Decision(action, reason=f"{policy} policy")
        return self.evaluate(policy, decisions, design)

    def _can_recompute(self, base: str) -> bool:
        return base in self.block_recomputable and not base.startswith("head/") and base != "input"

    def auto(self, design: Design = OURS) -> StepPlan:
        """Keep everything, then move the block values alive at the peak, cheapest first (a swap
        costs nothing while the links have room beside compute; beyond, the cheaper of swapping
        and recomputing), re-simulating after each round; the best of this and the fixed
        policies."""
        decisions = {base: Decision(Action.KEEP, reason="fits") for base in self.bases}
        plan = self.evaluate("auto", decisions, design)
        problem = self.lay.problem
        # bytes the links can swap out in forward and back in backward beside compute
        capacity = min(problem.fw_seconds * self.hw.d2h_bandwidth,
                       max(problem.bw_seconds - self._bw_fetch_s(design), 0.0) * self.hw.h2d_bandwidth)
        swapped = 0
        for _ in range(2 * len(self.bases) + 2):
            if plan.feasible or plan.timeline is None:
                break
            need = plan.peaks["device"] - self.budget
            freed, moved = 0, False
            while freed < need:
                # the cheapest move per byte freed, given what this round already moved: swaps are
                # free while the links have room beside compute; beyond, each value gets the
                # cheaper of swapping and recomputing
                best = None
                for base, copies in self.bases.items():
                    nbytes = sum(c.bytes for c in copies)
                    if decisions[base].action is not Action.KEEP or nbytes <= 0:
                        continue
                    recompute_cost = (sum(c.recompute_seconds or 0.0 for c in copies)
                                      if self._can_recompute_now(base, decisions) else math.inf)
                    swap_cost = math.inf
                    if copies[0].swappable:
                        beyond = max(0.0, swapped + nbytes - capacity) - max(0.0, swapped - capacity)
                        swap_cost = beyond * (1 / self.hw.d2h_bandwidth + 1 / self.hw.h2d_bandwidth)
                    if swap_cost == math.inf and recompute_cost == math.inf:
                        continue
                    if swap_cost <= recompute_cost:
                        # among free swaps, the values most costly to recompute first
                        rank = (swap_cost / nbytes,
                                -(recompute_cost / nbytes if recompute_cost < math.inf else math.inf))
                        option = (rank, base, Action.SWAP, nbytes)
                    else:
                        option = ((recompute_cost / nbytes, 0.0), base, Action.RECOMPUTE, nbytes)
                    if best is None or option[0] < best[0]:
                        best = option
                if best is None:
                    break
                _, base, action, nbytes = best
                decisions[base] = Decision(action, reason="alive at the peak")
                swapped += nbytes if action is Action.SWAP else 0
                freed += nbytes
                moved = True
            if not moved:
                break
            plan = self.evaluate("auto", decisions, design)
        plans = [plan] + [self.fixed(f, design) for f in ("swap-all", "recompute-all")]
        plans.append(self.checkpointed(design))
        feasible = [q for q in plans if q.feasible]
        if not feasible:
            return min(plans, key=lambda q: q.peaks.get("device", math.inf))
        best = min(feasible, key=lambda q: q.step_s)
        best.policy = "auto"
        return best

    def _can_recompute_now(self, base: str, decisions: dict[str, Decision]) -> bool:
        """Recomputable, and neither reading nor read by a value already recomputed."""
        if not self._can_recompute(base):
            return False
        block = self.traced.block.problem
        if any(decisions.get(n, Decision(Action.KEEP)).action is Action.RECOMPUTE
               for n in block.candidate(base).recompute_needs):
            return False
        return not any(
            d.action is Action.RECOMPUTE and base in block.candidate(k).recompute_needs
            for k, d in decisions.items() if k in self.block_recomputable
        )

    def _bw_fetch_s(self, design: Design) -> float:
        """Seconds the h2d link spends fetching weights in backward."""
        if not design.stream_weights:
            return 0.0
        streamed = sum(w.bytes for w in self.lay.weights if w.bw_uses and w.bytes >= STREAM_MIN_BYTES)
        return streamed / self.hw.h2d_bandwidth

    def checkpointed(self, design: Design = OURS) -> StepPlan:
        """Each block's input swapped out (its checkpoint) and the block's forward recomputed in
        backward: the least device memory, for models whose activations do not fit the host
        either; with lohan's weight streaming, just-in-time prefetch and deferred optimizer."""
        decisions = {}
        for base in self.bases:
            if base == "input":
                decisions[base] = Decision(Action.SWAP, reason="block checkpoint, swapped")
            elif base.startswith("head/"):
                decisions[base] = Decision(Action.KEEP, reason="head: kept chunk by chunk")
            else:
                decisions[base] = Decision(Action.RECOMPUTE, reason="recomputed with its block")
        return self._with_block_recompute("checkpoint", decisions, replace(design, checkpoint_layers=True))

    # the baselines
    def zero_infinity(self) -> StepPlan:
        """DeepSpeed ZeRO-Infinity (stage 3, parameters and optimizer offloaded): every block
        checkpointed with its input copied to the CPU synchronously (``cpu_checkpointing``) and
        brought back when its backward starts; the rest of the block recomputed; weights fetched
        one op before use (its prefetch bucket), from the CPU or NVMe; fp32 gradients on the
        host, written to NVMe with the optimizer state (what makes it ZeRO-Infinity rather than
        ZeRO-Offload; on a machine without SSDs, in host memory); the step after backward, each group's
        NVMe read, CPU update and write one after the other (DeepSpeed's default without
        pipeline_read/pipeline_write)."""
        decisions = {}
        for base in self.bases:
            if base == "input":
                decisions[base] = Decision(Action.SWAP, early_release=True, late_prefetch=True,
                                           reason="checkpoint offloaded")
            elif base.startswith("head/"):
                decisions[base] = Decision(Action.KEEP, reason="not checkpointed")
            else:
                decisions[base] = Decision(Action.RECOMPUTE, reason="recomputed with its block")
        design = Design(stream_weights=True, optimizer="after-backward", prefetch_ahead=1, grad_bytes=4,
                        serial_optimizer=True, checkpoint_layers=True, state_on_ssd=True,
                        compute_scale=ZERO_INFINITY_COMPUTE_SCALE)
        return self._with_block_recompute("zero-infinity", decisions, design)

    def zero_offload(self) -> StepPlan:
        """DeepSpeed ZeRO-Offload (stage 2, optimizer offloaded to the CPU): weights on the device,
        every block checkpointed (inputs kept on the device), fp32 gradients copied to the host
        in backward, the CPU optimizer after backward and the updated weights copied back; no
        NVMe tier."""
        decisions = {}
        for base in self.bases:
            if base == "input" or base.startswith("head/"):
                decisions[base] = Decision(Action.KEEP, reason="checkpoint" if base == "input" else "not checkpointed")
            else:
                decisions[base] = Decision(Action.RECOMPUTE, reason="recomputed with its block")
        design = Design(stream_weights=False, optimizer="after-backward", grad_bytes=4, serial_optimizer=False,
                        checkpoint_layers=True, allow_ssd=False)
        return self._with_block_recompute("zero-offload", decisions, design)

    def _with_block_recompute(self, policy: str, decisions: dict[str, Decision], design: Design) -> StepPlan:
        # a checkpointed block recomputes its whole forward (Design.checkpoint_layers), not value
        # by value: the per-value recomputation costs are zeroed for this plan
        saved = self.lay.problem.candidates
        self.lay.problem.candidates = [
            replace(c, recompute_seconds=0.0, recompute_needs=()) if self.lay.base[c.key] in decisions
            and decisions[self.lay.base[c.key]].action is Action.RECOMPUTE else c for c in saved]
        try:
            return self.evaluate(policy, decisions, design)
        finally:
            self.lay.problem.candidates = saved

    def plan(self, policy: str = "auto", offload_params: Any = "auto") -> StepPlan:
        """The plan of ``policy`` (``POLICIES`` or ``BASELINES``). ``offload_params``: stream the
        weights (True), keep them on the device (False), or "auto": keep them if that fits."""
        if policy in BASELINES and self.gpus > 1:
            raise ValueError(f"the {policy} baseline is modeled on one GPU only; plan it with gpus=1")
        if policy == "zero-infinity":
            return self.zero_infinity()
        if policy == "zero-offload":
            return self.zero_offload()
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; policies: {', '.join(POLICIES + BASELINES)}")
        designs = {True: OURS, False: replace(OURS, stream_weights=False)}
        tries = [designs[False], designs[True]] if offload_params == "auto" else [designs[bool(offload_params)]]
        result = None
        for design in tries:
            result = self.auto(design) if policy == "auto" else self.fixed(policy, design)
            if result.feasible:
                return result
        return result
