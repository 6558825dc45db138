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
timeline; the simulator (simulate.py) then runs the whole step with every
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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import BudgetError
from .hardware import HardwareProfile, resolve
from .options import format_bytes
from .planner import Action, Decision, Rates, _recomputable_set, program_for
from .problem import Buffer, Candidate, OpInfo, Problem
from .simulate import Alloc, Compute, Free, Issue, Op, Timeline, Wait, simulate
from .zoo import Block, Head, ModelSpec

GiB = 2**30
CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS/flash workspaces: not in the allocator's count, but on the card
STREAM_MIN_BYTES = 1 << 20  # weights under 1 MiB (norms, biases) stay on the device, as LoHan does
STATE_BYTES_PER_PARAM = 12  # fp32 master weight, first and second moments
HOST_RESERVE_FRACTION = 0.05  # host memory left to the OS, Python, the framework
UPDATE_WINDOW = 2
HEAD_CHUNK_BYTES = 1 * GiB
# ZeRO-Infinity's compute seconds per second our cost model estimates for the same kernels. Not
# assumed but fitted: the one free parameter of the baseline's model, set so that it matches the
# throughput Fuyou's paper publishes for it (45 TFLOPS fine-tuning GPT-3 13B on an RTX 4090
# server) by least squares in log TFLOPS over batch 32, 48 and 64 on the lohan-testbed preset
# (bench/calibrate_zero_infinity.py refits it). The remainder of what makes it slow (synchronous
# checkpoint copies, fetches one op ahead, the serial optimizer after backward) is modeled, not
# fitted; this factor stands for what is not (ZeRO-3's per-module hooks and partitioning, its
# unfused kernels, the launch gaps around every fetch).
ZERO_INFINITY_COMPUTE_SCALE = 1.31
ACTIVATION_STAGING_BYTES = 8 * GiB  # pinned host buffers that activations going to or from SSD pass through  # the LM head's fp32 logits per chunk of tokens  # deferred updates run this many layers ahead of the forward
POLICIES = ("auto", "keep-all", "swap-all", "recompute-all")
BASELINES = ("zero-infinity", "zero-offload")


# -- tracing --------------------------------------------------------------------------


@dataclass
class Part:
    """A traced module (the block, the head): its planning problem and the flows across its edges."""

    problem: Problem
    x_index: int  # example-input index of the hidden state it reads
    y_key: str | None  # forward buffer of the hidden state it returns (None: the head)
    dx_key: str  # buffer of the gradient of its input
    tangent_keys: tuple[str, ...]
    seconds_fw: float
    trace_s: float


def _part(module: torch.nn.Module, args: tuple, hw: HardwareProfile, loss_fn) -> Part:
    from .explain import explain

    start = time.perf_counter()
    report = explain(module, *args, loss_fn=loss_fn, hardware=hw, policy="keep-all")
    graphs = [g for g in report.graphs if g.pass_report("plan_memory")]
    if len(graphs) != 1:
        raise RuntimeError(f"expected one training graph for {type(module).__name__}, got {len(graphs)}")
    p: Problem = graphs[0].pass_report("plan_memory")["problem"]
    x_index = next(i for i in p.input_uses if i not in p.params and i in p.grad_key)
    bw_names = {o.name for o in p.ops[p.n_fw:]}
    tangents = tuple(k for k, b in p.buffers.items()
                     if k.startswith("bw:") and b.alloc == p.n_fw and k[3:] not in bw_names)
    fw_out = [k for k, b in p.buffers.items() if k.startswith("fw:") and b.free is None]
    y_key = max(fw_out, key=lambda k: p.buffers[k].bytes) if fw_out else None
    return Part(p, x_index, y_key, p.grad_key[x_index], tangents, p.fw_seconds, time.perf_counter() - start)


