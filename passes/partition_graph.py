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
(``lohan_compile/mincut.py``). Under ``policy="auto"`` and a budget, with
the fx executor, the min-cut partition is also planned and kept when auto
predicts it faster (``prefer_min_cut``); with the Inductor executor it is not
(Inductor runs it above its predicted peak).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch._functorch.partitioners import default_partition

from ..aot import placeholder_role
from ..meta import NodeInfo, Role, get_info, set_info
from ..pipeline import CompileFacts, Graphs

NAME = "partition_graph"


def partition_graph(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    assert graphs.joint is not None and facts.num_fwd_outputs is not None
    counts = {"filled_fake_values": 0, "repaired_output_descs": False, "roles_given": 0}

    def finish(fw: fx.GraphModule, bw: fx.GraphModule) -> None:
        counts["dead_replays_removed"] = counts.get("dead_replays_removed", 0) + drop_dead_replays(bw)
        counts["filled_fake_values"] += fill_missing_vals(fw) + fill_missing_vals(bw)
        counts["repaired_output_descs"] |= repair_output_descs(graphs.joint, fw, bw, facts.num_fwd_outputs)
        counts["roles_given"] += give_roles(fw, Role.FORWARD) + give_roles(bw, Role.BACKWARD)

    trial = facts.variant[0] if facts.variant is not None and facts.options.policy == "auto" else None
    if facts.options.policy == "torch-min-cut" or trial == "min-cut":
        from ..mincut import partition_min_cut

        fw, bw, report = partition_min_cut(graphs.joint, facts, finish)
        if trial:
            report["partitioner"] = "torch min-cut (auto: a trial asked for it)"
    else:
        fw, bw = default_partition(
            graphs.joint,
            facts.joint_inputs,
            num_fwd_outputs=facts.num_fwd_outputs,
            **facts.partition_kwargs,
        )
        finish(fw, bw)
        report = {"partitioner": "default"}
        if trial:
            report["partitioner"] = "default (auto: a trial asked for it)"
        elif facts.options.policy == "auto" and facts.options.memory_budget is not None:
            if facts.options.executor == "inductor":
                # Inductor runs the min-cut partition's backward (recomputation chains fused
                # with their users) above the peak the simulator predicts for it, by 5-11%
                # measured: past the budget. Until that is modeled, auto under Inductor
                # plans the default partition only.
                report["min_cut"] = "not considered under the Inductor executor"
            else:
                from ..mincut import prefer_min_cut

                chosen = prefer_min_cut(graphs.joint, fw, bw, facts, finish)
                if chosen is not None:
                    fw, bw, report = chosen
    report.update(counts, fw_nodes=len(fw.graph.nodes), bw_nodes=len(bw.graph.nodes))
    return Graphs(joint=graphs.joint, fw=fw, bw=bw), report


def drop_dead_replays(bw: fx.GraphModule) -> int:
    """Remove forward ops the partitioner copied into backward whose results nothing uses.

    torch 2.13's partitioners extract backward by copying every joint node whose inputs
    backward has, then eliminate dead code; that elimination keeps ops it finds impure, and
    whether it finds an op impure depends on state outside the graph: after a first compile of
    a graph, a second partition of the same joint kept Hugging Face LLaMA's four attention
    forwards (``_scaled_dot_product_flash_attention_for_cpu``, no users) in backward, computed
    and dropped every step (auto's re-plans and trial plans ran 10% slower than the fixed
    policies' plans, made at a first compile). Eager never replays forward ops in backward;
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
