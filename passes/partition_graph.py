"""partition_graph: split the joint graph into forward and backward graphs.

Requires: a joint graph and AOTAutograd's partition arguments (in the facts).
Ensures: ``graphs.fw`` and ``graphs.bw`` are set; the forward graph returns
the user outputs followed by the values saved for backward (descriptors
``SavedForBackwardsAOTOutput``), and the backward graph takes those values in
the same order followed by the tangents. Node metadata, ``meta["lohan"]``
included, is carried over from the joint graph.

With nothing to plan, this is torch's default partitioner, which saves what
the joint graph computed rather than recomputing it: results are bitwise
those of ``aot_eager``. With ``policy="torch-min-cut"`` it is torch's min-cut
partitioner, its activation budget searched to fit ``memory_budget``
(``partition_min_cut``, below; its minimum cut found in C++: ``graph/maxflow.py``). Under ``policy="auto"`` and a budget, with
the fx executor, where auto's plan of the default partition is predicted more
than 2% slower than keeping everything, torch's min-cut partition at its own
default (activation budget 1.0: it recomputes what it finds free to) is also
planned with auto, and where the budget costs more step time, the min-cut
partition of a searched activation budget too; a min-cut partition is kept
when auto predicts it faster (``prefer_min_cut``). With the Inductor executor
none is (Inductor runs min-cut's recomputation above its predicted peak).
The report's ``planned`` holds the chosen partition's ``Profile`` and auto's
plan of it, which ``plan_memory`` uses rather than planning it again.

Partitions are reused: ``facts.partitions`` holds those an earlier compile of the same joint
graph made (a re-plan, a trial's plan), by ``"default"`` or ``("min-cut", activation budget)``,
and ``graphs.partitions`` holds them with any this pass made, untouched by the passes after it
(copies: a joint graph with symbolic sizes partitions the same whatever sizes it is planned for).
A re-plan under ``"auto"`` plans the partition the plan before ran alone, and weighs the others
again where that one's plan no longer fits, or where the replanner asks (``_as_before``).

torch's min-cut partitioner under a budget in bytes: ``min_cut_rematerialization_partition``
decides what forward saves and what backward recomputes, bounded by
``torch._functorch.config.activation_memory_budget`` (a fraction of the activation memory
that saving everything would keep). Our budget is a device peak in bytes, so the fraction is
searched: from 1.0 down, the first fraction whose partition's predicted peak (lohan's
simulator, every saved value kept) fits the budget. The chosen partition is then planned as
keep-all; if no fraction fits, the partition with the smallest peak is kept and
``plan_memory`` raises ``BudgetError`` for it. (Recomputing more does not always lower the
peak: backward then holds the recomputed values at once.)
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._functorch import config as functorch_config
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

from lohan_compile.graph.aot import placeholder_role
from lohan_compile.graph.fxutil import lazy_graph_module
from lohan_compile.graph.maxflow import minimum_cut_in_cpp
from lohan_compile.graph.meta import NodeInfo, Role, get_info, set_info
from lohan_compile.errors import BudgetError
from lohan_compile.graph.pipeline import CompileFacts, Graphs
from lohan_compile.graph.problem import profile
from lohan_compile.passes.classify_saved import classify_saved
from lohan_compile.plan.policies import auto, keep_all

NAME = "partition_graph"


def partition_graph(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    assert graphs.joint is not None and facts.num_fwd_outputs is not None
    counts = {"filled_fake_values": 0, "repaired_output_descs": False, "roles_given": 0}

    def finish(fw: fx.GraphModule, bw: fx.GraphModule) -> None:
        counts["dead_replays_removed"] = counts.get("dead_replays_removed", 0) + drop_dead_replays(bw)
        counts["filled_fake_values"] += fill_missing_vals(fw) + fill_missing_vals(bw)
        counts["repaired_output_descs"] |= repair_output_descs(graphs.joint, fw, bw, facts.num_fwd_outputs)
        counts["roles_given"] += give_roles(fw, Role.FORWARD) + give_roles(bw, Role.BACKWARD)

    partitions = Partitions(graphs.joint, facts, finish)
    trial = facts.variant[0] if facts.variant is not None and facts.options.policy == "auto" else None
    if facts.options.policy == "torch-min-cut":
        fw, bw, report = partition_min_cut(partitions, facts)
        report["partition"] = ("min-cut", report["activation_memory_budget"])
    else:
        fw, bw = partitions.default()
        report = {"partitioner": "default"}
        if trial == "min-cut":
            # the min-cut partition auto weighed when it chose
            fraction = facts.min_cut_fraction if facts.min_cut_fraction is not None else AUTO_MIN_CUT_FRACTION
            fw, bw = partitions.min_cut(fraction)
            report = {"partitioner": "torch min-cut (auto: a trial asked for it)", "activation_memory_budget": fraction}
        elif trial:
            report["partitioner"] = "default (auto: a trial asked for it)"
        elif facts.options.policy == "auto" and facts.options.memory_budget is not None:
            if facts.options.executor == "inductor":
                # Inductor runs the min-cut partition's backward (recomputation chains fused
                # with their users) above the peak the simulator predicts for it, past the
                # budget; the simulator does not model that, so auto under Inductor plans
                # the default partition only.
                report["min_cut"] = "not considered under the Inductor executor"
            else:
                chosen = (_as_before(partitions, fw, bw, facts) if facts.partition_choice is not None else None) \
                    or prefer_min_cut(partitions, fw, bw, facts)
                if chosen is not None:
                    fw, bw, report = chosen
                else:  # (everything fits kept: a re-plan starts from it)
                    report.update(partition="default", weighed=False)

    report.update(counts, fw_nodes=len(fw.graph.nodes), bw_nodes=len(bw.graph.nodes),
                  partitions_reused=partitions.reused, partitions_made=len(partitions.made) - len(facts.partitions))
    return Graphs(joint=graphs.joint, fw=fw, bw=bw, partitions=partitions.made), report


class Partitions:
    """The partitions of one joint graph, made once: each is made by torch's partitioner and
    repaired (``finish``) the first time it is asked for, or copied from ``facts.partitions``
    (an earlier compile's); ``made`` holds an untouched copy of each, for later compiles."""

    def __init__(self, joint: fx.GraphModule, facts: Any, finish: Callable[[fx.GraphModule, fx.GraphModule], None]):
        self.joint, self.facts, self.finish = joint, facts, finish
        self.made: dict[Any, tuple[fx.GraphModule, fx.GraphModule]] = dict(facts.partitions)
        self.reused = 0

    def get(self, key: Any, make: Callable[[], tuple[fx.GraphModule, fx.GraphModule]]) -> tuple[fx.GraphModule, fx.GraphModule]:
        if key not in self.made:
            fw, bw = make()
            self.finish(fw, bw)
            self.made[key] = (_copy(fw), _copy(bw))
            return fw, bw
        self.reused += 1
        fw, bw = self.made[key]
        return _copy(fw), _copy(bw)

    def default(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        facts = self.facts
        return self.get("default", lambda: default_partition(
            self.joint, facts.joint_inputs, num_fwd_outputs=facts.num_fwd_outputs, **facts.partition_kwargs))

    def min_cut(self, fraction: float) -> tuple[fx.GraphModule, fx.GraphModule]:
        """torch's min-cut partition under ``activation_memory_budget=fraction``."""
        def make() -> tuple[fx.GraphModule, fx.GraphModule]:
            joint = _copy(self.joint)  # the partitioner rewrites the graph it is given
            with functorch_config.patch(activation_memory_budget=fraction), minimum_cut_in_cpp():
                return min_cut_rematerialization_partition(
                    joint, self.facts.joint_inputs, "inductor", num_fwd_outputs=self.facts.num_fwd_outputs,
                    **self.facts.partition_kwargs)
        return self.get(("min-cut", fraction), make)


def drop_dead_replays(bw: fx.GraphModule) -> int:
    """Remove forward ops the partitioner copied into backward whose results nothing uses.

    torch 2.13's partitioners extract backward by copying every joint node whose inputs
    backward has, then eliminate dead code; that elimination keeps ops it finds impure, and
    whether it finds an op impure depends on state outside the graph: a second partition of
    the same joint (a re-plan, a trial's plan) can keep forward ops with no users in backward
    (Hugging Face LLaMA's attention forwards, ``_scaled_dot_product_flash_attention_for_cpu``),
    computed and dropped every step. Eager never replays forward ops in backward;
    an op that writes nothing (its schema mutates no argument) and whose result nobody reads
    can go."""
    removed = 0
    for node in reversed(list(bw.graph.nodes)):
        if node.op != "call_function" or node.users or node.meta.get("partitioner_tag") != "is_forward":
            continue
        target = node.target
        pure = target is operator.getitem or (isinstance(target, torch._ops.OpOverload) and not target._schema.is_mutable)
        if not pure:
            continue
        bw.graph.erase_node(node)
        removed += 1
    if removed:
        bw.recompile()
    return removed


def fill_missing_vals(gm: fx.GraphModule) -> int:
    """Give nodes the partitioner created without a fake value one (e.g. the RNG-state
    nodes of a checkpointed region), by running them on the fake values of their inputs."""
    missing = [n for n in gm.graph.nodes if n.op == "call_function" and "val" not in n.meta]
    if not missing:
        return 0
    vals = [n.meta["val"] for n in gm.graph.nodes if "val" in n.meta]
    mode = torch._guards.detect_fake_mode(vals)
    if mode is None:
        return 0
    for n in missing:
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: a.meta.get("val"))
        with mode:
            n.meta["val"] = n.target(*args, **kwargs)
    return len(missing)


def repair_output_descs(joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> bool:
    """Restore the output descriptors when the partitioner rebuilt a graph without them
    (it does when it functionalizes the RNG of a checkpointed region): the forward
    returns the joint's forward outputs then the saved values; the backward returns the
    joint's gradient outputs."""
    from torch._functorch._aot_autograd.descriptors import SavedForBackwardsAOTOutput

    joint_descs = joint.graph.output_node().meta.get("desc")
    if not isinstance(joint_descs, (list, tuple)):
        return False
    repaired = False
    fw_out = fw.graph.output_node()
    n = len(fw_out.args[0])
    if not isinstance(fw_out.meta.get("desc"), (list, tuple)) or len(fw_out.meta["desc"]) != n:
        fw_out.meta["desc"] = list(joint_descs[:num_fwd_outputs]) + [
            SavedForBackwardsAOTOutput(idx=i) for i in range(n - num_fwd_outputs)
        ]
        repaired = True
    bw_out = bw.graph.output_node()
    grads = list(joint_descs[num_fwd_outputs:])
    if not isinstance(bw_out.meta.get("desc"), (list, tuple)) and len(grads) == len(bw_out.args[0]):
        bw_out.meta["desc"] = grads
        repaired = True
    return repaired


def give_roles(gm: fx.GraphModule, role: Role) -> int:
    """Roles for nodes the partitioner made itself (RNG state of checkpointed regions):
    ``role`` for computations, except a replay of a forward op in backward, which is
    a recomputation (role FORWARD, as the partitioner's own copies of forward ops)."""
    given = 0
    for n in gm.graph.nodes:
        if get_info(n) is not None or n.op == "output":
            continue
        if n.op == "placeholder":
            r = placeholder_role(n.meta.get("desc"), None)
        elif n.target is getattr(torch.ops.higher_order, "run_with_rng_state", None):
            r = Role.FORWARD
        else:
            r = role
        set_info(n, NodeInfo(role=r, made_by=NAME))
        given += 1
    return given


# -- torch's min-cut partitioner under a budget in bytes -----------------------------

FRACTIONS = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.0)
# the one auto weighs first: torch's default activation budget (it recomputes what it finds free to)
AUTO_MIN_CUT_FRACTION = 1.0


def partition_min_cut(
    partitions: Partitions,
    facts: Any,
    fractions: tuple[float, ...] = FRACTIONS,
) -> tuple[fx.GraphModule, fx.GraphModule, dict[str, Any]]:
    """``fractions``: the activation budgets tried, in order."""
    budget = facts.options.memory_budget
    tried = []
    best = None  # (peak, fraction, fw, bw): the smallest peak, when no fraction fits
    for fraction in fractions if budget is not None else fractions[:1]:
        fw, bw = partitions.min_cut(fraction)
        if budget is None:
            break
        peak = _keep_all_peak(partitions.joint, fw, bw, facts)
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
    partitions: Partitions,
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    facts: Any,
) -> tuple[fx.GraphModule, fx.GraphModule, dict[str, Any]] | None:
    """For ``policy="auto"`` under a budget that keeping everything misses: plan the default
    partition and torch's min-cut partition with auto, and return the min-cut one when its
    predicted step is faster. Auto recomputes chains of cheap ops from the values the default
    partition saves; min-cut saves other values (fewer, where it finds recomputing them free).
    Where auto's plan of the default partition is predicted
    within ``MIN_CUT_ABOVE`` of keeping everything, no min-cut partition is made: none could
    gain more. The report's ``planned``: the returned partition's ``Profile`` and auto's plan.

    First one min-cut partition, at torch's own activation budget: auto swaps and recomputes on
    top of it what the budget still asks for. Each partition is a max-flow over the whole joint
    graph (on a 48-layer model, a third of the time tracing it takes), so the activation budget
    is searched (``partition_min_cut``) only where the budget costs time: when the faster plan
    so far is predicted more than ``SEARCH_ABOVE`` slower than keeping everything. Lower
    activation budgets recompute longer chains (GPT-2's GELU), which under a tight budget beats
    moving each of their values (a GPT-2 at 30% of its peak: 9.2 against 14.8 ms predicted)."""
    budget, joint = facts.options.memory_budget, partitions.joint
    profiled = _profile(joint, fw, bw, facts)
    problem, rates = profiled.problem, profiled.rates
    ideal = keep_all(problem, rates, None).prediction
    if ideal.peak_device_bytes <= budget:
        return None  # nothing has to move: the default partition is exact and fastest
    default = _auto_plan(problem, rates, budget)
    default_s = _step_s(default)
    # every plan auto could run, by (partition, plan family): a trial times the close ones
    variants = {("default", f): s for f, s in (default.alternatives if default else {}).items()}
    info = {"keep_all_step_s": ideal.step_seconds, "auto_default_partition_step_s": default_s, "variants": variants}
    if default_s <= MIN_CUT_ABOVE * ideal.step_seconds:
        # (no plan of any partition is predicted faster than keeping everything: each adds
        # transfers or recomputation to the same compute)
        return fw, bw, {"partitioner": f"default (auto: within {MIN_CUT_ABOVE - 1:.0%} of keeping everything)",
                        "planned": (profiled, default), "partition": "default", "weighed": False, **info}
    mfw, mbw = partitions.min_cut(AUTO_MIN_CUT_FRACTION)
    mprofiled = _profile(joint, mfw, mbw, facts)
    fraction, plan = AUTO_MIN_CUT_FRACTION, _auto_plan(mprofiled.problem, mprofiled.rates, budget)
    tried = {AUTO_MIN_CUT_FRACTION: _step_s(plan)}
    fits_kept = keep_all(mprofiled.problem, mprofiled.rates, None).prediction.peak_device_bytes <= budget
    if min(default_s, _step_s(plan)) > SEARCH_ABOVE * ideal.step_seconds and not fits_kept:
        # (the search would stop at 1.0, whose partition fits kept: start below it)
        sfw, sbw, searched = partition_min_cut(partitions, facts, FRACTIONS[1:])
        sprofiled = _profile(joint, sfw, sbw, facts)
        splan = _auto_plan(sprofiled.problem, sprofiled.rates, budget)
        tried[searched["activation_memory_budget"]] = _step_s(splan)
        if _step_s(splan) < _step_s(plan):
            mfw, mbw, fraction, plan, mprofiled = sfw, sbw, searched["activation_memory_budget"], splan, sprofiled
    min_cut_s = _step_s(plan)
    variants.update({("min-cut", f): s for f, s in (plan.alternatives if plan else {}).items()})
    info.update(auto_min_cut_partition_step_s=min_cut_s, min_cut_activation_memory_budget=fraction,
                min_cut_step_s_by_budget=tried)
    if min_cut_s < 0.99 * default_s:
        return mfw, mbw, {"partitioner": "torch min-cut (auto: faster predicted step)", "planned": (mprofiled, plan),
                          "partition": ("min-cut", fraction), "weighed": True, **info}
    classify_saved(Graphs(joint=joint, fw=fw, bw=bw), facts)  # the default partition's saved values, classified again
    return fw, bw, {"partitioner": "default (auto: faster predicted step than min-cut)", "planned": (profiled, default),
                    "partition": "default", "weighed": True, **info}


