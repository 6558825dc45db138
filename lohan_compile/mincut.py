"""The ``"torch-min-cut"`` baseline: torch's own min-cut partitioner under a memory budget.

torch's ``min_cut_rematerialization_partition`` decides what forward saves and
what backward recomputes, bounded by ``torch._functorch.config.activation_memory_budget``
(a fraction of the activation memory that saving everything would keep). Our
budget is a device peak in bytes, so the fraction is searched: from 1.0 down,
the first fraction whose partition's predicted peak (lohan's simulator, every
saved value kept) fits the budget. The chosen partition is then planned as
keep-all; if no fraction fits, the partition with the smallest peak is kept and
``plan_memory`` raises ``BudgetError`` for it. (Recomputing more does not always
lower the peak: backward then holds the recomputed values at once.)
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch.fx as fx

FRACTIONS = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.0)


def partition_min_cut(
    joint: fx.GraphModule,
    facts: Any,
    finish: Callable[[fx.GraphModule, fx.GraphModule], None],
) -> tuple[fx.GraphModule, fx.GraphModule, dict[str, Any]]:
    """``finish(fw, bw)`` repairs what a partitioner leaves (fake values, descriptors, roles)."""
    from torch._functorch import config as functorch_config
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    budget = facts.options.memory_budget

    def attempt(fraction: float) -> tuple[fx.GraphModule, fx.GraphModule]:
        j = _copy(joint)  # the partitioner rewrites the graph it is given
        with functorch_config.patch(activation_memory_budget=fraction):
            fw, bw = min_cut_rematerialization_partition(
                j, facts.joint_inputs, "inductor", num_fwd_outputs=facts.num_fwd_outputs, **facts.partition_kwargs
            )
        finish(fw, bw)
        return fw, bw

    tried = []
    best = None  # (peak, fraction, fw, bw): the smallest peak, when no fraction fits
    for fraction in FRACTIONS if budget is not None else (1.0,):
        fw, bw = attempt(fraction)
        if budget is None:
            break
        peak = _keep_all_peak(joint, fw, bw, facts)
        tried.append((fraction, peak))
        if peak <= budget:
            break
        if best is None or peak < best[0]:
            best = (peak, fraction, fw, bw)
    else:
        # none fits: the partition with the smallest peak (plan_memory raises BudgetError for it)
        _, fraction, fw, bw = best
    return fw, bw, {"partitioner": "torch min-cut", "activation_memory_budget": fraction,
                    "fractions_tried": tried}


def prefer_min_cut(
    joint: fx.GraphModule,
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    facts: Any,
    finish: Callable[[fx.GraphModule, fx.GraphModule], None],
) -> tuple[fx.GraphModule, fx.GraphModule, dict[str, Any]] | None:
    """For ``policy="auto"`` under a budget that keeping everything misses: plan the default
    partition and torch's min-cut partition with auto, and return the min-cut one when its
    predicted step is faster. Auto itself recomputes single ops from saved inputs; min-cut
    recomputes chains of cheap ops, which wins when much must be recomputed."""
    from .errors import BudgetError
    from .planner import auto, keep_all

    budget = facts.options.memory_budget
    problem, rates = _problem(joint, fw, bw, facts)
    if keep_all(problem, rates, None).prediction.peak_device_bytes <= budget:
        return None  # nothing has to move: the default partition is exact and fastest

    def auto_plan(problem, rates):
        try:
            return auto(problem, rates, budget)
        except BudgetError:
            return None

    default = auto_plan(problem, rates)
    mfw, mbw, info = partition_min_cut(joint, facts, finish)
    min_cut = auto_plan(*_problem(joint, mfw, mbw, facts))
    default_s = default.prediction.step_seconds if default is not None else float("inf")
    min_cut_s = min_cut.prediction.step_seconds if min_cut is not None else float("inf")
    # every plan auto could run, by (partition, plan family): a trial times the close ones
    variants = {("default", f): s for f, s in (default.alternatives if default else {}).items()}
    variants.update({("min-cut", f): s for f, s in (min_cut.alternatives if min_cut else {}).items()})
    info = {"auto_default_partition_step_s": default_s, "auto_min_cut_partition_step_s": min_cut_s,
            "min_cut_activation_memory_budget": info["activation_memory_budget"], "variants": variants}
    if min_cut_s < 0.99 * default_s:
        return mfw, mbw, {"partitioner": "torch min-cut (auto: faster predicted step)", **info}
    _problem(joint, fw, bw, facts)  # the default partition's saved values, classified again
    return fw, bw, {"partitioner": "default (auto: faster predicted step than min-cut)", **info}


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph whose nodes' meta dicts are shallow copies (fake values are shared,
    not deep-copied: a fake tensor cannot be)."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, value_map)
    node = graph.output(out)
    node.meta = copy.copy(gm.graph.output_node().meta)
    return fx.GraphModule(gm, graph)


def _keep_all_peak(joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule, facts: Any) -> int:
    """The simulator's device peak of this partition with everything it saves kept."""
    from .planner import keep_all

    problem, rates = _problem(joint, fw, bw, facts)
    return keep_all(problem, rates, None).prediction.peak_device_bytes


def _problem(joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule, facts: Any) -> tuple[Any, Any]:
    """The planning problem of a partition (its saved values classified), and the link rates."""
    from .costmodel import CostModel
    from .hardware import resolve
    from .passes.classify_saved import classify_saved
    from .passes.plan_memory import resident_input_bytes
    from .pipeline import Graphs
    from .planner import Rates
    from .problem import build_problem

    classify_saved(Graphs(joint=joint, fw=fw, bw=bw), facts)
    hw = resolve(facts.options.hardware)
    cost = CostModel(hw, facts.measured_seconds)  # what an earlier plan measured, as plan_memory does
    problem = build_problem(fw, bw, cost).without_outputs(facts.dropped_outputs)
    problem.resident_bytes = resident_input_bytes(fw) + facts.resident_outside_bytes + facts.executor_excess_bytes
    rates = Rates(cost.transfer_seconds(1, "d2h"), cost.transfer_seconds(1, "h2d"), sharing=hw.sharing)
    return problem, rates
