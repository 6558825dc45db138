"""plan_memory: decide keep / swap / recompute for every saved activation.

Requires: forward and backward graphs with roles and saved storages
(``classify_saved``).
Ensures: the report holds the ``Problem`` (ops, storages, candidates, with
estimated times from the cost model), the chosen ``Plan`` and its simulated
``Prediction`` (step time, device peak, traffic). The graphs are unchanged:
applying the plan is the rewrite passes' job.

Op times are the cost model's estimates, or what an earlier plan of the same graph
measured (``facts.measured_seconds``, when the graph is planned again).

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
from ..planner import Rates, solve
from ..pipeline import CompileFacts, Graphs
from ..problem import build_problem
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
    problem = build_problem(graphs.fw, graphs.bw, cost)
    problem.resident_bytes = resident_input_bytes(graphs.fw) + facts.resident_outside_bytes
    if not swap_ops_available():
        problem.candidates = [replace(c, swappable=False) for c in problem.candidates]
    rates = Rates(
        d2h_seconds_per_byte=cost.transfer_seconds(1, "d2h"),
        h2d_seconds_per_byte=cost.transfer_seconds(1, "h2d"),
        sharing=hw.sharing,
    )
    policy = "keep-all" if facts.options.policy == "auto" and facts.options.memory_budget is None else facts.options.policy
    plan = solve(policy, problem, rates, facts.options.memory_budget)
    p = plan.prediction
    report = {
        "hardware": hw.name,
        "policy": plan.policy,
        "problem": problem,
        "plan": plan,
        "rates": rates,
        "candidates": len(problem.candidates),
        "predicted_step_s": p.step_seconds,
        "predicted_peak_bytes": p.peak_device_bytes,
        "predicted_host_peak_bytes": p.peak_host_bytes,
    }
    return graphs, report
