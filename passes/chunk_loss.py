"""chunk_loss: the LM head's cross-entropy, forward and backward, a chunk of tokens at a time.

Requires: a joint graph with roles (``classify_roles``), before it is partitioned.
Finds the region ``logits = mm(hidden, weight_t)`` → (views, a cast such as ``.float()``) →
``_log_softmax`` → ``nll_loss_forward`` (mean or sum, no class weights), with its backward
``nll_loss_backward`` → ``_log_softmax_backward_data`` → (views, the cast back, the logits'
own tangent added where they are also an output) → the two ``mm`` that make the gradients of
``hidden`` and of the weight. Where it finds one and decides to chunk (below), it ensures:
- forward: ``lohan::chunked_ce_forward(logits, target, ...)`` gives the loss, the total weight
  and each token's log-sum-exp (fp32), a chunk of tokens at a time: no log-softmax of all the
  tokens exists, and nothing of vocabulary size is saved for backward;
- backward: ``lohan::chunked_linear_ce_backward(...)`` recomputes each chunk's logits from the
  hidden states and the weight, and gives both gradients, in place of the two ``mm``: no
  gradient of all the logits exists (the logits' own tangent, which AOTAutograd materializes
  when the logits are an output, is read a chunk at a time);
- the nodes the two ops replace are erased; results equal the unchunked graph's up to the
  order of the loss's sum and of the weight gradient's (fp32) accumulation.
Where nothing but the loss reads the logits (a model that returns only its loss), forward is
``lohan::chunked_linear_ce_forward(hidden, weight_t, target, ...)`` instead: it makes each
chunk's logits from the hidden states and the weight, so the logits never exist whole. Where the
model returns them (Hugging Face models do), they stay: an output must exist whole. Other shapes of the region (logits sliced before the loss, a bias, the loss
in another graph after a graph break) are left as they are, and the report says why.

When: option ``loss_chunks`` (an int: that many chunks, 1 never) or ``"auto"``: under a
memory budget, where the region's fp32 logits take at least ``AUTO_MIN_BYTES``, in
``AUTO_CHUNKS`` chunks; without a budget never (the graph stays the one torch would run).
The count made here does not depend on the budget's size, so the smallest budget a
``BudgetError`` names is one the same chunking fits; under ``"auto"``, ``plan_memory`` then
gives the ops fewer chunks where the plan leaves room (its report's ``loss_rows_per_chunk``:
the count the step runs; this pass's report keeps the count it made).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from lohan_compile.graph.meta import NodeInfo, Role, get_info, set_info
from lohan_compile.graph.pipeline import CompileFacts, Graphs
from lohan_compile.graph.shapes import hint_int
from lohan_compile.ops import arg_values, chunking, pure_op_name, vocabulary

NAME = "chunk_loss"

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}
AUTO_MIN_BYTES = 4 << 20  # "auto" chunks a region whose fp32 logits take at least this
AUTO_CHUNKS = 32  # ... in this many chunks: each holds 3/32 of the logits' fp32 bytes at its peak


def chunk_loss_may_apply(options: Any, gm: fx.GraphModule | None = None) -> bool:
    """Whether, with these options, the pass may chunk a loss of dynamo's graph ``gm`` (before
    AOTAutograd traces it): then the backend keeps ``LOSS_OPS`` whole when it traces for
    Inductor. Under ``"auto"``: a budget, and a ``cross_entropy`` whose input is large enough."""
    setting = options.loss_chunks
    if setting == 1 or (setting == "auto" and options.memory_budget is None):
        return False
    if setting != "auto" or gm is None:
        return True
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _CROSS_ENTROPY and node.args:
            val = node.args[0].meta.get("example_value") if isinstance(node.args[0], fx.Node) else None
            if isinstance(val, torch.Tensor) and hint_int(val.numel()) * 4 >= AUTO_MIN_BYTES:
                return True
    return False


# how dynamo's graphs call the loss
_CROSS_ENTROPY = (torch.nn.functional.cross_entropy, torch.nn.functional.nll_loss)


@dataclass
class _Region:
    loss: fx.Node  # nll_loss_forward
    logits: fx.Node  # mm(hidden, weight_t)
    hidden: fx.Node
    weight_t: fx.Node
    target: fx.Node
    compute_dtype: torch.dtype
    grad_loss: fx.Node
    tangent: fx.Node | None
    grad_hidden_mm: fx.Node
    grad_weight_mm: fx.Node
    logits_private: bool  # nothing but the loss reads the logits: forward makes them a chunk at a time too
    rows: int
    vocab: int
    hidden_size: int
    itemsize: int  # of the logits (and the weight)


def chunk_loss(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    joint = graphs.joint
    if joint is None:
        return graphs, {"chunked": 0}
    setting = facts.options.loss_chunks
    if setting == 1:
        return graphs, {"chunked": 0, "why": "loss_chunks=1"}
    done = _chunked_before(joint)
    if done:
        # (a re-plan of a joint graph this pass rewrote already: the same regions, reported again)
        return graphs, {"chunked": len(done), "regions": done, "skipped": []}
    regions, skipped = [], []
    for node in list(joint.graph.nodes):
        if node.op == "call_function" and node.target is aten.nll_loss_forward.default:
            region = _match(node)
            if isinstance(region, str):
                skipped.append(f"{node.name}: {region}")
            else:
                regions.append(region)
    chunked = []
    for region in regions:
        full_bytes = region.rows * region.vocab * 4
        if setting == "auto":
            if facts.options.memory_budget is None:
                skipped.append(f"{region.loss.name}: no memory budget")
                continue
            if full_bytes < AUTO_MIN_BYTES:
                skipped.append(f"{region.loss.name}: fp32 logits of {full_bytes} bytes, under {AUTO_MIN_BYTES}")
                continue
            accumulator = region.vocab * region.hidden_size * 4 if region.itemsize != 4 else 0
            if accumulator * 2 > full_bytes:
                skipped.append(f"{region.loss.name}: the weight gradient's fp32 accumulator ({accumulator} bytes) "
                               "would take more than chunking saves")
                continue
            chunks = AUTO_CHUNKS
        else:
            chunks = int(setting)
        chunks = max(1, min(chunks, region.rows))
        if chunks == 1:
            continue
        _rewrite(joint, region, math.ceil(region.rows / chunks))
        chunked.append(region)
    if chunked:
        joint.recompile()
    done = _chunked_before(joint)
    return graphs, {"chunked": len(done), "regions": done, "skipped": skipped}


def _chunked_before(joint: fx.GraphModule) -> list[dict[str, Any]]:
    """The regions an earlier run of this pass chunked in ``joint``."""
    out = []
    for node in joint.graph.nodes:
        name = pure_op_name(node)
        if name not in ("chunked_ce_forward", "chunked_linear_ce_forward"):
            continue
        args = arg_values(node)
        (rows, rows_per_chunk), vocab = chunking(name, args), vocabulary(name, args)
        whole = name == "chunked_ce_forward"
        out.append({"loss": node.name, "rows": rows, "vocab": vocab,
                    "chunks": math.ceil(rows / rows_per_chunk), "rows_per_chunk": rows_per_chunk,
                    "logits_fp32_bytes": rows * vocab * 4,
                    "logits": "made whole (read outside the loss)" if whole else "made a chunk at a time"})
    return out


def _match(loss: fx.Node) -> _Region | str:
    """The region around ``loss`` (an ``nll_loss_forward``), or why it is not one."""
    log_probs, target, weight, reduction, ignore_index = (list(loss.args) + [None] * 5)[:5]
    if weight is not None or reduction not in (1, 2) or loss.kwargs:
        return "class weights, reduction 'none' or keyword arguments"
    if not (isinstance(log_probs, fx.Node) and log_probs.target is aten._log_softmax.default
            and log_probs.args[1] in (1, -1) and not log_probs.args[2]):
        return "not the log-softmax over the last dimension of 2-d logits"
    x = log_probs.args[0]
    xval = x.meta.get("val")
    if not isinstance(xval, torch.Tensor) or xval.dim() != 2:
        return "logits are not 2-d"
    node = x
    while node.op == "call_function" and (node.target in _VIEWS or _is_plain_cast(node)):
        node = node.args[0]
    logits = node
    if logits.op != "call_function" or logits.target is not aten.mm.default:
        return f"the logits come from {logits.format_node()}, not from the head's mm"
    lval = logits.meta.get("val")
    if tuple(lval.shape) != tuple(xval.shape) or not lval.is_contiguous():
        return "the logits are reshaped or sliced before the loss"
    hidden, weight_t = logits.args
    # backward: nll_loss_backward(grad, log_probs, target, None, reduction, ignore_index, total_weight)
    nll_bw = [u for u in log_probs.users if u.target is aten.nll_loss_backward.default]
    if len(nll_bw) != 1 or nll_bw[0].args[2] is not target:
        return "no backward of the loss in this graph"
    softmax_bw = [u for u in nll_bw[0].users if u.target is aten._log_softmax_backward_data.default]
    if len(softmax_bw) != 1 or len(nll_bw[0].users) != 1:
        return "the loss's backward is used elsewhere"
    node, tangent = softmax_bw[0], None
    while len(node.users) == 1:
        (user,) = node.users
        if user.target in _VIEWS or _is_plain_cast(user):
            node = user
        elif user.target is aten.add.Tensor and tangent is None and len(user.args) == 2 and not user.kwargs:
            other = user.args[1] if user.args[0] is node else user.args[0]
            info = get_info(other) if isinstance(other, fx.Node) else None
            if info is None or info.role is not Role.TANGENT:
                return "the logits' gradient is added to something other than their own tangent"
            tangent, node = other, user
        else:
            break
    grad = node
    gval = grad.meta.get("val")
    if not isinstance(gval, torch.Tensor) or tuple(gval.shape) != tuple(lval.shape) or gval.dtype != lval.dtype:
        return "the logits' gradient does not reach the head's mm as one 2-d tensor"
    grad_hidden_mm = grad_weight_mm = None
    for user in grad.users:
        if user.target is aten.mm.default and user.args[0] is grad and _is_transpose_of(user.args[1], weight_t):
            grad_hidden_mm = user
        elif _is_transpose(user) and len(user.users) == 1:
            (mm,) = user.users
            if mm.target is aten.mm.default and mm.args[0] is user and mm.args[1] is hidden:
                grad_weight_mm = mm
    if grad_hidden_mm is None or grad_weight_mm is None or len(grad.users) != 2:
        return "the logits' gradient is read by more than the head's two gradient mm"
    private = _only_read_by(logits, x, {loss, nll_bw[0], softmax_bw[0]}, log_probs)
    return _Region(loss, logits, hidden, weight_t, target, xval.dtype, nll_bw[0].args[0], tangent,
                   grad_hidden_mm, grad_weight_mm, private, hint_int(lval.shape[0]), hint_int(lval.shape[1]),
                   hint_int(hidden.meta["val"].shape[1]), lval.element_size())


def _only_read_by(logits: fx.Node, x: fx.Node, loss_nodes: set[fx.Node], log_probs: fx.Node) -> bool:
    """Whether the chain ``logits`` → (views, casts) → ``x`` → ``log_probs`` is read by nothing
    but that chain and ``loss_nodes`` (the nodes the rewrite erases): no output, no other use."""
    node = logits
    while node is not x:
        if len(node.users) != 1:
            return False
        (node,) = node.users
    if set(x.users) != {log_probs}:
        return False
    readers = list(log_probs.users)
    while readers:  # (backward reads the log-probabilities through ``detach`` or ``alias``)
        reader = readers.pop()
        if reader.target in (aten.detach.default, aten.alias.default):
            readers.extend(reader.users)
        elif reader not in loss_nodes:
            return False
    return True


def _is_plain_cast(node: fx.Node) -> bool:
    """A dtype conversion and nothing else (``.float()``, ``.to(bfloat16)``)."""
    if node.target is torch.ops.prims.convert_element_type.default:
        return True
    return node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype"}


def _is_transpose(node: Any) -> bool:
    """``t(x)`` or ``permute(x, [1, 0])`` of a 2-d ``x``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    return node.target is aten.t.default or (node.target is aten.permute.default and list(node.args[1]) == [1, 0])


