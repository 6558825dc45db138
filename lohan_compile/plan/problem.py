"""The planning problem of one training graph and its plans, as plain data.

A ``Problem`` holds the ops in execution order with their estimated times, every
storage the step allocates with when it is allocated and freed, and the
*candidates*: activation storages the forward keeps for backward, with where they
are produced and used and what recomputing them would cost. It is built from the
graphs by ``lohan_compile.graph.profile``; everything in this package (policies,
scheduler, simulator) works on it alone and never looks at a graph.

Indices: ops are numbered in execution order, forward first (``0 .. n_fw-1``), then
backward (``n_fw ..``). A storage is allocated just before its ``alloc`` op and freed
just after its ``free`` op (``None``: it outlives the step: gradients, the user's
outputs).

The forward's outputs are assumed held by the user through the step (the loss,
logits). Often they are not: ``model(**batch).loss.backward()`` drops a Hugging Face
model's logits and key/value cache before backward starts, and AOTAutograd drops the
new value of a mutated input once it has copied it back. The runtime sees which
outputs are gone when backward starts, and ``Problem.without_outputs`` frees those at
the end of forward.

A plan (``Plan``) is one ``Decision`` per candidate; its ``Prediction`` is what the
simulator makes of the plan's program. In that program, compute ops are named by an
``OpRef`` and asynchronous copies by a ``Transfer``: records, read as they are by the
rewrite (``passes/apply_plan.py``), the dumps and the report.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Mapping

from .simulate import Sharing, Timeline

if TYPE_CHECKING:
    import sympy


@dataclass(frozen=True)
class OpInfo:
    name: str
    seconds: float
    phase: str  # "fw" or "bw"
    # device bytes the op allocates inside itself and frees before it returns (a convolution's
    # reorders, a GPU library's workspace): held beside its outputs while it runs
    scratch_bytes: int = 0
    # a multi-output op: the bytes of its results, which it allocates while its inputs are
    # alive (their buffers begin at the ``getitem`` ops after it, once its dying inputs went)
    results_bytes: int = 0


@dataclass
class Buffer:
    key: str
    bytes: int
    alloc: int
    free: int | None


@dataclass(frozen=True)
class Candidate:
    key: str  # the storage (its Buffer key)
    name: str  # the forward node that owns it
    bytes: int
    produced_at: int
    last_fw_use: int
    first_bw_use: int
    last_bw_use: int
    recompute_seconds: float | None  # None: cannot be recomputed (random op, mutation, ...)
    recompute_needs: tuple[str, ...] = ()  # candidate keys its recomputation reads
    swappable: bool = True
    bytes_expr: sympy.Expr | None = None  # ``bytes`` as a possibly symbolic expression
    # the forward ops its recomputation runs, in order, the candidate's own last (a chain:
    # ``graph/problem.py``), and the most bytes their intermediate results hold at once
    recompute_ops: tuple[str, ...] = ()
    recompute_scratch_bytes: int = 0


@dataclass(frozen=True)
class Fetch:
    """A streamed parameter brought to the device for one phase: allocated and copied in
    (host -> device) when issued, waited for before ``first_use``, freed after ``last_use``."""

    input_index: int
    phase: str  # "fw" or "bw"
    bytes: int
    first_use: int
    last_use: int
    issue_at: int | None = None  # the op before which the fetch is issued (None: first_use)

    @property
    def key(self) -> str:
        return f"param:{self.input_index}:{self.phase}"


@dataclass(frozen=True)
class Collective:
    """A collective of a data-parallel step (a gradient's all-reduce): issued after op
    ``issue_at``, waited for before op ``wait_at``; each device sends ``bytes`` (and receives
    as many) over the link between the devices."""

    key: str
    issue_at: int
    wait_at: int
    bytes: int


@dataclass
class Problem:
    ops: list[OpInfo]
    n_fw: int
    buffers: dict[str, Buffer]
    candidates: list[Candidate]
    resident_bytes: int = 0  # device bytes held outside this graph when it starts (params, ...)
    fw_seconds: float = 0.0
    bw_seconds: float = 0.0
    # the backend's example inputs (parameters, user inputs) by index: the ops that read each
    # (directly or through a view; forward and backward), and the op that makes its gradient
    input_uses: dict[int, list[int]] = field(default_factory=dict)
    grad_at: dict[int, int] = field(default_factory=dict)
    input_bytes: dict[int, int] = field(default_factory=dict)
    params: tuple[int, ...] = ()  # which example inputs are parameters
    grad_key: dict[int, str] = field(default_factory=dict)  # input index -> its gradient's buffer
    # streamed parameters (not resident: ``resident_bytes`` leaves them out), fetched per phase
    fetches: list[Fetch] = field(default_factory=list)
    # forward outputs the user (or AOTAutograd's runtime) receives, by position in the forward
    # graph's outputs: (their storage's buffer, the op after which it is freed if they are
    # dropped before backward); outputs that are views of inputs or gradients are not here
    user_outputs: dict[int, tuple[str, int]] = field(default_factory=dict)
    dropped_outputs: frozenset[int] = frozenset()  # of those, the ones planned as dropped
    # of those, the ones whose storage forward also saves for backward: that it is still alive
    # when backward starts says nothing of whether the user holds them
    saved_outputs: frozenset[int] = frozenset()
    # device bytes that code outside the graph allocates (and frees) between the end of forward
    # and the start of backward, while what forward keeps is held (a region dynamo ran eagerly
    # after a graph break: a loss, a chunked LM head): measured, not traced
    outside_bytes: int = 0
    # the step's collectives (data parallel), in issue order
    collectives: list[Collective] = field(default_factory=list)

    def candidate(self, key: str) -> Candidate:
        for c in self.candidates:
            if c.key == key:
                return c
        raise KeyError(key)

    def without_outputs(self, dropped: frozenset[int]) -> "Problem":
        """This problem with the forward outputs at positions ``dropped`` released when forward
        ends (seen gone when backward started) and the others held through the step; a
        storage goes only when every output of it is dropped. ``self`` is unchanged."""
        dropped = frozenset(dropped) & frozenset(self.user_outputs)
        held = {key for pos, (key, _) in self.user_outputs.items() if pos not in dropped}
        buffers = dict(self.buffers)
        for key, free in self.user_outputs.values():
            if key in buffers:
                buffers[key] = replace(buffers[key], free=None if key in held else free)
        return replace(self, buffers=buffers, dropped_outputs=dropped)

    def with_scratch(self, extra: Mapping[tuple[str, str], int]) -> "Problem":
        """This problem with ``extra`` bytes more held while each op runs, by (phase, op name)
        (what the executor was measured to hold there beyond the plan; less, where a bound it
        held gives way to a measurement, never below none). ``self`` is unchanged."""
        if not extra:
            return self
        ops = [replace(op, scratch_bytes=max(0, op.scratch_bytes + extra.get((op.phase, op.name), 0))) for op in self.ops]
        return replace(self, ops=ops)

    def with_bytes(self, sizes: Mapping[str, int]) -> "Problem":
        """This problem with the buffers named in ``sizes`` of that many bytes (results the plan
        had fused away that the executor holds after all, or held that it fuses: 0).
        ``self`` is unchanged."""
        if not sizes:
            return self
        buffers = {k: replace(b, bytes=sizes.get(k, b.bytes)) for k, b in self.buffers.items()}
        return replace(self, buffers=buffers)

    def with_outside(self, nbytes: int) -> "Problem":
        """This problem with ``nbytes`` allocated and freed again between the end of forward and
        the start of backward (``outside_bytes``). ``self`` is unchanged."""
        return replace(self, outside_bytes=max(0, nbytes))


class Action(str, enum.Enum):
    KEEP = "keep"
    SWAP = "swap"
    RECOMPUTE = "recompute"


@dataclass(frozen=True)
class Decision:
    action: Action
    release_at: int | None = None  # SWAP: forward op after which the swap-out is waited for
    prefetch_at: int | None = None  # SWAP: backward op before which the swap-in is issued
    reason: str = ""
    # SWAP: wait for the copy right after the last forward use, even if that stalls compute
    # (the storage is needed off the device there); otherwise wait when the copy should be done
    early_release: bool = False
    # SWAP: issue the copy back only at the first backward use (no prefetch: least memory)
    late_prefetch: bool = False


@dataclass(frozen=True)
class Rates:
    """What the plan's transfers cost: seconds per byte on each link, and compute/copy sharing."""

    d2h_seconds_per_byte: float
    h2d_seconds_per_byte: float
    sharing: Sharing = field(default_factory=Sharing)
    net_seconds_per_byte: float = 0.0  # the link between devices (a data-parallel step's collectives)


@dataclass
class Prediction:
    step_seconds: float
    peak_device_bytes: int
    peak_host_bytes: int
    exposed_seconds: float
    recompute_seconds: float
    d2h_bytes: int
    h2d_bytes: int
    timeline: Timeline
    net_bytes: int = 0  # what this device sends to the others in the step's collectives


@dataclass
class Plan:
    policy: str
    decisions: dict[str, Decision]
    prediction: Prediction | None = None
    # auto: which of its plans this is (``AUTO_FAMILIES``), and the predicted step of each of
    # them that fits the budget (the trials in backend.py time the close ones)
    family: str | None = None
    alternatives: dict[str, float] = field(default_factory=dict)
    # auto: the predicted step with everything kept, which no plan of the step beats
    keep_all_step_s: float | None = None

    def count(self, action: Action) -> int:
        return sum(1 for d in self.decisions.values() if d.action is action)

    def bytes(self, problem: Problem, action: Action) -> int:
        return sum(c.bytes for c in problem.candidates if self.decisions[c.key].action is action)


@dataclass(frozen=True)
class OpRef:
    """A compute op of the problem in a step program: op names repeat between forward and
    backward, so the index is the identity."""

    index: int
    name: str

    def __str__(self) -> str:
        return f"{self.index}:{self.name}"


TRANSFER_KINDS = ("swap_out", "swap_in", "fetch", "reduce")


@dataclass(frozen=True)
class Transfer:
    """An asynchronous copy of a plan: a swap of a candidate out (``swap_out``, device to
    host) or back in (``swap_in``), the fetch of a streamed parameter (``fetch``), or a
    collective of a data-parallel step (``reduce``, between devices). The
    step program issues and waits for it under this name; the rewrite finds its graph
    nodes, the dump and the report its predicted times, by the same record."""

    kind: str
    key: str  # the candidate's storage key, or the fetch's key

    def __post_init__(self) -> None:
        if self.kind not in TRANSFER_KINDS:
            raise ValueError(f"unknown transfer kind {self.kind!r}; kinds are {TRANSFER_KINDS}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.key}"


def effective_first_use(problem: Problem, decisions: dict[str, Decision]) -> dict[str, int]:
    """First backward use of each candidate, counting recomputations that read it."""
    first = {c.key: c.first_bw_use for c in problem.candidates}
    for c in problem.candidates:
        if decisions[c.key].action is Action.RECOMPUTE:
            for need in c.recompute_needs:
                if need in first:  # (a value the caller moves itself is not among the candidates)
                    first[need] = min(first[need], first[c.key])
    return first


def fetches_for(problem: Problem, streamed: dict[int, int]) -> list[Fetch]:
    """One fetch per phase that reads each streamed input (index -> bytes), issued at first use."""
    out = []
    for idx, nbytes in sorted(streamed.items()):
        uses = problem.input_uses.get(idx, [])
        for phase, mine in (("fw", [u for u in uses if u < problem.n_fw]),
                            ("bw", [u for u in uses if u >= problem.n_fw])):
            if mine:
                out.append(Fetch(idx, phase, nbytes, min(mine), max(mine)))
    return sorted(out, key=lambda f: (f.first_use, f.input_index))