def _as_before(
    partitions: Partitions,
    fw: fx.GraphModule,
    bw: fx.GraphModule,
    facts: Any,
) -> tuple[fx.GraphModule, fx.GraphModule, dict[str, Any]] | None:
    """Planned again (a size grew, the device holds more, an excess was measured): the
    partition the plan before ran (``facts.partition_choice``: the one ``prefer_min_cut``
    chose, or the default partition where nothing was weighed: everything fit kept, or auto's
    plan of it was within ``MIN_CUT_ABOVE`` of keeping everything), planned alone by auto,
    where its plan fits the budget; else None (``prefer_min_cut`` weighs them all again).
    Weighing costs a re-plan more than the rest of it: each min-cut partition is a max-flow
    and two graph extractions over the whole joint graph, several times the profiling and
    planning of one partition, and the search can make eight. The price:
    a re-plan does not look for a min-cut partition the new sizes would favour (a trial after
    it times only that partition's plans, ``variants``) until the replanner asks: where the plan
    before weighed nothing (``facts.partition_weighed`` False), the report's ``gain_bound_s``
    is the most weighing could gain per step, and the replanner plans again with the
    partitions weighed once the steps run since could have lost as much as weighing costs."""
    choice = facts.partition_choice
    if choice == "default":
        cfw, cbw = fw, bw
    elif isinstance(choice, tuple) and choice[0] == "min-cut":
        cfw, cbw = partitions.min_cut(choice[1])
    else:
        return None
    profiled = _profile(partitions.joint, cfw, cbw, facts)
    plan = _auto_plan(profiled.problem, profiled.rates, facts.options.memory_budget)
    if plan is None:
        if choice != "default":
            classify_saved(Graphs(joint=partitions.joint, fw=fw, bw=bw), facts)  # (the default's, again)
        return None
    what = "default" if choice == "default" else "torch min-cut"
    info = {"partitioner": f"{what} (auto: the partition the plan before chose)", "planned": (profiled, plan),
            "partition": choice, "weighed": facts.partition_weighed,
            "variants": {(choice if choice == "default" else "min-cut", f): s for f, s in plan.alternatives.items()}}
    if not facts.partition_weighed:
        # what weighing the partitions could gain at most per step: no plan of any partition is
        # predicted faster than keeping everything (the replanner weighs them once the steps run
        # could have lost as much as weighing costs); none where ``prefer_min_cut`` would weigh
        # nothing either
        ideal = plan.keep_all_step_s
        info["gain_bound_s"] = (_step_s(plan) - ideal) if _step_s(plan) > MIN_CUT_ABOVE * ideal else 0.0
    if choice != "default":
        info.update(activation_memory_budget=choice[1], min_cut_activation_memory_budget=choice[1])
    return cfw, cbw, info


