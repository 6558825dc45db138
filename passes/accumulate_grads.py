"""accumulate_grads: a gradient added into its parameter's ``.grad`` where backward makes it.

Requires: a backward graph whose outputs are the gradients of the forward's inputs
(descriptors: ``graph.aot.grad_input_index``), and ``facts.inputs``: for each parameter,
whether its ``.grad`` held gradients of earlier micro-batches when the graph was compiled
(``InputFact.grad_held``: defined, strided, no hook reading gradients on their way).
Ensures, for every such parameter whose gradient backward still returns (one offloaded by
``offload_grads`` or reduced for another rank by ``reduce_grads`` returns none):
- right after the gradient is final, ``lohan::accumulate_grad(grad, key, own)``: the runtime
  (``runtime/grads.py``) adds it into ``param.grad`` in place, or makes it the ``.grad`` where
  there is none by then, as autograd would (the tensor itself only where ``own``: no other
  output shares its storage and it is no graph input's, such as a tangent; else a copy);
- the backward graph returns no gradient for it (autograd adds nothing more);
- first in the backward graph (after its inputs), ``lohan::accumulate_check(keys)`` of all of
  them: what autograd would do otherwise (a hook registered since, ``torch.autograd.grad``) is
  refused before any ``.grad`` is added into.
So a step that accumulates micro-batches holds the earlier gradients and one new gradient at a
time, not the earlier ones and all the new ones until backward returns; the planner sees each
gradient freed after its addition (its last use), and the earlier ``.grad`` as resident.
A graph compiled with no ``.grad`` held (a first micro-batch) is unchanged: its gradients
become the ``.grad`` then, held to the end of the step either way.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from lohan_compile.graph.aot import grad_input_index, output_descs
from lohan_compile.graph.fxutil import storage_base
from lohan_compile.graph.meta import NodeInfo, Role, set_info
from lohan_compile.graph.pipeline import CompileFacts, Graphs

NAME = "accumulate_grads"


def accumulate_grads(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    bw = graphs.bw
    out = bw.graph.output_node()
    values = list(out.args[0])
    # storages several outputs return (one gradient for two parameters, say), or a graph input's
    # (a tangent): none of them may itself become a parameter's .grad
    bases = Counter(storage_base(v) for v in values if isinstance(v, fx.Node))
    added = []
    for j, (value, desc) in enumerate(zip(values, output_descs(bw))):
        idx = grad_input_index(desc)
        if idx is None or not isinstance(value, fx.Node) or not facts.inputs[idx].grad_held:
            continue
        val = value.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.layout is not torch.strided:
            continue
        base = storage_base(value)
        own = base.op == "call_function" and bases[base] == 1
        with bw.graph.inserting_after(value):
            node = bw.graph.call_function(torch.ops.lohan.accumulate_grad.default,
                                          (value, facts.inputs[idx].key, own))
        node.meta["val"] = None
        set_info(node, NodeInfo(role=Role.BACKWARD, made_by=NAME, action="accumulate_grad"))
        values[j] = None
        added.append(idx)
    if added:
        out.args = (tuple(values),)
        first = next(n for n in bw.graph.nodes if n.op != "placeholder")
        with bw.graph.inserting_before(first):
            check = bw.graph.call_function(torch.ops.lohan.accumulate_check.default,
                                           ([facts.inputs[idx].key for idx in added],))
        check.meta["val"] = None
        set_info(check, NodeInfo(role=Role.BACKWARD, made_by=NAME, action="accumulate_check"))
        bw.recompile()
    return graphs, {"accumulated": len(added), "accumulated_inputs": added}
