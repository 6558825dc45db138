"""plan_memory: decide keep / swap / recompute for every saved activation.

Requires: forward and backward graphs with roles and saved storages
(``classify_saved``).
Ensures: the report holds the ``Problem`` (ops, storages, candidates, with
estimated times from the cost model), the chosen ``Plan`` and its simulated
``Prediction`` (step time, device peak, traffic). The graphs are unchanged:
applying the plan is the rewrite passes' job.

With ``offload_params`` (``True``; ``"auto"`` when the resident inputs reach the budget or no
plan fits with them resident), parameters that ``stream_params`` can stream leave the resident
bytes and become fetches: one per phase that reads them, on the host-to-device link, issued just
in time (``schedule_fetches``); the report says which (``streamed``) and where (``fetch_at``).

Under policy ``"auto"``, ``facts.variant`` (set by a trial) names which of auto's plans to make.

Op times are the cost model's estimates, or what an earlier plan of the same graph
measured (``facts.measured_seconds``, when the graph is planned again). The
forward's outputs are held through the step, except those an earlier plan's
steps dropped before backward (``facts.dropped_outputs``): freed when forward ends.

The device peak is predicted from what is resident when the graph starts: its
own inputs (parameters, buffers, the batch) and what the backend found held
outside them when it compiled the graph (other graphs' saved values, optimizer
state).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lohan_compile.errors import BudgetError
from lohan_compile.graph.pipeline import CompileFacts, Graphs
from lohan_compile.graph.problem import profile
from lohan_compile.ops import swap_ops_available
from lohan_compile.passes.stream_params import streamable_params, streamed_elsewhere
from lohan_compile.plan.policies import solve
from lohan_compile.plan.problem import Problem, Rates, fetches_for
from lohan_compile.plan.schedule import schedule_fetches

NAME = "plan_memory"


def plan_memory(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    # auto's plan of this partition, where partition_graph made one to choose it and no pass
    # has changed the graphs since (offload_grads rewrites backward's gradients)
    planned = facts.pass_reports.get("partition_graph", {}).get("planned")
    if facts.pass_reports.get("offload_grads", {}).get("offloaded", 0):
        planned = None
    profiled = planned[0] if planned is not None else profile(graphs.fw, graphs.bw, facts)
    problem, rates, hw = profiled.problem, profiled.rates, profiled.hardware
    if not swap_ops_available():
        planned = None  # (made with swaps allowed)
        problem.candidates = [replace(c, swappable=False) for c in problem.candidates]
    policy = "keep-all" if facts.options.policy == "auto" and facts.options.memory_budget is None else facts.options.policy
    budget = facts.options.memory_budget
    candidates = streamable_params(graphs.fw, facts)
    mode = facts.options.offload_params
    streamed = streamed_elsewhere(graphs.fw, facts)  # another graph streams them: so must this one
    resident = problem.resident_bytes
    if mode is True or (mode == "auto" and budget is not None and candidates
                        and problem.resident_bytes >= budget):
        streamed.update(candidates)
    family = facts.variant[1] if facts.variant is not None and policy == "auto" else None
    try:
        if planned is not None and planned[1] is not None and policy == "auto" and family is None and not streamed:
            plan = planned[1]
        else:
            plan = _solve_streaming(policy, problem, rates, budget, streamed, resident, family)
    except BudgetError:
        if mode != "auto" or not set(candidates) - set(streamed):
            raise
        # the weights fit, but not beside what the step needs: stream them
        streamed.update(candidates)
        plan = _solve_streaming(policy, problem, rates, budget, streamed, resident, family)
    p = plan.prediction
    report = {
        "hardware": hw.name,
        "policy": plan.policy,
        "problem": problem,
        "plan": plan,
        "rates": rates,
        "candidates": len(problem.candidates),
        "plan_family": plan.family,  # auto: which of its plans; alternatives: those that fit, predicted step
        "alternatives": dict(plan.alternatives),
        "predicted_step_s": p.step_seconds,
        "predicted_peak_bytes": p.peak_device_bytes,
        # counted in it: what an earlier plan of this graph ran above its prediction
        "executor_excess_bytes": facts.executor_excess_bytes,
        # counted in it: what code outside the graph (run eagerly) was measured to allocate between
        # this graph's forward and backward, held there
        "outside_bytes": facts.outside_bytes,
        "predicted_host_peak_bytes": p.peak_host_bytes,
        # streamed parameters (input index -> bytes) and where each fetch is issued (op name)
        "streamed": streamed,
        "fetch_at": {(f.input_index, f.phase): problem.ops[f.issue_at].name for f in problem.fetches},
    }
    return graphs, report


def _solve_streaming(policy: str, problem: Problem, rates: Rates, budget: int | None,
                     streamed: dict[int, int], resident: int, family: str | None = None):
    """Plan with ``streamed`` parameters fetched per phase instead of resident (``resident``:
    the device bytes at the start with every input resident; ``problem`` is changed to match
    the plan that is returned)."""
    problem.resident_bytes = resident - sum(streamed.values())
    problem.fetches = fetches_for(problem, streamed)
    problem.fetches = schedule_fetches(problem, rates)
    return solve(policy, problem, rates, budget, family)
