"""From a plan to the step program the simulator runs, and the plan's prediction. Graph-free.

``program_for`` lays out one step: each op of the problem (named by its ``OpRef``), and
around it the plan's allocations, frees, recomputations and copies (named by their
``Transfer``), in the order the runtime runs them. ``predict`` simulates that program:
the planner optimises against exactly the prediction the report shows.
"""

from __future__ import annotations

from ..units import format_bytes
from .problem import Action, Decision, OpRef, Plan, Prediction, Problem, Rates, Transfer, effective_first_use
from .simulate import Alloc, Compute, Free, Issue, Op, Wait, simulate

OUTSIDE = "outside:between"  # the allocation of Problem.outside_bytes in a step program


def scratch_key(i: int, recompute: bool = False) -> str:
    """The allocation of op ``i``'s ``scratch_bytes`` in a step program (its recomputation's)."""
    return f"scratch:{'re:' if recompute else ''}{i}"


# Slots around op i, in the order they run. Before: prefetches start the link early,
# then waits for data op i needs, then recomputations, then op i's own outputs.
# After: frees of what died, then new swap-outs, then swap-out waits with their frees.
_BEFORE = ("prefetch", "wait", "recompute", "alloc")
_AFTER = ("free", "swap_out", "release")


def program_for(
    problem: Problem,
    plan_decisions: dict[str, Decision],
    rates: Rates,
    extra: dict[tuple[str, int], list[Op]] | None = None,
) -> list[Op]:
    """The step program of a plan. ``extra`` adds other work at slots around ops (after the
    plan's own): parameter fetches, gradient copies, optimizer updates (lohan_compile/wholestep)."""
    slots: dict[tuple[str, int], list[Op]] = {}
    first_use = effective_first_use(problem, plan_decisions)

    def at(slot: str, i: int, *ops: Op) -> None:
        slots.setdefault((slot, i), []).extend(ops)

    outside = bool(problem.outside_bytes) and 0 < problem.n_fw < len(problem.ops)
    # the code outside the graph reads the forward outputs it later drops: they are freed after it
    dropped = {problem.user_outputs[pos][0] for pos in problem.dropped_outputs
               if pos in problem.user_outputs} if outside else set()
    for key, buf in problem.buffers.items():
        at("alloc", buf.alloc, Alloc(key, buf.bytes))
        decision = plan_decisions.get(key)
        if (decision is None or decision.action is Action.KEEP) and buf.free is not None and key not in dropped:
            at("free", buf.free, Free(key))
    # the h2d link serves swap-ins in issue order: issue them in order of first use
    for c in sorted(problem.candidates, key=lambda c: (first_use[c.key], c.produced_at)):
        d = plan_decisions[c.key]
        if d.action is Action.SWAP:
            out, inn = Transfer("swap_out", c.key), Transfer("swap_in", c.key)
            at("swap_out", c.produced_at, Issue(out, "d2h", c.bytes * rates.d2h_seconds_per_byte, nbytes=c.bytes),
               Alloc(f"host:{c.key}", c.bytes, "host"))
            release = max(d.release_at if d.release_at is not None else c.last_fw_use, c.last_fw_use)
            at("release", release, Wait(out), Free(c.key))
            prefetch = min(d.prefetch_at if d.prefetch_at is not None else first_use[c.key], first_use[c.key])
            at("prefetch", prefetch, Alloc(f"dev:{c.key}", c.bytes),
               Issue(inn, "h2d", c.bytes * rates.h2d_seconds_per_byte, nbytes=c.bytes))
            at("wait", first_use[c.key], Wait(inn), Free(f"host:{c.key}"))
            at("free", c.last_bw_use, Free(f"dev:{c.key}"))
        elif d.action is Action.RECOMPUTE:
            at("free", c.last_fw_use, Free(c.key))
            scratch = problem.ops[c.produced_at].scratch_bytes + c.recompute_scratch_bytes
            at("recompute", first_use[c.key], Alloc(f"re:{c.key}", c.bytes),
               *((Alloc(scratch_key(c.produced_at, True), scratch),) if scratch else ()),
               Compute(f"recompute:{c.name}", c.recompute_seconds or 0.0),
               *((Free(scratch_key(c.produced_at, True)),) if scratch else ()))
            at("free", c.last_bw_use, Free(f"re:{c.key}"))

    if outside:
        # after forward's last frees: what forward keeps, and the outside code's bytes beside it
        at("release", problem.n_fw - 1, Alloc(OUTSIDE, problem.outside_bytes), Free(OUTSIDE))
        for key in sorted(dropped):
            buf = problem.buffers.get(key)
            if buf is not None and buf.free is not None and plan_decisions.get(key, Decision(Action.KEEP)).action is Action.KEEP:
                at("release", max(buf.free, problem.n_fw - 1), Free(key))

    # streamed parameters share the h2d link with swap-ins
    for f in problem.fetches:
        issue = min(f.issue_at if f.issue_at is not None else f.first_use, f.first_use)
        at("prefetch", issue, Alloc(f.key, f.bytes), Issue(Transfer("fetch", f.key), "h2d", f.bytes * rates.h2d_seconds_per_byte, nbytes=f.bytes))
        at("wait", f.first_use, Wait(Transfer("fetch", f.key)))
        at("free", f.last_use, Free(f.key))

    # a data-parallel step's collectives on the link between the devices, in issue order
    for c in problem.collectives:
        at("swap_out", c.issue_at, Issue(Transfer("reduce", c.key), "net", c.bytes * rates.net_seconds_per_byte, nbytes=c.bytes))
        at("wait", c.wait_at, Wait(Transfer("reduce", c.key)))

    for i, op in enumerate(problem.ops):
        held = op.scratch_bytes + op.results_bytes
        if held:
            # beside the op's outputs while it runs, gone before anything after it
            at("alloc", i, Alloc(scratch_key(i), held))
            slots.setdefault(("free", i), []).insert(0, Free(scratch_key(i)))

    for where, ops in (extra or {}).items():
        slots.setdefault(where, []).extend(ops)
    program: list[Op] = []
    for i, op in enumerate(problem.ops):
        for slot in _BEFORE:
            program.extend(slots.get((slot, i), ()))
        program.append(Compute(OpRef(i, op.name), op.seconds))
        for slot in _AFTER:
            program.extend(slots.get((slot, i), ()))
    return program


