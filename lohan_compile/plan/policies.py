"""Keep, swap or recompute each saved activation: policies over a ``Problem``.

Graph-free: a policy takes a ``Problem`` (problem.py), the transfer ``Rates``
and returns a ``Plan``: one ``Decision`` per candidate, with the prediction
of its program (program.py), when its copies run decided by the one
scheduler (schedule.py).

Policies (``POLICIES``): ``keep-all``; ``swap-all`` (every candidate swapped
out after it is produced and prefetched one swap ahead in backward);
``recompute-all`` (everything that can be recomputed is); ``auto`` (below).

``auto`` minimises the simulated step time subject to predicted device
peak <= budget. While the peak is over the budget it takes the candidates
alive at the peak and frees the cheapest bytes first: swapping costs nothing
while the transfers hide behind compute (a candidate is ranked by how long
it would take to recompute, per byte: expensive ones are swapped), and
beyond the link's capacity each candidate gets the cheaper of swapping or
recomputing. A second greedy plan counts every copy's whole time, so it
recomputes whatever is cheaper to redo than to move (where copies slow
compute, as on the CPU stand-in, the faster plan; a trial measures). Swap-ins are scheduled as late as the link allows (least
memory), swap-out waits as early as the copy is expected to finish. The
result is compared with every fixed policy and the fastest feasible plan is
returned, so ``auto`` is never predicted slower than a fixed policy.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from ..errors import BudgetError
from ..units import format_bytes
from .problem import Action, Candidate, Decision, OpRef, Plan, Problem, Rates, effective_first_use
from .program import describe_peak, finish, predict
from .schedule import schedule_swaps
from .simulate import Timeline


# -- policies ----------------------------------------------------------------------------


def _all(problem: Problem, action: Callable[[Candidate], Action], reason: str) -> dict[str, Decision]:
    return {c.key: Decision(action(c), reason=reason) for c in problem.candidates}


def keep_all(problem: Problem, rates: Rates, budget: int | None) -> Plan:
    return finish("keep-all", problem, _all(problem, lambda c: Action.KEEP, "keep-all policy"), rates)


def swap_all(problem: Problem, rates: Rates, budget: int | None) -> Plan:
    d = _all(problem, lambda c: Action.SWAP if c.swappable else Action.KEEP, "swap-all policy")
    return finish("swap-all", problem, schedule_swaps(problem, d, rates, prefetch="one-ahead"), rates)


def recompute_all(problem: Problem, rates: Rates, budget: int | None) -> Plan:
    recomputable = recomputable_set(problem)
    d = _all(problem, lambda c: Action.RECOMPUTE if c.key in recomputable else Action.KEEP, "recompute-all policy")
    return finish("recompute-all", problem, d, rates)


def recomputable_set(problem: Problem) -> set[str]:
    """Candidates that can be recomputed together: none reads another recomputed one."""
    chosen: set[str] = set()
    read_by_chosen: set[str] = set()
    # cheapest per byte first, so a chain keeps its expensive root saved
    order = sorted(
        (c for c in problem.candidates if c.recompute_seconds is not None),
        key=lambda c: c.recompute_seconds / max(c.bytes, 1),
    )
    for c in order:
        if c.key in read_by_chosen or any(n in chosen for n in c.recompute_needs):
            continue
        chosen.add(c.key)
        read_by_chosen.update(c.recompute_needs)
    return chosen


def _hidden_capacity(problem: Problem, rates: Rates) -> float:
    """How many bytes the links can move while compute runs, in each pass."""
    return min(
        problem.fw_seconds / max(rates.d2h_seconds_per_byte, 1e-30),
        problem.bw_seconds / max(rates.h2d_seconds_per_byte, 1e-30),
    )


def _greedy(problem: Problem, rates: Rates, budget: int, start: Plan, hidden_capacity: float) -> Plan:
    """From ``start`` (everything kept), free the cheapest bytes alive at the predicted peak
    until it fits: each candidate swapped or recomputed, whichever costs less, where a swap
    costs nothing until ``hidden_capacity`` bytes are swapped (its transfers hide behind
    compute) and its whole transfer time after. (With no capacity, recomputation wins wherever
    it is cheaper than the copies: the plan for a machine whose copies slow its compute, such
    as the CPU standing in for a GPU.)"""
    decisions = dict(start.decisions)
    needed_by = _needed_by(problem)
    pred = start.prediction
    swapped_bytes = 0
    for _ in range(2 * len(problem.candidates) + 2):
        if pred.peak_device_bytes <= budget:
            break
        peak_time = pred.timeline.peak_at["device"]
        live = _live_kept_at(problem, decisions, pred.timeline, peak_time)
        held = _held_swaps_at(problem, decisions, pred.timeline, peak_time)
        if not live and not held:
            break
        need = pred.peak_device_bytes - budget
        options = []
        for c in live:
            if c.bytes <= 0:
                continue  # moving it frees nothing
            swap_cost = math.inf
            if c.swappable:
                over = max(0.0, swapped_bytes + c.bytes - hidden_capacity)
                swap_cost = over * (rates.d2h_seconds_per_byte + rates.h2d_seconds_per_byte)
            re_cost = c.recompute_seconds if _can_recompute(c, decisions, needed_by) else math.inf
            if swap_cost == math.inf and re_cost == math.inf:
                continue
            # free swaps rank by how costly recomputing would be (swap what is expensive to redo)
            if swap_cost <= re_cost:
                rank = (swap_cost / c.bytes, -(c.recompute_seconds or math.inf) / c.bytes)
                options.append((rank, c, Decision(Action.SWAP, reason=_reason(Action.SWAP, c))))
            else:
                options.append(((re_cost / c.bytes, 0.0), c, Decision(Action.RECOMPUTE, reason=_reason(Action.RECOMPUTE, c))))
        for c, where in held:
            if c.bytes <= 0:
                continue
            # a swapped storage on the device at the peak: wait for its copy out earlier, or
            # bring it back later
            stall = c.bytes * (rates.d2h_seconds_per_byte if where == "fw" else rates.h2d_seconds_per_byte)
            options.append(((stall / c.bytes, 0.0), c, _unheld(decisions[c.key], where)))
        if not options:
            break
        options.sort(key=lambda o: o[0])
        freed = 0
        for _, c, decision in options:
            if decision.action is Action.RECOMPUTE and not _can_recompute(c, decisions, needed_by):
                continue  # an option taken earlier in this round conflicts with it
            if decision.action is Action.SWAP and decisions[c.key].action is not Action.SWAP:
                swapped_bytes += c.bytes
            decisions[c.key] = decision
            freed += c.bytes
            if freed >= need:
                break
        decisions = schedule_swaps(problem, decisions, rates)
        pred = predict(problem, decisions, rates)
    return Plan("auto", decisions, pred)


# the plans auto compares under a budget: its own greedy plans, and the fixed ones
AUTO_FAMILIES = ("greedy", "greedy-recompute", "swap-all", "recompute-all", "minimal-memory")


def auto(problem: Problem, rates: Rates, budget: int | None, family: str | None = None) -> Plan:
    """Keep everything if that fits; else the fastest predicted of ``AUTO_FAMILIES`` that fits
    (``family``: that one, if it fits; a trial of plans asks for each)."""
    if family is not None and family not in AUTO_FAMILIES + ("keep-all",):
        raise ValueError(f"unknown auto plan family {family!r}; families: keep-all, {', '.join(AUTO_FAMILIES)}")
    best = keep_all(problem, rates, budget)
    if budget is None or best.prediction.peak_device_bytes <= budget:
        why = "no memory_budget" if budget is None else "everything kept fits the budget"
        plan = _reasoned(replace(best, policy="auto", family="keep-all"), {"keep-all policy": f"kept: {why}"})
        plan.alternatives = {"keep-all": plan.prediction.step_seconds}
        plan.keep_all_step_s = plan.prediction.step_seconds
        return plan
    greedy = replace(_greedy(problem, rates, budget, best, _hidden_capacity(problem, rates)), family="greedy")
    plans = [greedy]
    recompute_first = _greedy(problem, rates, budget, best, 0.0)
    if recompute_first.decisions != greedy.decisions:
        plans.append(replace(recompute_first, family="greedy-recompute"))
    for fam, fixed in zip(AUTO_FAMILIES[2:], (swap_all, recompute_all, lambda p, r, b: minimal_memory_plan(p, r))):
        plan = fixed(problem, rates, budget)
        if fam == "swap-all" and plan.prediction.peak_device_bytes > budget:
            plan = finish("swap-all", problem, _tightened(problem, plan.decisions, rates, budget, "one-ahead"), rates)
        plans.append(replace(plan, family=fam))
    feasible = [p for p in plans if p.prediction.peak_device_bytes <= budget]
    alternatives = {p.family: p.prediction.step_seconds for p in feasible}
    if family is not None and feasible:
        feasible = [p for p in feasible if p.family == family]
        if not feasible:
            raise BudgetError(
                f"auto's {family} plan does not fit memory_budget={format_bytes(budget)} "
                f"(plans that fit: {', '.join(alternatives)})",
                smallest_feasible_bytes=next((p.prediction.peak_device_bytes for p in plans if p.family == family),
                                             best.prediction.peak_device_bytes),
            )
    if not feasible:
        least = min(plans, key=lambda p: p.prediction.peak_device_bytes)  # least memory among them
        smallest = least.prediction.peak_device_bytes
        raise BudgetError(
            f"no plan fits memory_budget={format_bytes(budget)}: the smallest predicted device peak "
            f"is {format_bytes(smallest)} ({smallest} bytes){describe_peak(problem, least.prediction)}; "
            "raise the budget to at least that",
            smallest_feasible_bytes=smallest,
        )
    best_plan = replace(min(feasible, key=lambda p: p.prediction.step_seconds), alternatives=alternatives,
                        keep_all_step_s=best.prediction.step_seconds)
    if best_plan.family in ("greedy", "greedy-recompute"):
        return _reasoned(best_plan, {"keep-all policy": "kept: the budget holds without moving it"})
    chosen = (f"auto chose the {best_plan.policy} plan: "
              + ("the one asked for" if family is not None else "the fastest predicted step under the budget"))
    return _reasoned(replace(best_plan, policy="auto"), {f"{best_plan.policy} policy": chosen})


def _tightened(
    problem: Problem, decisions: dict[str, Decision], rates: Rates, budget: int, prefetch: str
) -> dict[str, Decision]:
    """A swap plan past the budget only because of when its copies are waited for: the swaps
    on the device at the peak for that reason wait for their copy out right after their last
    forward use, or come back only when backward needs them (the cheaper stall per byte, and
    the larger, first), until it fits or none is left. (With op times measured on a busy
    machine, swap-all's waits can move later and its peak past budgets its estimated plan
    meets: this keeps that family among auto's plans.)"""
    decisions = dict(decisions)
    pred = predict(problem, decisions, rates)
    for _ in range(2 * len(problem.candidates) + 2):
        if pred.peak_device_bytes <= budget:
            break
        held = _held_swaps_at(problem, decisions, pred.timeline, pred.timeline.peak_at["device"])
        if not held:
            break
        need = pred.peak_device_bytes - budget
        per_byte = {"fw": rates.d2h_seconds_per_byte, "bw": rates.h2d_seconds_per_byte}
        freed = 0
        for c, where in sorted(held, key=lambda h: (per_byte[h[1]], -h[0].bytes)):
            decisions[c.key] = _unheld(decisions[c.key], where)
            freed += c.bytes
            if freed >= need:
                break
        decisions = schedule_swaps(problem, decisions, rates, prefetch=prefetch)
        pred = predict(problem, decisions, rates)
    return decisions


def _unheld(decision: Decision, where: str) -> Decision:
    """A swap held on the device at the peak by when its copy is waited for ("fw": its copy
    out, waited for after its last use; "bw": its copy in, issued before its first use),
    waited for at once instead."""
    if where == "fw":
        return replace(decision, early_release=True, reason="swapped; waited for right after its last forward use, at the peak")
    return replace(decision, late_prefetch=True, reason="swapped; brought back only when backward needs it, at the peak")


def _reasoned(plan: Plan, reasons: dict[str, str]) -> Plan:
    """The plan with some decisions' reasons rewritten (said in terms of the policy that chose)."""
    decisions = {k: replace(d, reason=reasons.get(d.reason, d.reason)) for k, d in plan.decisions.items()}
    return replace(plan, decisions=decisions)


def _can_recompute(c: Candidate, decisions: dict[str, Decision], needed_by: dict[str, list[str]]) -> bool:
    """Recomputable, and no chain: it reads nothing recomputed, and nothing recomputed reads it
    (``needed_by``: the candidates whose recomputation reads each one, ``_needed_by``)."""
    if c.recompute_seconds is None:
        return False
    # (a need that is no candidate, a saved value the user holds too, is never recomputed)
    if any(n in decisions and decisions[n].action is Action.RECOMPUTE for n in c.recompute_needs):
        return False
    return not any(decisions[k].action is Action.RECOMPUTE for k in needed_by.get(c.key, ()))


def _needed_by(problem: Problem) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in problem.candidates:
        for need in c.recompute_needs:
            out.setdefault(need, []).append(c.key)
    return out


def _reason(action: Action, c: Candidate) -> str:
    if action is Action.SWAP:
        return "alive at the peak; the transfer can hide behind compute" if c.recompute_seconds is None or c.recompute_seconds > 0 else "alive at the peak"
    return f"alive at the peak; recomputing costs {c.recompute_seconds * 1e3:.3f} ms, less than moving it"


def _spans(timeline: Timeline) -> dict[int, tuple[float, float]]:
    span: dict[int, tuple[float, float]] = {}
    for iv in timeline.intervals:
        if iv.resource == "compute" and isinstance(iv.name, OpRef):
            span[iv.name.index] = (iv.start, iv.end)
    return span


def _held_swaps_at(
    problem: Problem, decisions: dict[str, Decision], timeline: Timeline, t: float
) -> list[tuple[Candidate, str]]:
    """Swapped candidates on the device at ``t`` only because of when their copies are waited
    for: ("fw", a copy out waited for after its last use) or ("bw", a copy in issued before
    its first use)."""
    span = _spans(timeline)
    first_use = effective_first_use(problem, decisions)
    result = []
    for c in problem.candidates:
        d = decisions[c.key]
        if d.action is not Action.SWAP:
            continue
        if not d.early_release and d.release_at is not None and d.release_at > c.last_fw_use:
            last_use_end = span.get(c.last_fw_use, (math.inf, math.inf))[1]
            held_until = span.get(d.release_at, (math.inf, math.inf))[1]
            if last_use_end <= t <= held_until:
                result.append((c, "fw"))
                continue
        if not d.late_prefetch and d.prefetch_at is not None and d.prefetch_at < first_use[c.key]:
            issued = span.get(d.prefetch_at, (math.inf, math.inf))[0]
            needed = span.get(first_use[c.key], (0.0, 0.0))[0]
            if issued <= t < needed:
                result.append((c, "bw"))
    return result


def _live_kept_at(problem: Problem, decisions: dict[str, Decision], timeline: Timeline, t: float) -> list[Candidate]:
    """Kept candidates whose device storage is allocated at time ``t``."""
    span = _spans(timeline)
    result = []
    for c in problem.candidates:
        if decisions[c.key].action is not Action.KEEP:
            continue
        start = span.get(c.produced_at, (0.0, 0.0))[0]
        end = span.get(c.last_bw_use, (math.inf, math.inf))[1]
        if start <= t <= end:
            result.append(c)
    return result


def minimal_memory_plan(problem: Problem, rates: Rates) -> Plan:
    """Every candidate out of device memory (swap, else recompute, else keep), prefetched just in time."""
    recomputable = recomputable_set(problem)
    d = {
        c.key: Decision(
            Action.SWAP if c.swappable else (Action.RECOMPUTE if c.key in recomputable else Action.KEEP),
            reason="smallest peak",
            early_release=True,
            late_prefetch=True,
        )
        for c in problem.candidates
    }
    return finish("minimal-memory", problem, schedule_swaps(problem, d, rates), rates)


POLICIES: dict[str, Callable[[Problem, Rates, int | None], Plan]] = {
    "auto": auto,
    "keep-all": keep_all,
    "swap-all": swap_all,
    "recompute-all": recompute_all,
    # torch's min-cut partitioner already chose what to recompute (partition_graph): keep the rest
    "torch-min-cut": lambda problem, rates, budget: finish(
        "torch-min-cut", problem,
        _all(problem, lambda c: Action.KEEP, "kept by torch's min-cut partition (it recomputes the rest)"), rates),
}


def solve(policy: str, problem: Problem, rates: Rates, budget: int | None, family: str | None = None) -> Plan:
    """The plan of ``policy``; a fixed policy that misses the budget raises ``BudgetError``.
    ``family``: for ``"auto"``, which of its plans (see ``auto``)."""
    try:
        fn = POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}; policies: {', '.join(POLICIES)}") from None
    plan = auto(problem, rates, budget, family) if policy == "auto" and family is not None else fn(problem, rates, budget)
    if budget is not None and plan.prediction.peak_device_bytes > budget:
        smallest = min(plan.prediction.peak_device_bytes, minimal_memory_plan(problem, rates).prediction.peak_device_bytes)
        raise BudgetError(
            f"policy {policy!r} predicts a device peak of {format_bytes(plan.prediction.peak_device_bytes)}, "
            f"over memory_budget={format_bytes(budget)}; the smallest predicted peak of any plan is "
            f"{format_bytes(smallest)} ({smallest} bytes): raise the budget or use policy='auto'",
            smallest_feasible_bytes=smallest,
        )
    return plan
