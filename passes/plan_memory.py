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

import torch

import torch.fx as fx

from ..costmodel import CostModel
from ..fxutil import tensor_val
from ..hardware import resolve
from ..errors import BudgetError
from ..planner import Rates, schedule_fetches, solve
from ..pipeline import CompileFacts, Graphs
from ..problem import Problem, build_problem, fetches_for
from .stream_params import streamable_params, streamed_elsewhere
from ..shapes import nbytes_hint

NAME = "plan_memory"


def swap_ops_available() -> bool:
    from ..ext import load

    load()
    return hasattr(torch.ops.lohan, "swap_out")


def resident_input_bytes(fw: fx.GraphModule) -> int:
    return sum(nbytes_hint(tensor_val(n)) for n in fw.graph.nodes if n.op == "placeholder" and tensor_val(n) is not None)


def plan_memory(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    hw = resolve(facts.options.hardware)
    cost = CostModel(hw, facts.measured_seconds)
    problem = build_problem(graphs.fw, graphs.bw, cost).without_outputs(facts.dropped_outputs)
    problem.resident_bytes = resident_input_bytes(graphs.fw) + facts.resident_outside_bytes + facts.executor_excess_bytes
    if not swap_ops_available():
        problem.candidates = [replace(c, swappable=False) for c in problem.candidates]
    rates = Rates(
        d2h_seconds_per_byte=cost.transfer_seconds(1, "d2h"),
        h2d_seconds_per_byte=cost.transfer_seconds(1, "h2d"),
        sharing=hw.sharing,
    )
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
