"""classify_roles: the role of every node, from AOTAutograd's metadata.

Requires: a joint graph (training) or a forward graph (inference) straight
from AOTAutograd, with ``meta["desc"]`` on placeholders and the output node.
Ensures: every node has ``meta["lohan"]`` with its role; each gradient output's
producer records which inputs it is the gradient of (``grad_of``); the output
node records what each output is.

Roles never come from node names: placeholders from their descriptors and the
backend's example inputs (a ``nn.Parameter``, a static-lifetime buffer, or a
user input), computations from the partitioner's ``is_forward``/``is_backward``
tag, or, where a node carries no tag, from whether it depends on a tangent.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch.fx as fx

from lohan_compile.graph.aot import (
    grad_input_index,
    input_index,
    is_backward_node,
    output_descs,
    output_kind,
    placeholder_role,
)
from lohan_compile.graph.meta import NodeInfo, Role, get_info, set_info
from lohan_compile.graph.pipeline import CompileFacts, Graphs, NodeError

NAME = "classify_roles"


def classify_roles(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    gm = graphs.joint if graphs.joint is not None else graphs.fw
    counts: Counter[str] = Counter()
    backward: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            info = _placeholder_info(node, facts)
            if info.role is Role.TANGENT:
                backward.add(node)
        elif node.op == "output":
            info = _output_info(node, gm)
        elif node.op in ("call_function", "call_method", "call_module", "get_attr"):
            tagged = is_backward_node(node)
            is_bw = tagged if tagged is not None else any(a in backward for a in node.all_input_nodes)
            if is_bw:
                backward.add(node)
            info = NodeInfo(role=Role.BACKWARD if is_bw else Role.FORWARD, made_by=NAME)
        else:
            raise NodeError(node, f"unexpected node op {node.op!r}")
        set_info(node, info)
        counts[info.role.value] += 1

    grads = _record_gradients(gm)
    report: dict[str, Any] = {"roles": dict(counts), "gradients": grads}
    return graphs, report


def _placeholder_info(node: fx.Node, facts: CompileFacts) -> NodeInfo:
    desc = node.meta.get("desc")
    idx = input_index(desc)
    fact = facts.inputs[idx] if idx is not None and idx < len(facts.inputs) else None
    role = placeholder_role(desc, fact.kind if fact is not None else None)
    return NodeInfo(
        role=role,
        made_by=NAME,
        input_index=idx,
        source=fact.source if fact is not None else None,
        requires_grad=bool(fact and fact.requires_grad),
    )


def _output_info(node: fx.Node, gm: fx.GraphModule) -> NodeInfo:
    kinds = tuple(output_kind(d) for d in output_descs(gm))
    return NodeInfo(role=Role.OUTPUT, made_by=NAME, outputs=kinds)


def _record_gradients(gm: fx.GraphModule) -> int:
    """Mark each gradient output's producer with the inputs it is the gradient of."""
    out = gm.graph.output_node()
    found = 0
    for value, desc in zip(out.args[0], output_descs(gm)):
        idx = grad_input_index(desc)
        if idx is None or not isinstance(value, fx.Node):
            continue
        info = get_info(value)
        if info is None:
            raise NodeError(value, "gradient output has no role")
        set_info(value, info.with_(grad_of=info.grad_of + (idx,)))
        found += 1
    return found