@dataclass
class Traced:
    spec: ModelSpec
    batch: int
    seq: int
    dtype: torch.dtype
    hardware: HardwareProfile
    block: Part
    head: Part
    head_chunks: int = 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def trace(spec: ModelSpec, batch: int, seq: int, hardware: Any = "rtx4090",
          dtype: torch.dtype = torch.bfloat16) -> Traced:
    """Trace one block and the head of ``spec`` on the meta device (seconds, no memory)."""
    hw = resolve(hardware)
    torch._dynamo.reset()
    with torch.device("meta"):
        block = Block(spec).to(dtype)
        head = Head(spec).to(dtype)
    x = torch.empty(batch, seq, spec.hidden, device="meta", dtype=dtype, requires_grad=True)
    b = _part(block, (x,), hw, lambda y: y.float().sum())
    tokens = batch * seq
    chunks = next(k for k in range(1, tokens + 1)
                  if tokens % k == 0 and (tokens // k) * spec.vocab * 4 <= HEAD_CHUNK_BYTES or k == tokens)
    xh = torch.empty(1, tokens // chunks, spec.hidden, device="meta", dtype=dtype, requires_grad=True)
    labels = torch.zeros(1, tokens // chunks, dtype=torch.long, device="meta")
    h = _part(head, (xh, labels), hw, lambda loss: loss)
    torch._dynamo.reset()
    return Traced(spec, batch, seq, dtype, hw, b, h, chunks)


# -- the step's layout ---------------------------------------------------------------


@dataclass
class Weight:
    name: str
    group: str  # the optimizer group it belongs to (a layer, "embed", "head")
    bytes: int
    params: int
    fw_uses: list[int]
    bw_uses: list[int]
    grad_op: int | None
    grad_key: str | None
    streamed: bool = False


@dataclass
class Layout:
    """The whole step as one ``Problem`` (ops of every layer, candidates per layer), and the
    weights and gradients around it. ``base`` maps each candidate to the decision it shares:
    the block's saved value it is a copy of (the same decision in every layer)."""

    problem: Problem
    base: dict[str, str]
    weights: list[Weight]
    layer_of_op: list[int | None]  # the block a forward op belongs to (None: embedding, head)
    groups: dict[str, int]  # optimizer group -> parameters
    group_order: list[str]  # the order the forward needs the groups
    first_fw_op: dict[str, int]  # group -> its first forward op
    full_recompute_s: float  # one block's forward (what a checkpointed layer recomputes)


def layout(t: Traced) -> Layout:
    spec, blk, hd = t.spec, t.block.problem, t.head.problem
    L = spec.layers
    nf_b, nb_b = blk.n_fw, len(blk.ops) - blk.n_fw
    nf_h, nb_h = hd.n_fw, len(hd.ops) - hd.n_fw
    ops: list[OpInfo] = []
    layer_of: list[int | None] = []
    emb_bytes = t.tokens * spec.hidden * torch.finfo(t.dtype).bits // 8
    emb_s = 3 * emb_bytes / t.hardware.memory_bandwidth + t.hardware.op_overhead_s
    ops.append(OpInfo("embedding", emb_s, "fw"))
    layer_of.append(None)
    for l in range(L):
        ops.extend(OpInfo(f"L{l}.{o.name}", o.seconds, "fw") for o in blk.ops[:nf_b])
        layer_of.extend([l] * nf_b)
    # the head runs chunk by chunk (forward and backward of each chunk of tokens together), so
    # its fp32 logits never exist for the whole batch at once
    n_fw = len(ops)
    h0 = len(ops)
    K = t.head_chunks
    for k in range(K):
        ops.extend(OpInfo(f"head{k}.{o.name}", o.seconds, o.phase) for o in hd.ops)
    layer_of.extend([None] * (K * len(hd.ops)))
    b0 = len(ops)
    for l in reversed(range(L)):
        ops.extend(OpInfo(f"L{l}.{o.name}", o.seconds, "bw") for o in blk.ops[nf_b:])
    ops.append(OpInfo("embedding_backward", 2 * emb_s, "bw"))
    layer_of.extend([None] * (len(ops) - len(layer_of)))

    def at_block(l: int, i: int) -> int:
        return 1 + l * nf_b + i if i < nf_b else b0 + (L - 1 - l) * nb_b + (i - nf_b)

    def at_head(k: int, i: int) -> int:
        return h0 + k * len(hd.ops) + i

    buffers: dict[str, Buffer] = {}
    candidates: list[Candidate] = []
    base: dict[str, str] = {}

    def copy_part(p: Problem, part: Part, prefix: str, at, skip: set[str]) -> None:
        for k, b in p.buffers.items():
            if k in skip or k in part.tangent_keys:
                continue
            free = None if b.free is None else at(b.free)
            buffers[prefix + k] = Buffer(prefix + k, b.bytes, at(b.alloc), free)
        for c in p.candidates:
            key = prefix + c.key
            candidates.append(replace(
                c, key=key, name=prefix + c.name, produced_at=at(c.produced_at), last_fw_use=at(c.last_fw_use),
                first_bw_use=at(c.first_bw_use), last_bw_use=at(c.last_bw_use),
                recompute_needs=tuple(prefix + n for n in c.recompute_needs)))
            base[key] = ("head/" if prefix.startswith("head") else "") + c.key

    for l in range(L):
        copy_part(blk, t.block, f"L{l}/", lambda i, l=l: at_block(l, i), set())
    for k in range(K):
        copy_part(hd, t.head, f"head{k}/", lambda i, k=k: at_head(k, i), set())
    for c in candidates:
        if c.key.startswith("head"):  # used right after it is made, chunk by chunk: kept
            object.__setattr__(c, "swappable", False)
            object.__setattr__(c, "recompute_seconds", None)
    for k in range(K - 1):  # a chunk's weight gradient is summed into the next chunk's
        for idx, key in hd.grad_key.items():
            if idx in hd.params:
                buffers[f"head{k}/{key}"].free = at_head(k + 1, hd.grad_at[idx])

    # hidden states flowing forward: each layer's output is the next one's input (its checkpoint)
    x_uses_b = blk.input_uses.get(t.block.x_index, [])
    x_uses_h = hd.input_uses.get(t.head.x_index, [])
    buffers["embed/out"] = Buffer("embed/out", emb_bytes, 0, None)
    producers = ["embed/out"] + [f"L{l}/{t.block.y_key}" for l in range(L)]
    for l, key in enumerate(producers):
        uses = [at_block(l, i) for i in x_uses_b] if l < L else [at_head(k, i) for k in range(K) for i in x_uses_h]
        n_fw_here = n_fw
        fw_u = [u for u in uses if u < n_fw_here]
        bw_u = [u for u in uses if u >= n_fw_here]
        buffers[key].free = max(uses)
        if bw_u and fw_u:
            candidates.append(Candidate(
                key=key, name=key, bytes=buffers[key].bytes, produced_at=buffers[key].alloc,
                last_fw_use=max(fw_u), first_bw_use=min(bw_u), last_bw_use=max(bw_u), recompute_seconds=None))
            base[key] = "input" if l < L else "head/input"
    # gradients of hidden states flowing backward: each one dies after the layer below used it
    tan_last_b = max((blk.buffers[k].free or 0) for k in t.block.tangent_keys)
    for k in range(K):
        buffers[f"head{k}/{t.head.dx_key}"].free = at_block(L - 1, tan_last_b)
    for l in range(L):
        key = f"L{l}/{t.block.dx_key}"
        buffers[key].free = at_block(l - 1, tan_last_b) if l > 0 else len(ops) - 1

    weights: list[Weight] = []
    groups: dict[str, int] = {}
    first_fw: dict[str, int] = {}
    itemsize = torch.finfo(t.dtype).bits // 8

    def add_weights(p: Problem, group: str, prefix: str, at) -> None:
        for idx in p.params:
            nbytes = p.input_bytes[idx]
            n = nbytes // itemsize
            uses = [at(i) for i in p.input_uses.get(idx, [])]
            g = p.grad_at.get(idx)
            # a tied LM head is the embedding's weight: one set of optimizer state, its two
            # gradients summed on the host
            grp = "embed" if spec.tied and group == "head" and n == spec.vocab * spec.hidden else group
            weights.append(Weight(
                f"{prefix}{idx}", grp, nbytes, n,
                [u for u in uses if u < n_fw], [u for u in uses if u >= n_fw],
                None if g is None else at(g), None if g is None else prefix + p.grad_key[idx]))
            if grp == group:
                groups[group] = groups.get(group, 0) + n
            first_fw[grp] = min([first_fw.get(grp, len(ops))] + [u for u in uses if u < n_fw])

    # the embedding: looked up at the start, its gradient made at the very end
    n_emb = spec.embedding_params()
    weights.append(Weight("embed", "embed", n_emb * itemsize, n_emb, [0], [len(ops) - 1], len(ops) - 1, "embed/grad"))
    buffers["embed/grad"] = Buffer("embed/grad", n_emb * itemsize, len(ops) - 1, None)
    groups["embed"] = n_emb
    first_fw["embed"] = 0
    for l in range(L):
        add_weights(blk, f"L{l}", f"L{l}/", lambda i, l=l: at_block(l, i))
    add_weights(hd, "head", f"head{K - 1}/", lambda i: at_head(K - 1, i))
    head_ws = [w for w in weights if w.name.startswith(f"head{K - 1}/")]
    for w in head_ws:  # every chunk reads the head's weights
        idx = int(w.name.rsplit("/", 1)[1])
        uses = sorted(at_head(k, i) for k in range(K) for i in hd.input_uses.get(idx, []))
        w.fw_uses, w.bw_uses = [], uses
    for w in weights:  # gradient buffers leave the device through the offload, not at a planned free
        if w.grad_key in buffers:
            buffers[w.grad_key].free = None
    order = ["embed"] + [f"L{l}" for l in range(L)] + ["head"]
    problem = Problem(ops=ops, n_fw=n_fw, buffers=buffers, candidates=candidates,
                      fw_seconds=sum(o.seconds for o in ops[:n_fw]), bw_seconds=sum(o.seconds for o in ops[n_fw:]))
    return Layout(problem, base, weights, layer_of, {g: n for g, n in groups.items() if n}, order, first_fw,
                  full_recompute_s=t.block.seconds_fw)


# -- where the model state lives -------------------------------------------------------


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


def place(lay: Layout, hw: HardwareProfile, *, grad_bytes: int = 2, weight_bytes: int = 2,
          state_bytes: int = STATE_BYTES_PER_PARAM, allow_ssd: bool = True, keep_free: int = 0,
          state_on_ssd: bool = False) -> Placement:
    """Host memory first, in the order the step touches the bytes most (weights: fetched twice per
    step; gradients; optimizer state), one group at a time; the rest on SSD. ``keep_free``:
    host bytes left for what the step itself puts there (swapped activations)."""
    full = max(int((hw.host_memory or 0) * (1 - HOST_RESERVE_FRACTION)) - keep_free, 0)
    staging = 0
    for _ in range(3):  # the staging buffers the SSD traffic needs come out of the same memory
        cap = max(full - staging, 0)
        pl = Placement(host_capacity=full)
        used = 0
        for per, where, forced in ((weight_bytes, pl.weights_ssd, False), (grad_bytes, pl.grads_ssd, state_on_ssd),
                                   (state_bytes, pl.state_ssd, state_on_ssd)):
            for g in lay.group_order:
                n = lay.groups.get(g, 0) * per
                if n and used + n <= cap and not forced:
                    used += n
                elif n:
                    where.add(g)
                    pl.ssd_bytes += n
        pl.host_bytes = used
        biggest = max((lay.groups.get(g, 0) * (state_bytes + grad_bytes + weight_bytes) for g in lay.group_order
                       if g in pl.state_ssd | pl.grads_ssd | pl.weights_ssd), default=0)
        pl.staging_bytes = 2 * UPDATE_WINDOW * biggest
        if pl.staging_bytes <= staging:
            break
        staging = pl.staging_bytes
    total_host = pl.host_bytes + pl.staging_bytes
    cap = full
    if pl.ssd_bytes and not allow_ssd:
        pl.problem = (f"host memory: the model state needs {format_bytes(pl.host_bytes + pl.ssd_bytes)} in the "
                      f"host tier, {format_bytes(cap)} is available, and this policy has no SSD tier")
    elif pl.ssd_bytes and hw.ssd_count <= 0:
        pl.problem = (f"host memory: the model state needs {format_bytes(pl.host_bytes + pl.ssd_bytes)}, "
                      f"{format_bytes(cap)} is available; give SSDs (--ssd-count) or more host memory")
    elif total_host > cap:
        pl.problem = (f"host memory: staging buffers ({format_bytes(pl.staging_bytes)}) and the state kept in "
                      f"host memory exceed the {format_bytes(cap)} available")
    elif hw.ssd_capacity and pl.ssd_bytes > hw.ssd_capacity * hw.ssd_count:
        pl.problem = (f"SSD: {format_bytes(pl.ssd_bytes)} of state does not fit "
                      f"{hw.ssd_count} x {format_bytes(hw.ssd_capacity)}")
    return pl


# -- scheduling ---------------------------------------------------------------------


def _starts_ends(p: Problem, extra_s: dict[int, float]) -> tuple[list[float], list[float]]:
    starts, ends, now = [], [], 0.0
    for i, op in enumerate(p.ops):
        now += extra_s.get(i, 0.0)
        starts.append(now)
        now += op.seconds
        ends.append(now)
    return starts, ends


def _just_in_time(starts: list[float], transfers: list[tuple[str, int, float, int]], ahead: int | None) -> dict[str, int]:
    """Issue op of each h2d transfer (name, needed before op, seconds, earliest op): as late as the
    link allows, walking back from the last need (one transfer at a time); or ``ahead`` ops
    before the need (a fixed prefetch distance, as the baselines do)."""
    out: dict[str, int] = {}
    if ahead is not None:
        for name, need, _, earliest in transfers:
            out[name] = max(earliest, need - ahead)
        return out
    next_start = math.inf
    for name, need, sec, earliest in sorted(transfers, key=lambda t: (t[1], t[0]), reverse=True):
        end = min(starts[need], next_start)
        begin = end - sec
        next_start = begin
        at = need
        while at > earliest and starts[at - 1] >= begin:
            at -= 1
        if at > earliest and starts[at] > begin:
            at -= 1  # one op of slack: estimates are not exact
        out[name] = at
    return out


def _release_points(ends: list[float], copies: list[tuple[str, int, float, int]]) -> dict[str, int]:
    """Op after which each d2h copy (name, made at op, seconds, not before op) is waited for: when
    it should be done, the link serving copies in the order they were made."""
    out: dict[str, int] = {}
    free_at = 0.0
    last = len(ends) - 1
    for name, made, sec, not_before in sorted(copies, key=lambda c: (c[1], c[0])):
        done = max(ends[made], free_at) + sec
        free_at = done
        r = max(made, not_before)
        while r < last and ends[r] < done:
            r += 1
        out[name] = r
    return out


# -- programs ------------------------------------------------------------------------


@dataclass
class Design:
    """How a policy runs the step around the activation decisions."""

    stream_weights: bool
    optimizer: str  # "deferred" (lohan) or "after-backward" (the ZeRO baselines)
    prefetch_ahead: int | None = None  # None: just in time
    grad_bytes: int = 2  # per parameter, in the host tier
    serial_optimizer: bool = False  # read, update, write one group after another
    checkpoint_layers: bool = False  # recompute each block's forward in backward
    allow_ssd: bool = True
    state_on_ssd: bool = False  # optimizer state (and its gradients) on NVMe even if host memory could hold them
    # seconds of GPU compute per second the cost model estimates: a baseline's own kernel and
    # framework efficiency, calibrated against its published throughput (1.0: as estimated)
    compute_scale: float = 1.0


OURS = Design(stream_weights=True, optimizer="deferred")


def build_program(lay: Layout, decisions: dict[str, Decision], design: Design, pl: Placement,
                  hw: HardwareProfile) -> tuple[list[Op], dict[str, int]]:
    """The simulator program of the step, and the bytes resident per tier when it starts."""
    p = lay.problem
    full_recompute_s = lay.full_recompute_s
    if design.compute_scale != 1.0:
        k = design.compute_scale
        p = replace(p, ops=[replace(o, seconds=o.seconds * k) for o in p.ops],
                    candidates=[replace(c, recompute_seconds=c.recompute_seconds * k)
                                if c.recompute_seconds is not None else c for c in p.candidates],
                    fw_seconds=p.fw_seconds * k, bw_seconds=p.bw_seconds * k)
        full_recompute_s *= k
    d2h_pb, h2d_pb = 1.0 / hw.d2h_bandwidth, 1.0 / hw.h2d_bandwidth
    ssd_r = 1.0 / max(hw.ssd_read_bandwidth * max(hw.ssd_count, 1), 1e-9)
    ssd_w = 1.0 / max(hw.ssd_write_bandwidth * max(hw.ssd_count, 1), 1e-9)
    extra: dict[tuple[str, int], list[Op]] = {}

    def at(slot: str, i: int, *ops: Op) -> None:
        extra.setdefault((slot, i), []).extend(ops)

    extra_s: dict[int, float] = {}
    cands = {c.key: c for c in p.candidates}
    for c in p.candidates:
        if decisions[c.key].action is Action.RECOMPUTE:
            extra_s[c.first_bw_use] = extra_s.get(c.first_bw_use, 0.0) + (c.recompute_seconds or 0.0)
    layer_bw_start: dict[int, int] = {}
    for i in range(p.n_fw, len(p.ops)):
        l = _layer_of_name(p.ops[i].name)
        if l is not None and l not in layer_bw_start:
            layer_bw_start[l] = i
    if design.checkpoint_layers:
        for l, i in layer_bw_start.items():
            extra_s[i] = extra_s.get(i, 0.0) + full_recompute_s
            at("recompute", i, Compute(f"recompute:L{l}", full_recompute_s))
    starts, ends = _starts_ends(p, extra_s)

    streamed = {w.name for w in lay.weights if design.stream_weights and w.bytes >= STREAM_MIN_BYTES}
    resident = {"device": CONTEXT_BYTES + sum(w.bytes for w in lay.weights if w.name not in streamed),
                "host": pl.host_bytes + pl.staging_bytes, "ssd": pl.ssd_bytes}

    # h2d: weights (forward, backward) and swap-ins share the link, issued just in time
    h2d: list[tuple[str, int, float, int]] = []
    for w in lay.weights:
        if w.name in streamed:
            if w.fw_uses:
                h2d.append((f"fetch:{w.name}:fw", w.fw_uses[0], w.bytes * h2d_pb, 0))
            if w.bw_uses:
                h2d.append((f"fetch:{w.name}:bw", w.bw_uses[0], w.bytes * h2d_pb, p.n_fw))
    first_use = {c.key: c.first_bw_use for c in p.candidates}
    for c in p.candidates:
        if decisions[c.key].action is Action.RECOMPUTE:
            for need in c.recompute_needs:
                first_use[need] = min(first_use[need], first_use[c.key])
    swapped = [c for c in p.candidates if decisions[c.key].action is Action.SWAP]
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
            extra_read = c.bytes * ssd_r if c.key in spilled else 0.0
            h2d.append((f"swap_in:{c.key}", first_use[c.key], c.bytes * h2d_pb + extra_read, p.n_fw))
    issue = _just_in_time(starts, h2d, design.prefetch_ahead)
    d2h = [(f"swap_out:{c.key}", c.produced_at, c.bytes * d2h_pb, c.last_fw_use) for c in swapped]
    d2h += [(f"grad:{w.name}", w.grad_op, w.bytes * d2h_pb, w.grad_op) for w in lay.weights if w.grad_op is not None]
    release = _release_points(ends, d2h)
    decisions = dict(decisions)
    for c in swapped:
        d = decisions[c.key]
        decisions[c.key] = replace(
            d, release_at=c.produced_at if d.early_release else min(release[f"swap_out:{c.key}"], p.n_fw - 1),
            prefetch_at=first_use[c.key] if d.late_prefetch else issue[f"swap_in:{c.key}"])

    # the optimizer
    updates: dict[str, str] = {}
    chain_op: dict[str, int] = {}  # where each group's deferred update is issued
    group_params = lay.groups
    if design.optimizer == "deferred":
        order = [g for g in lay.group_order if g in group_params]
        for k, g in enumerate(order):
            n = group_params[g]
            issue_op = lay.first_fw_op.get(order[k - UPDATE_WINDOW], 0) if k >= UPDATE_WINDOW else 0
            ops: list[Op] = []
            if k >= 2 * UPDATE_WINDOW and order[k - 2 * UPDATE_WINDOW] in pl.state_ssd | pl.grads_ssd:
                ops.append(Wait(f"write:{order[k - 2 * UPDATE_WINDOW]}"))  # its staging buffer is reused
            read = n * ((STATE_BYTES_PER_PARAM if g in pl.state_ssd else 0) + (design.grad_bytes if g in pl.grads_ssd else 0))
            after: tuple[str, ...] = ()
            if read:
                ops.append(Issue(f"read:{g}", "ssd_read", read * ssd_r))
                after = (f"read:{g}",)
            ops.append(Issue(f"update:{g}", "cpu", n / hw.cpu_adam_params_per_s, after=after))
            write = n * ((STATE_BYTES_PER_PARAM if g in pl.state_ssd else 0) + (2 if g in pl.weights_ssd else 0))
            if write:
                ops.append(Issue(f"write:{g}", "ssd_write", write * ssd_w, after=(f"update:{g}",)))
            at("prefetch", issue_op, *ops)
            updates[g] = f"update:{g}"
            chain_op[g] = issue_op
    else:
        last = len(p.ops) - 1
        prev: str | None = None
        ops = []
        for g in lay.group_order:
            if g not in group_params:
                continue
            n = group_params[g]
            read = n * ((STATE_BYTES_PER_PARAM if g in pl.state_ssd else 0) + (design.grad_bytes if g in pl.grads_ssd else 0))
            after = (prev,) if (prev and design.serial_optimizer) else ()
            if read:
                ops.append(Issue(f"read:{g}", "ssd_read", read * ssd_r, after=after))
                after = (f"read:{g}",)
            ops.append(Issue(f"update:{g}", "cpu", n / hw.cpu_adam_params_per_s, after=after))
            prev = f"update:{g}"
            write = n * ((STATE_BYTES_PER_PARAM if g in pl.state_ssd else 0) + (2 if g in pl.weights_ssd else 0))
            if write:
                ops.append(Issue(f"write:{g}", "ssd_write", write * ssd_w, after=(prev,)))
                prev = f"write:{g}"
            if not design.stream_weights:  # updated weights go back to the device
                ops.append(Issue(f"upload:{g}", "h2d", 2 * n * h2d_pb, after=(f"update:{g}",)))
                prev = f"upload:{g}" if design.serial_optimizer else prev
        ops += [Wait(o.name) for o in ops if isinstance(o, Issue)]
        at("release", last, *ops)

    # weights
    for w in lay.weights:
        upd = (updates[w.group],) if w.group in updates else ()
        if w.name in streamed:
            for phase, uses in (("fw", w.fw_uses), ("bw", w.bw_uses)):
                if not uses:
                    continue
                name = f"fetch:{w.name}:{phase}"
                ops = [Alloc(f"w:{w.name}:{phase}", w.bytes)]
                after = upd if phase == "fw" else ()
                if phase == "bw" and w.group in pl.weights_ssd:
                    ops.append(Issue(f"wread:{w.name}", "ssd_read", w.bytes * ssd_r))
                    after = (f"wread:{w.name}",)
                elif phase == "fw" and w.group in pl.weights_ssd and not upd:
                    ops.append(Issue(f"wread:{w.name}:fw", "ssd_read", w.bytes * ssd_r))
                    after = (f"wread:{w.name}:fw",)
                ops.append(Issue(name, "h2d", w.bytes * h2d_pb, after=after))
                when = max(issue[name], chain_op.get(w.group, 0)) if phase == "fw" else issue[name]
                at("prefetch", when, *ops)
                at("wait", uses[0], Wait(name))
                at("free", uses[-1], Free(f"w:{w.name}:{phase}"))
        elif upd and w.fw_uses:
            # a weight kept on the device still receives its update over the link
            name = f"upload:{w.name}"
            at("prefetch", chain_op[w.group], Issue(name, "h2d", w.bytes * h2d_pb, after=upd))
            at("wait", w.fw_uses[0], Wait(name))
    # gradients leave as they are made
    for w in lay.weights:
        if w.grad_op is None:
            continue
        name = f"grad:{w.name}"
        at("alloc", w.grad_op, Alloc(f"g:{w.name}", w.bytes))
        at("swap_out", w.grad_op, Issue(name, "d2h", w.bytes * d2h_pb))
        after_ops: list[Op] = [Wait(name), Free(f"g:{w.name}")]
        if w.group in pl.grads_ssd:
            after_ops.append(Issue(f"gwrite:{w.name}", "ssd_write", w.bytes * ssd_w))
        at("release", release[name], *after_ops)
    # the gradient buffers themselves are counted by the g: allocations above
    # activations spilled to SSD: d2h into a staging buffer, then written; read back, then h2d
    order = sorted((c for c in swapped if c.key in spilled), key=lambda c: c.produced_at)
    for k, c in enumerate(order):
        d = decisions[c.key]
        out, inn = f"swap_out:{c.key}", f"swap_in:{c.key}"
        at("alloc", c.produced_at, Alloc(c.key, c.bytes))
        at("swap_out", c.produced_at, Alloc(f"stage:{c.key}", c.bytes, "host"), Issue(out, "d2h", c.bytes * d2h_pb))
        rel = max(d.release_at if d.release_at is not None else c.last_fw_use, c.last_fw_use)
        at("release", rel, Wait(out), Free(c.key), Issue(f"ssdw:{c.key}", "ssd_write", c.bytes * ssd_w, after=(out,)),
           Alloc(f"ssd:{c.key}", c.bytes, "ssd"))
        # the pinned staging pool is bounded: a buffer is waited for (its write done) once the
        # swaps after it have used the rest of the pool
        later, acc = None, 0
        for nxt in order[k + 1:]:
            acc += nxt.bytes
            if acc + c.bytes > ACTIVATION_STAGING_BYTES:
                later = nxt
                break
        done_at = max(later.produced_at, rel) if later is not None else p.n_fw - 1
        at("release", max(done_at, rel), Wait(f"ssdw:{c.key}"), Free(f"stage:{c.key}"))
        pf = min(d.prefetch_at if d.prefetch_at is not None else first_use[c.key], first_use[c.key])
        at("prefetch", pf, Alloc(f"stage_in:{c.key}", c.bytes, "host"),
           Issue(f"ssdr:{c.key}", "ssd_read", c.bytes * ssd_r), Alloc(f"dev:{c.key}", c.bytes),
           Issue(inn, "h2d", c.bytes * h2d_pb, after=(f"ssdr:{c.key}",)))
        at("wait", first_use[c.key], Wait(inn), Free(f"stage_in:{c.key}"), Free(f"ssd:{c.key}"))
        at("free", c.last_bw_use, Free(f"dev:{c.key}"))
    drop = {w.grad_key for w in lay.weights} | spilled
    p2 = replace(p, buffers={k: b for k, b in p.buffers.items() if k not in drop},
                 candidates=[c for c in p.candidates if c.key not in spilled])
    return program_for(p2, decisions, Rates(d2h_pb, h2d_pb), extra), resident


def _layer_of_name(name: str) -> int | None:
    head, dot, _ = name.partition(".")
    return int(head[1:]) if dot and head.startswith("L") and head[1:].isdigit() else None


# -- policies -------------------------------------------------------------------------


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


def _expand(lay: Layout, base_actions: dict[str, Decision]) -> dict[str, Decision]:
    return {c.key: base_actions.get(lay.base[c.key], Decision(Action.KEEP)) for c in lay.problem.candidates}


def _bases(lay: Layout) -> dict[str, list[Candidate]]:
    out: dict[str, list[Candidate]] = {}
    for c in lay.problem.candidates:
        out.setdefault(lay.base[c.key], []).append(c)
    return out


class WholeStep:
    """Plans of a traced model's whole step on ``hardware`` under ``budget`` device bytes."""

    def __init__(self, traced: Traced, hardware: HardwareProfile | None = None, budget: int | None = None):
        self.t = traced
        self.hw = hardware or traced.hardware
        self.budget = budget if budget is not None else self.hw.device_memory
        self.lay = layout(traced)
        self.bases = _bases(self.lay)
        bp = traced.block.problem
        self.block_recomputable = _recomputable_set(bp)

    # one simulation
    def evaluate(self, policy: str, base_actions: dict[str, Decision], design: Design) -> StepPlan:
        keep_free = 0
        for _ in range(2):  # a second placement leaves host room for the swapped activations
            pl = place(self.lay, self.hw, grad_bytes=design.grad_bytes, allow_ssd=design.allow_ssd,
                       keep_free=keep_free, state_on_ssd=design.state_on_ssd and self.hw.ssd_count > 0)
            plan = StepPlan(policy, False, "", offload_params=design.stream_weights, budget_bytes=self.budget,
                            placement=pl, actions={k: d.action.value for k, d in sorted(base_actions.items())})
            if pl.problem:
                plan.why = pl.problem
                return plan
            program, resident = build_program(self.lay, _expand(self.lay, base_actions), design, pl, self.hw)
            tl = simulate(program, initial=resident)
            activations_on_host = tl.peaks["host"] - resident["host"]
            if (not self.hw.host_memory or tl.peaks["host"] <= self.hw.host_memory or keep_free
                    or not design.allow_ssd or self.hw.ssd_count <= 0):
                break
            keep_free = activations_on_host
        plan.timeline = tl
        plan.step_s = tl.step_seconds
        plan.tflops = 6 * self.t.spec.parameters() * self.t.tokens / tl.step_seconds / 1e12
        plan.peaks = dict(tl.peaks)
        plan.busy = {r: tl.busy(r) for r in ("compute", "h2d", "d2h", "cpu", "ssd_read", "ssd_write")}
        per_byte = {"h2d": self.hw.h2d_bandwidth, "d2h": self.hw.d2h_bandwidth,
                    "ssd_read": self.hw.ssd_read_bandwidth * max(self.hw.ssd_count, 1),
                    "ssd_write": self.hw.ssd_write_bandwidth * max(self.hw.ssd_count, 1)}
        plan.traffic = {q: int(round(plan.busy[q] * rate)) for q, rate in per_byte.items()}
        ends = {iv.name: iv for iv in tl.intervals}
        for name, s in tl.exposed.items():
            kind = name.split(":")[0]
            if kind in ("fetch", "upload") and s > 0:
                # a weight that waited for its deferred update: the optimizer held it back
                group = name.split(":")[1].split("/")[0]
                upd, it = ends.get(f"update:{group}"), ends.get(name)
                if upd is not None and it is not None and abs(it.start - upd.end) <= 1e-9 * max(1.0, upd.end):
                    kind = "update"
            plan.exposed[kind] = plan.exposed.get(kind, 0.0) + s
        over = []
        if tl.peaks["device"] > self.budget:
            over.append(f"device peak {format_bytes(tl.peaks['device'])} > budget {format_bytes(self.budget)}")
        if self.hw.host_memory and tl.peaks["host"] > self.hw.host_memory:
            over.append(f"host peak {format_bytes(tl.peaks['host'])} > {format_bytes(self.hw.host_memory)}")
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
                        "ssdr": "activations read from SSD", "hooks": "framework hooks"}.get(kind, kind)
                return f"compute busy {compute:.0%} of the step; waits on {what}: {s:.2f} s"
        return f"compute-bound: compute busy {compute:.0%} of the step"

    # fixed policies
    def fixed(self, policy: str, design: Design) -> StepPlan:
        acts: dict[str, Decision] = {}
        for b, cs in self.bases.items():
            c = cs[0]
            if policy == "swap-all":
                a = Action.SWAP if c.swappable else Action.KEEP
            elif policy == "recompute-all":
                a = Action.RECOMPUTE if self._can_recompute(b) else Action.KEEP
            else:
                a = Action.KEEP
            acts[b] = Decision(a, reason=f"{policy} policy")
        return self.evaluate(policy, acts, design)

    def _can_recompute(self, base: str) -> bool:
        return base in self.block_recomputable and not base.startswith("head/") and base != "input"

    def auto(self, design: Design = OURS) -> StepPlan:
        """Keep everything, then move the block values alive at the peak, cheapest first (a swap
        costs nothing while the links have room beside compute; beyond, the cheaper of swapping
        and recomputing), re-simulating after each round; the best of this and the fixed
        policies."""
        acts = {b: Decision(Action.KEEP, reason="fits") for b in self.bases}
        plan = self.evaluate("auto", acts, design)
        p = self.lay.problem
        capacity = min(p.fw_seconds * self.hw.d2h_bandwidth,
                       max(p.bw_seconds - self._bw_fetch_s(design), 0.0) * self.hw.h2d_bandwidth)
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
                for b, cs in self.bases.items():
                    nbytes = sum(c.bytes for c in cs)
                    if acts[b].action is not Action.KEEP or nbytes <= 0:
                        continue
                    re = sum(c.recompute_seconds or 0.0 for c in cs) if self._can_recompute_now(b, acts) else math.inf
                    swap = math.inf
                    if cs[0].swappable:
                        over = max(0.0, swapped + nbytes - capacity) - max(0.0, swapped - capacity)
                        swap = over * (1 / self.hw.d2h_bandwidth + 1 / self.hw.h2d_bandwidth)
                    if swap == math.inf and re == math.inf:
                        continue
                    if swap <= re:
                        # among free swaps, the values most costly to recompute first
                        rank = (swap / nbytes, -(re / nbytes if re < math.inf else math.inf))
                        option = (rank, b, Action.SWAP, nbytes)
                    else:
                        option = ((re / nbytes, 0.0), b, Action.RECOMPUTE, nbytes)
                    if best is None or option[0] < best[0]:
                        best = option
                if best is None:
                    break
                _, b, action, nbytes = best
                acts[b] = Decision(action, reason="alive at the peak")
                swapped += nbytes if action is Action.SWAP else 0
                freed += nbytes
                moved = True
            if not moved:
                break
            plan = self.evaluate("auto", acts, design)
        plans = [plan] + [self.fixed(f, design) for f in ("swap-all", "recompute-all")]
        plans.append(self.checkpointed(design))
        feasible = [q for q in plans if q.feasible]
        if not feasible:
            return min(plans, key=lambda q: q.peaks.get("device", math.inf))
        best = min(feasible, key=lambda q: q.step_s)
        best.policy = "auto"
        return best

    def _can_recompute_now(self, base: str, acts: dict[str, Decision]) -> bool:
        if not self._can_recompute(base):
            return False
        c = self.t.block.problem.candidate(base)
        if any(acts.get(n, Decision(Action.KEEP)).action is Action.RECOMPUTE for n in c.recompute_needs):
            return False
        return not any(
            d.action is Action.RECOMPUTE and base in self.t.block.problem.candidate(k).recompute_needs
            for k, d in acts.items() if k in self.block_recomputable
        )

    def _bw_fetch_s(self, design: Design) -> float:
        if not design.stream_weights:
            return 0.0
        return sum(w.bytes for w in self.lay.weights if w.bw_uses and w.bytes >= STREAM_MIN_BYTES) / self.hw.h2d_bandwidth

    def checkpointed(self, design: Design = OURS) -> StepPlan:
        """Each block's input swapped out (its checkpoint) and the block's forward recomputed in
        backward: the least device memory, for models whose activations do not fit the host
        either; with lohan's weight streaming, just-in-time prefetch and deferred optimizer."""
        acts = {}
        for b in self.bases:
            if b == "input":
                acts[b] = Decision(Action.SWAP, reason="block checkpoint, swapped")
            elif b.startswith("head/"):
                acts[b] = Decision(Action.KEEP, reason="head: kept chunk by chunk")
            else:
                acts[b] = Decision(Action.RECOMPUTE, reason="recomputed with its block")
        return self._with_block_recompute("checkpoint", acts, replace(design, checkpoint_layers=True))

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
        acts = {}
        for b, cs in self.bases.items():
            if b == "input":
                acts[b] = Decision(Action.SWAP, early_release=True, late_prefetch=True, reason="checkpoint offloaded")
            elif b.startswith("head/"):
                acts[b] = Decision(Action.KEEP, reason="not checkpointed")
            else:
                acts[b] = Decision(Action.RECOMPUTE, reason="recomputed with its block")
        design = Design(stream_weights=True, optimizer="after-backward", prefetch_ahead=1, grad_bytes=4,
                        serial_optimizer=True, checkpoint_layers=True, state_on_ssd=True,
                        compute_scale=ZERO_INFINITY_COMPUTE_SCALE)
        return self._with_block_recompute("zero-infinity", acts, design)

    def zero_offload(self) -> StepPlan:
        """DeepSpeed ZeRO-Offload (stage 2, optimizer offloaded to the CPU): weights on the device,
        every block checkpointed (inputs kept on the device), fp32 gradients copied to the host
        in backward, the CPU optimizer after backward and the updated weights copied back; no
        NVMe tier."""
        acts = {}
        for b in self.bases:
            if b == "input" or b.startswith("head/"):
                acts[b] = Decision(Action.KEEP, reason="checkpoint" if b == "input" else "not checkpointed")
            else:
                acts[b] = Decision(Action.RECOMPUTE, reason="recomputed with its block")
        design = Design(stream_weights=False, optimizer="after-backward", grad_bytes=4, serial_optimizer=False,
                        checkpoint_layers=True, allow_ssd=False)
        return self._with_block_recompute("zero-offload", acts, design)

    def _with_block_recompute(self, policy: str, acts: dict[str, Decision], design: Design) -> StepPlan:
        # a checkpointed block recomputes its whole forward (Design.checkpoint_layers), not value
        # by value: the per-value recomputation costs are zeroed for this plan
        saved = self.lay.problem.candidates
        self.lay.problem.candidates = [
            replace(c, recompute_seconds=0.0, recompute_needs=()) if self.lay.base[c.key] in acts
            and acts[self.lay.base[c.key]].action is Action.RECOMPUTE else c for c in saved]
        try:
            return self.evaluate(policy, acts, design)
        finally:
            self.lay.problem.candidates = saved

    def plan(self, policy: str = "auto", offload_params: Any = "auto") -> StepPlan:
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