# auto weighs torch's min-cut partition only when its plan of the default partition is predicted
# this much slower than keeping everything: no partition can gain more than that
MIN_CUT_ABOVE = 1.02

# auto searches torch's min-cut activation budget only when its best plan so far is predicted this
# much slower than keeping everything would be
SEARCH_ABOVE = 1.10


def _step_s(plan: Any) -> float:
    return plan.prediction.step_seconds if plan is not None else float("inf")


def _auto_plan(problem: Any, rates: Any, budget: int) -> Any:
    """auto's plan, or None when none fits."""
    try:
        return auto(problem, rates, budget)
    except BudgetError:
        return None


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph whose nodes' meta dicts are shallow copies (fake values are shared,
    not deep-copied: a fake tensor cannot be). Its Python code is generated when first needed
    (a lazy graph module, as dynamo makes them): most copies are only read or rewritten."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, value_map)
    node = graph.output(out)
    node.meta = copy.copy(gm.graph.output_node().meta)
    return lazy_graph_module(gm, graph)


def _keep_all_peak(joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule, facts: Any) -> int:
    """The simulator's device peak of this partition with everything it saves kept."""
    profiled = _profile(joint, fw, bw, facts)
    return keep_all(profiled.problem, profiled.rates, None).prediction.peak_device_bytes


def _profile(joint: fx.GraphModule, fw: fx.GraphModule, bw: fx.GraphModule, facts: Any) -> Any:
    """The planning problem of a partition (its saved values classified), with the link rates."""
    classify_saved(Graphs(joint=joint, fw=fw, bw=bw), facts)
    return profile(fw, bw, facts)