def predict(problem: Problem, plan_decisions: dict[str, Decision], rates: Rates) -> Prediction:
    program = program_for(problem, plan_decisions, rates)
    t = simulate(program, sharing=rates.sharing, initial={"device": problem.resident_bytes})
    swapped = [c for c in problem.candidates if plan_decisions[c.key].action is Action.SWAP]
    recompute = sum(
        c.recompute_seconds or 0.0 for c in problem.candidates if plan_decisions[c.key].action is Action.RECOMPUTE
    )
    return Prediction(
        step_seconds=t.step_seconds,
        peak_device_bytes=t.peaks["device"],
        peak_host_bytes=t.peaks["host"],
        exposed_seconds=t.exposed_seconds,
        recompute_seconds=recompute,
        d2h_bytes=sum(c.bytes for c in swapped),
        h2d_bytes=sum(c.bytes for c in swapped) + sum(f.bytes for f in problem.fetches),
        timeline=t,
        net_bytes=sum(c.bytes for c in problem.collectives),
    )


def finish(policy: str, problem: Problem, decisions: dict[str, Decision], rates: Rates) -> Plan:
    """A plan of ``policy`` with its prediction."""
    return Plan(policy, decisions, predict(problem, decisions, rates))


def peak_op(problem: Problem, prediction: Prediction) -> int | None:
    """The index of the op the predicted device peak is reached at (before or while it runs)."""
    t = prediction.timeline
    when = t.peak_at.get("device")
    if when is None:
        return None
    # (a zero-time op, a view, starts where the op after it allocates: it is not where the peak is)
    for i in sorted((i for i in t.intervals if isinstance(i.name, OpRef) and i.end > i.start), key=lambda i: i.start):
        if i.start >= when:
            return i.name.index
    return None


def describe_peak(problem: Problem, prediction: Prediction) -> str:
    """Where a plan peaks, for a ``BudgetError``: the op, what it makes and what it allocates inside."""
    i = peak_op(problem, prediction)
    if i is None:
        return ""
    op = problem.ops[i]
    made = sum(b.bytes for b in problem.buffers.values() if b.alloc == i) + op.results_bytes
    text = f"; it peaks at {op.name} ({'forward' if op.phase == 'fw' else 'backward'})"
    if not made and not op.scratch_bytes:
        return text
    text += f", which makes {format_bytes(made)} of results"
    if op.scratch_bytes:
        text += f" and allocates {format_bytes(op.scratch_bytes)} inside itself while it runs"
    return text + " beside what is alive there (an op's inputs and results are on the device whole)"
