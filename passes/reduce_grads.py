"""reduce_grads: under data parallelism, each parameter's gradient is averaged over the ranks
inside the backward graph, as backward makes it.

Requires: forward and backward graphs with roles (``classify_roles``), and
``facts.data_parallel`` (the process group; None: one process, or a model whose gradients
``DistributedDataParallel`` reduces, and the pass does nothing).
Ensures, for every parameter gradient the backward graph returns:
- ``g / world`` goes into ``_c10d_functional.all_reduce(·, "sum", group)`` (torch's functional
  collective, asynchronous: gloo or NCCL reduces while backward computes on), and
  ``_c10d_functional.wait_tensor`` of it stands where the gradient stood in the outputs, so a
  later pass (``offload_grads``) and the optimizer see the average over the ranks;
- every rank issues its collectives in one order, whatever its plan: the order the joint
  graph makes the gradients in (the same trace on every rank; ties by decreasing parameter
  index). A collective is issued once its gradients exist and the one before it in that
  order was issued. Ranks may run different plans (a re-plan after a measured excess, a trial
  of another partition), which may compute the gradients in another order; collectives matched
  in another order would add up different tensors;
- small gradients (under ``SMALL_GRAD_BYTES``) consecutive in that order and of one dtype are
  reduced in one collective (``all_reduce_coalesced``, up to ``BUCKET_BYTES`` and a sixteenth
  of the gradient bytes): one round trip instead of one each;
- each wait stands right before the next collective is issued (the last one before backward
  returns): one reduction in flight while the next gradient is computed, and only one
  reduced buffer held beyond its gradient;
- where the ranks' optimizers share the update (``group.owners``), a rank keeps the averages
  of the parameters it updates only: the backward returns no gradient for the others (their
  owner's optimizer updates them, and ``opt.step()`` brings the weight here).
The waits are collectives' own (``_c10d_functional.wait_tensor``), which both executors run
in graph order (the Inductor executor runs collectives outside its segments).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from lohan_compile.graph.aot import grad_input_index, output_descs
from lohan_compile.graph.fxutil import ALL_REDUCE, ALL_REDUCE_COALESCED, COLLECTIVE_WAIT
from lohan_compile.graph.meta import NodeInfo, Role, get_info, set_info
from lohan_compile.graph.pipeline import CompileFacts, Graphs
from lohan_compile.graph.shapes import nbytes_hint

NAME = "reduce_grads"

SMALL_GRAD_BYTES = 64 * 1024  # gradients below this are reduced together, in one collective
BUCKET_BYTES = 1024 * 1024  # ... of at most this many bytes



def reduce_grads(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    group = facts.data_parallel
    if group is None:
        return graphs, {"world": 1, "reduced": 0}
    bw = graphs.bw
    out = bw.graph.output_node()
    values = list(out.args[0])
    grads = []  # (input index, position in outputs, gradient node)
    for j, (value, desc) in enumerate(zip(values, output_descs(bw))):
        idx = grad_input_index(desc)
        if idx is not None and isinstance(value, fx.Node) and facts.inputs[idx].kind == "param":
            grads.append((idx, j, value))
    order_made = _joint_order(graphs.joint)
    grads.sort(key=lambda g: (order_made.get(g[0], len(order_made)), -g[0]))  # the order every rank issues them in

    order = {n: i for i, n in enumerate(bw.graph.nodes)}
    after, after_at = None, -1  # the last collective issued, and the position of what it follows
    issued = []  # per collective: (its first scaling node, [(input index, output position, result)])
    for bucket in _buckets(grads):
        last = max((grad for _, _, grad in bucket), key=order.__getitem__)
        if order[last] > after_at:
            anchor, after_at = last, order[last]
        else:
            anchor = after  # (its gradients were made before the previous collective was issued)
        with bw.graph.inserting_before(anchor.next):  # (in this order, right after it)
            scaled = []
            for _, _, grad in bucket:
                node = bw.graph.call_function(torch.ops.aten.div.Tensor, (grad, group.world))
                node.meta["val"] = _fake(lambda v: v / group.world, grad.meta["val"])
                _mark(node, "grad_scale")
                scaled.append(node)
            if len(bucket) == 1:
                reduce = bw.graph.call_function(ALL_REDUCE, (scaled[0], "sum", group.group_name))
                reduce.meta["val"] = _fake(torch.empty_like, scaled[0].meta["val"])
                results = [reduce]
            else:
                # small gradients of one dtype in one collective: one round trip, not one each
                reduce = bw.graph.call_function(ALL_REDUCE_COALESCED, (scaled, "sum", group.group_name))
                reduce.meta["val"] = [_fake(torch.empty_like, v.meta["val"]) for v in scaled]
                results = []
                for k, v in enumerate(reduce.meta["val"]):
                    item = bw.graph.call_function(operator.getitem, (reduce, k))
                    item.meta["val"] = v
                    _mark(item, "grad_reduce")
                    results.append(item)
        _mark(reduce, "grad_reduce")
        issued.append((scaled[0], [(idx, j, r) for (idx, j, _), r in zip(bucket, results)]))
        after = results[-1]
    dropped = []
    for n, (_, members) in enumerate(issued):
        anchor = issued[n + 1][0] if n + 1 < len(issued) else out  # the next collective's scaling
        for idx, j, result in members:
            with bw.graph.inserting_before(anchor):
                wait = bw.graph.call_function(COLLECTIVE_WAIT, (result,))
            wait.meta["val"] = result.meta["val"]
            _mark(wait, "grad_reduce_wait")
            if group.owners.get(idx, group.rank) == group.rank:
                values[j] = wait
            else:
                # another rank updates this parameter: its average is not kept here (the wait
                # stays: the collective's buffer must not be reused before it completes)
                values[j] = None
                dropped.append(idx)
    out.args = (tuple(values),)
    bw.recompile()
    return graphs, {
        "world": group.world,
        "group": group.group_name,
        "reduced": len(grads),
        "collectives": len(issued),
        # input index -> the rank that updates it (the others receive its weight at step())
        "owners": dict(group.owners),
        "dropped": sorted(dropped),
        "reduced_bytes": sum(nbytes_hint(g.meta["val"]) for _, _, g in grads),
    }


def _joint_order(joint: fx.GraphModule | None) -> dict[int, int]:
    """Input index -> position in the joint graph of the node that makes its gradient: the
    order AOTAutograd traced backward in, the same on every rank (the same model traced the
    same way), whatever partition and plan each runs."""
    made: dict[int, int] = {}
    if joint is None:
        return made
    for pos, n in enumerate(joint.graph.nodes):
        info = get_info(n)
        for idx in (info.grad_of if info is not None else ()):
            made.setdefault(idx, pos)
    return made


def _buckets(grads: list) -> list[list]:
    """Gradients in issue order, grouped: a large one alone, a run of small ones of one dtype
    (consecutive in that order) together, up to ``BUCKET_BYTES`` and a sixteenth of all the
    gradient bytes (a bucket's results exist at once: they stay small beside the step's peak)."""
    cap = min(BUCKET_BYTES, sum(nbytes_hint(g[2].meta["val"]) for g in grads) // 16)
    buckets: list[list] = []
    run: list = []
    for g in grads:
        val = g[2].meta["val"]
        small = nbytes_hint(val) < SMALL_GRAD_BYTES
        if run and (not small or val.dtype != run[0][2].meta["val"].dtype
                    or sum(nbytes_hint(m[2].meta["val"]) for m in run) + nbytes_hint(val) > cap):
            buckets.append(run)
            run = []
        if small:
            run.append(g)
        else:
            buckets.append([g])
    if run:
        buckets.append(run)
    return buckets


def _fake(fn: Any, val: torch.Tensor) -> torch.Tensor:
    with val.fake_mode:
        return fn(val)


def _mark(node: fx.Node, action: str) -> None:
    set_info(node, NodeInfo(role=Role.BACKWARD, made_by=NAME, action=action))
