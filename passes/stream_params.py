"""stream_params: parameters live in the host tier; each graph fetches them where it needs them.

Requires: roles (``classify_roles``); in training, the partitioned graphs
(``classify_saved`` for the views of parameters forward saves), and, for a
parameter the optimizer updates, ``offload_grads`` (a streamed parameter has no
device copy at rest for a torch optimizer to update: only a ``CPUAdamW`` that
offloads its gradient can). Reads ``plan_memory``'s report: which parameters it
planned as streamed and where each fetch is issued.
Ensures, for every streamed parameter and each graph (forward, backward, or
the inference graph) that reads it:
- ``lohan::fetch_param(key)`` before the op the plan chose (else just before
  the first use): device memory and the copy in start there;
- ``lohan::param_wait(t, key)`` before the first use of each value holding the
  parameter's storage (the parameter; in backward also the views of it that
  forward saved), every use reading the wait's result;
- ``lohan::release_param(key)`` after the last use of the storage in that graph.
Parameters that are smaller than ``STREAM_MIN_BYTES`` stay resident (as
LoHan keeps biases and norms on the GPU), and so do parameters a graph returns
a view of to the user.

The report says what the runtime must take on (``streamed_inputs``: input index -> whether
the optimizer updates it; ``resident_inputs``: parameters this graph reads without fetching,
which later graphs must not stream): the backend binds it once the pipeline has run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from lohan_compile.graph.fxutil import aliased_input, storage_base, tensor_val
from lohan_compile.graph.meta import NodeInfo, Role, get_info, set_info
from lohan_compile.graph.pipeline import CompileFacts, Graphs
from lohan_compile.graph.shapes import nbytes_hint
from lohan_compile.plan.state import STREAM_MIN_BYTES

NAME = "stream_params"


def streamed_elsewhere(fw: fx.GraphModule, facts: CompileFacts) -> dict[int, int]:
    """Parameters of this graph that an earlier compile streams: every graph reading one must
    fetch it (the earlier graph releases its device memory)."""
    out = {}
    for n in fw.graph.nodes:
        info = get_info(n)
        if n.op == "placeholder" and info is not None and info.role is Role.PARAM and facts.real_inputs:
            if facts.inputs[info.input_index].streamed:
                out[info.input_index] = nbytes_hint(tensor_val(n))
    return out


def offloaded_inputs(facts: CompileFacts) -> set[int]:
    """Parameters whose gradients the optimizer takes during backward: offloaded by an earlier
    graph, or by this one (``offload_grads`` ran before)."""
    this_graph = (facts.pass_reports.get("offload_grads") or {}).get("offloaded_inputs", {})
    return {f.index for f in facts.inputs if f.grad_offloaded} | set(this_graph)


def streamable_params(fw: fx.GraphModule, facts: CompileFacts, *, inference: bool = False) -> dict[int, int]:
    """Parameters of this graph that may be streamed: input index -> bytes. With
    ``offload_params=True``, a trainable parameter without a ``CPUAdamW`` to update it raises.
    Not those an earlier graph compiled as resident (it would read them without a fetch)."""
    mode = facts.options.offload_params
    if mode is False:
        return {}
    offloaded = offloaded_inputs(facts)
    user_views = _user_output_storages(fw)
    out: dict[int, int] = {}
    for n in fw.graph.nodes:
        info = get_info(n)
        if n.op != "placeholder" or info is None or info.role is not Role.PARAM or info.input_index is None:
            continue
        val = tensor_val(n)
        if val is None:
            continue
        nbytes = nbytes_hint(val)
        if nbytes < STREAM_MIN_BYTES or n in user_views:
            continue
        param = facts.real_inputs[info.input_index] if facts.real_inputs else None
        if not isinstance(param, torch.Tensor):
            continue
        fact = facts.inputs[info.input_index]
        if fact.kept_resident:
            continue
        if param.requires_grad and info.input_index not in offloaded and not fact.streamed:
            if mode is True and not inference:
                raise ValueError(
                    f"offload_params=True: the parameter {info.source or n.name} is trained, but no lohan "
                    "CPUAdamW updates it. A streamed parameter has no device copy between steps for "
                    "another optimizer to update: pass optimizer=lohan.CPUAdamW(...) (or freeze it)."
                )
            continue
        out[info.input_index] = nbytes
    return out


def stream_params(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    planned = facts.pass_reports.get("plan_memory")
    if planned is not None and "streamed" in planned:
        chosen = dict(planned["streamed"])
        fetch_at = dict(planned.get("fetch_at", {}))
    else:
        # an inference graph (or plan_memory disabled): stream when the weights exceed the budget
        chosen = streamable_params(graphs.fw, facts, inference=graphs.inference)
        budget = facts.options.memory_budget
        if facts.options.offload_params == "auto":
            resident = sum(nbytes_hint(tensor_val(n)) for n in graphs.fw.graph.nodes
                           if n.op == "placeholder" and tensor_val(n) is not None)
            if budget is None or resident + facts.resident_outside_bytes < budget:
                chosen = {}
        chosen.update(streamed_elsewhere(graphs.fw, facts))
        fetch_at = {}
    resident = [
        info.input_index for n in graphs.fw.graph.nodes
        if n.op == "placeholder" and (info := get_info(n)) is not None and info.role is Role.PARAM
        and facts.real_inputs and info.input_index not in chosen
    ]
    if not chosen:
        return graphs, {"streamed": 0, "resident_inputs": resident}
    keys: dict[int, int] = {}
    streamed_inputs: dict[int, bool] = {}  # input index -> trainable (the optimizer updates it)
    for idx in chosen:
        param = facts.real_inputs[idx]
        if param.device.type == "meta":
            keys[idx] = -1  # explain(): planned, never run
            continue
        keys[idx] = facts.inputs[idx].key
        streamed_inputs[idx] = param.requires_grad and not graphs.inference
    fw_names = {}
    for n in graphs.fw.graph.nodes:
        info = get_info(n)
        if n.op == "placeholder" and info is not None and info.input_index in chosen:
            fw_names[n.name] = info.input_index
    inserted = 0
    for phase, gm in (("fw", graphs.fw), ("bw", graphs.bw)):
        if gm is None:
            continue
        roots: dict[int, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            info = get_info(n)
            if n.op != "placeholder" or info is None:
                continue
            if info.input_index in chosen and info.role is Role.PARAM:
                roots.setdefault(info.input_index, []).append(n)
            elif phase == "bw" and info.saved_input_view and info.storage_of in fw_names:
                roots.setdefault(fw_names[info.storage_of], []).append(n)
        for idx, nodes in roots.items():
            inserted += _rewrite(gm, nodes, keys[idx], fetch_at.get((idx, phase)),
                                 Role.BACKWARD if phase == "bw" else Role.FORWARD)
        gm.recompile()
    return graphs, {
        "streamed": len(chosen),
        "streamed_bytes": sum(chosen.values()),
        "param_ops": inserted,
        "streamed_inputs": streamed_inputs,
        "resident_inputs": resident,
    }


def _rewrite(gm: fx.GraphModule, roots: list[fx.Node], key: int, fetch_before: str | None, role: Role) -> int:
    """Fetch, waits and release of one parameter in one graph. Returns the nodes inserted."""
    ops = torch.ops.lohan
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    used = [r for r in roots if any(u.op != "output" for u in r.users)]
    if not used:
        return 0
    firsts = {r: min((u for u in r.users if u.op != "output"), key=order.__getitem__) for r in used}
    # the last node reading the storage: through views and aliases, not counting the output
    last = None
    stack = list(used)
    seen = set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "output" or u in seen:
                continue
            seen.add(u)
            if last is None or order[u] > order[last]:
                last = u
            if aliased_input(u) is n or (u.op == "call_function" and storage_base(u) in used):
                stack.append(u)
    first = min(firsts.values(), key=order.__getitem__)
    anchor = first
    if fetch_before is not None:
        planned = next((n for n in gm.graph.nodes if n.name == fetch_before), None)
        if planned is not None and order[planned] < order[first]:
            anchor = planned
    with gm.graph.inserting_before(anchor):
        fetch = gm.graph.call_function(ops.fetch_param.default, (key,))
    fetch.meta["val"] = None
    _mark(fetch, "fetch_param", role)
    count = 1
    for r, u in firsts.items():
        with gm.graph.inserting_before(u):
            w = gm.graph.call_function(ops.param_wait.default, (r, key))
        with r.meta["val"].fake_mode:
            w.meta["val"] = ops.param_wait.default(r.meta["val"], key)
        _mark(w, "param_wait", role)
        for user in list(r.users):
            if user is not w and user.op != "output":
                user.replace_input_with(r, w)
        count += 1
    with gm.graph.inserting_after(last):
        rel = gm.graph.call_function(ops.release_param.default, (key,))
    rel.meta["val"] = None
    _mark(rel, "release_param", role)
    return count + 1


def _user_output_storages(fw: fx.GraphModule) -> set[fx.Node]:
    """Placeholders a user-visible output of forward is a view of (they must stay resident)."""
    out = fw.graph.output_node()
    info = get_info(out)
    kinds = info.outputs if info is not None else ()
    held = set()
    for i, v in enumerate(out.args[0]):
        if not isinstance(v, fx.Node):
            continue
        saved = i < len(kinds) and kinds[i].value == "saved"
        base = storage_base(v)
        if not saved and base.op == "placeholder":
            held.add(base)
    return held


def _mark(node: fx.Node, action: str, role: Role) -> None:
    set_info(node, NodeInfo(role=role, made_by=NAME, action=action))
