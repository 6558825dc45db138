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
from lohan_compile.ops import (CHUNK_KERNELS, arg_values, chunking, pure_op_name, pure_op_scratch, swap_ops_available,
                               vocabulary, with_rows_per_chunk)
from lohan_compile.passes.stream_params import streamable_params, streamed_elsewhere
from lohan_compile.plan.policies import solve
from lohan_compile.plan.problem import Plan, Problem, Rates, fetches_for
from lohan_compile.plan.program import predict
from lohan_compile.plan.schedule import schedule_fetches

NAME = "plan_memory"


def plan_memory(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    # auto's plan of this partition, where partition_graph made one to choose it and no pass
    # has changed the graphs since (offload_grads and accumulate_grads rewrite backward's gradients)
    planned = facts.pass_reports.get("partition_graph", {}).get("planned")
    if (facts.pass_reports.get("offload_grads", {}).get("offloaded", 0)
            or facts.pass_reports.get("accumulate_grads", {}).get("accumulated", 0)):
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
    problem, plan, loss_chunks = _fewer_loss_chunks(graphs, facts, problem, plan, rates, hw, budget)
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
        # the chunked loss's ops made with fewer chunks than ``chunk_loss`` made them:
        # (phase, op name) -> rows per chunk, which apply_plan writes into them
        "loss_rows_per_chunk": loss_chunks,
    }
    return graphs, report


FEWER_CHUNKS = (1, 2, 4, 8, 16)  # what "auto" tries before the count ``chunk_loss`` made
# ... where a chunk's fp32 logits take at most this: on the CPU stand-in a larger temporary is
# fresh memory from the system allocator at every chunk (above glibc's largest mmap threshold),
# measured slower than more, smaller chunks (README, "The LM head and its loss")
CHUNK_LOGITS_MAX_BYTES = 32 << 20


def _fewer_loss_chunks(graphs: Graphs, facts: CompileFacts, problem: Problem, plan: Plan, rates: Rates,
                       hw: Any, budget: int | None) -> tuple[Problem, Plan, dict[tuple[str, str], int]]:
    """``loss_chunks="auto"``: ``chunk_loss`` chunks finely (so the smallest budget it leads
    to is the smallest any count reaches); where the plan leaves room under the budget, the
    fewest chunks whose larger scratch still fits with the same decisions, none of more than
    ``CHUNK_LOGITS_MAX_BYTES`` of logits (each chunk costs ``CHUNK_KERNELS`` kernels). Returns
    the problem and plan with those ops' scratch and time, and the rows per chunk by op;
    unchanged where no fewer chunks fit."""
    if facts.options.loss_chunks != "auto" or budget is None or plan.prediction is None:
        return problem, plan, {}
    calls = {}  # (phase, name) -> (op name in PURE_OPS, argument values, rows, rows per chunk)
    for phase, gm in (("fw", graphs.fw), ("bw", graphs.bw)):
        for node in gm.graph.nodes:
            name = pure_op_name(node)
            if name is not None:
                args = tuple(arg_values(node))
                calls[(phase, node.name)] = (name, args, *chunking(name, args))
    if not calls:
        return problem, plan, {}
    scratch_of = {(op.phase, op.name): op.scratch_bytes for op in problem.ops if (op.phase, op.name) in calls}
    current = max(-(-rows // per) for _, _, rows, per in calls.values())
    for count in (c for c in FEWER_CHUNKS if c < current):
        chosen = {key: -(-rows // count) for key, (_, _, rows, _) in calls.items()}
        if any(chosen[key] * vocabulary(name, list(args)) * 4 > CHUNK_LOGITS_MAX_BYTES
               for key, (name, args, _, _) in calls.items()):
            continue
        extra_bytes, extra_s = {}, {}
        for key, (name, args, rows, per) in calls.items():
            now = pure_op_scratch(name, list(args))
            wider = pure_op_scratch(name, list(with_rows_per_chunk(name, args, chosen[key])))
            # (what the problem holds for the op may be measured, above the formula: scaled with it)
            held = scratch_of.get(key, now)
            extra_bytes[key] = max(wider - now, int(held * wider / max(now, 1)) - held)
            extra_s[key] = (-(-rows // chosen[key]) - -(-rows // per)) * CHUNK_KERNELS * hw.op_overhead_s
        ops = [replace(op, seconds=max(op.seconds + extra_s.get((op.phase, op.name), 0.0), 0.0))
               for op in problem.ops]
        wider_problem = replace(problem, ops=ops, fw_seconds=sum(op.seconds for op in ops if op.phase == "fw"),
                                bw_seconds=sum(op.seconds for op in ops if op.phase == "bw")).with_scratch(extra_bytes)
        prediction = predict(wider_problem, plan.decisions, rates)
        if prediction.peak_device_bytes <= budget:
            return wider_problem, replace(plan, prediction=prediction), chosen
    return problem, plan, {}


def _solve_streaming(policy: str, problem: Problem, rates: Rates, budget: int | None,
                     streamed: dict[int, int], resident: int, family: str | None = None):
    """Plan with ``streamed`` parameters fetched per phase instead of resident (``resident``:
    the device bytes at the start with every input resident; ``problem`` is changed to match
    the plan that is returned)."""
    problem.resident_bytes = resident - sum(streamed.values())
    problem.fetches = fetches_for(problem, streamed)
    problem.fetches = schedule_fetches(problem, rates)
    return solve(policy, problem, rates, budget, family)