def _is_transpose_of(node: Any, of: fx.Node) -> bool:
    return _is_transpose(node) and node.args[0] is of


def _rewrite(joint: fx.GraphModule, r: _Region, rows_per_chunk: int) -> None:
    graph = joint.graph
    ignore_index, reduction = r.loss.args[4], r.loss.args[3]
    with graph.inserting_after(r.loss):
        if r.logits_private:
            fwd = graph.call_function(torch.ops.lohan.chunked_linear_ce_forward.default,
                                      (r.hidden, r.weight_t, r.target, ignore_index, reduction, r.compute_dtype,
                                       rows_per_chunk))
        else:
            fwd = graph.call_function(torch.ops.lohan.chunked_ce_forward.default,
                                      (r.logits, r.target, ignore_index, reduction, r.compute_dtype, rows_per_chunk))
    _set_meta(fwd, r.loss, Role.FORWARD)
    outs = []
    for k in range(3):
        with graph.inserting_after(outs[-1] if outs else fwd):
            item = graph.call_function(operator.getitem, (fwd, k))
        item.meta["val"] = fwd.meta["val"][k]
        _set_meta(item, r.loss, Role.FORWARD, val=False)
        outs.append(item)
    loss, total_weight, lse = outs
    for user in list(r.loss.users):
        if user.target is operator.getitem and user.args[1] in (0, 1):
            user.replace_all_uses_with(loss if user.args[1] == 0 else total_weight)
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(r.grad_hidden_mm, r.grad_weight_mm, key=order.__getitem__)
    with graph.inserting_before(first):
        bwd = graph.call_function(
            torch.ops.lohan.chunked_linear_ce_backward.default,
            (r.grad_loss, r.tangent, r.hidden, r.weight_t, r.target, lse, total_weight, ignore_index, reduction,
             r.compute_dtype, rows_per_chunk))
    _set_meta(bwd, r.grad_hidden_mm, Role.BACKWARD)
    for k, replaced in enumerate((r.grad_hidden_mm, r.grad_weight_mm)):
        with graph.inserting_before(first):
            item = graph.call_function(operator.getitem, (bwd, k))
        item.meta["val"] = bwd.meta["val"][k]
        _set_meta(item, replaced, Role.BACKWARD, val=False)
        replaced.replace_all_uses_with(item)
    _erase_dead(graph, [*r.loss.users, r.grad_hidden_mm, r.grad_weight_mm])


def _set_meta(node: fx.Node, like: fx.Node, role: Role, *, val: bool = True) -> None:
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    node.meta["partitioner_tag"] = "is_backward" if role is Role.BACKWARD else "is_forward"
    if val:
        args = [a.meta["val"] if isinstance(a, fx.Node) else a for a in node.args]
        mode = next(a.fake_mode for a in args if isinstance(a, torch.Tensor))
        with mode:
            node.meta["val"] = node.target(*args)
    info = get_info(like)  # (a replaced gradient node keeps what it was the gradient of)
    set_info(node, info.with_(made_by=NAME, action="chunked_loss") if info is not None and val is False
             else NodeInfo(role=role, made_by=NAME, action="chunked_loss"))


def _erase_dead(graph: fx.Graph, start: list[fx.Node]) -> None:
    """Erase ``start`` and what only they read, once nothing reads them."""
    todo = list(start)
    while todo:
        node = todo.pop()
        if node.op != "call_function" or getattr(node, "_erased", False) or node.users:
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        todo.extend(inputs)
