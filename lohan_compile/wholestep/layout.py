"""The whole step laid out from one traced block and the head: ``layout``.

The embedding, every block's forward, the head chunk by chunk, every block's backward,
the embedding's backward, as one ``Problem``; around it the weights, their optimizer
groups and their gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..plan.problem import Buffer, Candidate, OpInfo, Problem
from .trace import Part, Traced


@dataclass
class Weight:
    name: str
    group: str  # the optimizer group it belongs to (a layer, "embed", "head")
    bytes: int
    params: int
    fw_uses: list[int]
    bw_uses: list[int]
    grad_op: int | None
    grad_key: str | None
    streamed: bool = False


@dataclass
class Layout:
    """The whole step as one ``Problem`` (ops of every layer, candidates per layer), and the
    weights and gradients around it. ``base`` maps each candidate to the decision it shares:
    the block's saved value it is a copy of (the same decision in every layer)."""

    problem: Problem
    base: dict[str, str]
    weights: list[Weight]
    layer_of_op: list[int | None]  # the block a forward op belongs to (None: embedding, head)
    groups: dict[str, int]  # optimizer group -> parameters
    group_order: list[str]  # the order the forward needs the groups
    first_fw_op: dict[str, int]  # group -> its first forward op
    full_recompute_s: float  # one block's forward (what a checkpointed layer recomputes)
    itemsize: int = 2  # bytes per element of the weights (and of their gradients)


def layout(traced: Traced) -> Layout:
    """The step of ``traced``: each block's ops, buffers and candidates copied once per layer,
    the head's once per chunk, joined by the hidden states and their gradients."""
    spec, block, head = traced.spec, traced.block.problem, traced.head.problem
    n_layers, n_chunks = spec.layers, traced.head_chunks
    block_fw_ops, block_bw_ops = block.n_fw, len(block.ops) - block.n_fw
    itemsize = torch.finfo(traced.dtype).bits // 8
    ops: list[OpInfo] = []
    layer_of: list[int | None] = []
    embed_bytes = traced.tokens * spec.hidden * itemsize
    embed_seconds = 3 * embed_bytes / traced.hardware.memory_bandwidth + traced.hardware.op_overhead_s
    ops.append(OpInfo("embedding", embed_seconds, "fw"))
    layer_of.append(None)
    for layer in range(n_layers):
        ops.extend(OpInfo(f"L{layer}.{o.name}", o.seconds, "fw") for o in block.ops[:block_fw_ops])
        layer_of.extend([layer] * block_fw_ops)
    # the head runs chunk by chunk (forward and backward of each chunk of tokens together), so
    # its fp32 logits never exist for the whole batch at once; all of it counts as backward
    n_fw = len(ops)
    head_start = len(ops)
    for chunk in range(n_chunks):
        ops.extend(OpInfo(f"head{chunk}.{o.name}", o.seconds, o.phase) for o in head.ops)
    layer_of.extend([None] * (n_chunks * len(head.ops)))
    bw_start = len(ops)
    for layer in reversed(range(n_layers)):
        ops.extend(OpInfo(f"L{layer}.{o.name}", o.seconds, "bw") for o in block.ops[block_fw_ops:])
    ops.append(OpInfo("embedding_backward", 2 * embed_seconds, "bw"))
    layer_of.extend([None] * (len(ops) - len(layer_of)))

    def at_block(layer: int, i: int) -> int:
        """The step's op of the block's op ``i`` in ``layer``."""
        if i < block_fw_ops:
            return 1 + layer * block_fw_ops + i
        return bw_start + (n_layers - 1 - layer) * block_bw_ops + (i - block_fw_ops)

    def at_head(chunk: int, i: int) -> int:
        return head_start + chunk * len(head.ops) + i

    buffers: dict[str, Buffer] = {}
    candidates: list[Candidate] = []
    base: dict[str, str] = {}

    def copy_part(part: Part, prefix: str, at: Callable[[int], int], is_head: bool) -> None:
        for key, buf in part.problem.buffers.items():
            if key in part.tangent_keys:  # joined to the next part's gradient below
                continue
            free = None if buf.free is None else at(buf.free)
            buffers[prefix + key] = Buffer(prefix + key, buf.bytes, at(buf.alloc), free)
        for c in part.problem.candidates:
            copy = replace(
                c, key=prefix + c.key, name=prefix + c.name, produced_at=at(c.produced_at),
                last_fw_use=at(c.last_fw_use), first_bw_use=at(c.first_bw_use), last_bw_use=at(c.last_bw_use),
                recompute_needs=tuple(prefix + n for n in c.recompute_needs))
            if is_head:  # used right after it is made, chunk by chunk: kept
                copy = replace(copy, swappable=False, recompute_seconds=None)
            candidates.append(copy)
            base[copy.key] = ("head/" if is_head else "") + c.key

    for layer in range(n_layers):
        copy_part(traced.block, f"L{layer}/", lambda i, layer=layer: at_block(layer, i), is_head=False)
    for chunk in range(n_chunks):
        copy_part(traced.head, f"head{chunk}/", lambda i, chunk=chunk: at_head(chunk, i), is_head=True)
    for chunk in range(n_chunks - 1):  # a chunk's weight gradient is summed into the next chunk's
        for idx, key in head.grad_key.items():
            if idx in head.params:
                buffers[f"head{chunk}/{key}"].free = at_head(chunk + 1, head.grad_at[idx])

    # hidden states flowing forward: each layer's output is the next one's input (its checkpoint)
    block_x_uses = block.input_uses.get(traced.block.x_index, [])
    head_x_uses = head.input_uses.get(traced.head.x_index, [])
    buffers["embed/out"] = Buffer("embed/out", embed_bytes, 0, None)
    producers = ["embed/out"] + [f"L{layer}/{traced.block.y_key}" for layer in range(n_layers)]
    for reader, key in enumerate(producers):  # reader: the layer that reads it (n_layers: the head)
        if reader < n_layers:
            uses = [at_block(reader, i) for i in block_x_uses]
        else:
            uses = [at_head(chunk, i) for chunk in range(n_chunks) for i in head_x_uses]
        fw_uses = [u for u in uses if u < n_fw]
        bw_uses = [u for u in uses if u >= n_fw]
        buffers[key].free = max(uses)
        if bw_uses and fw_uses:
            candidates.append(Candidate(
                key=key, name=key, bytes=buffers[key].bytes, produced_at=buffers[key].alloc,
                last_fw_use=max(fw_uses), first_bw_use=min(bw_uses), last_bw_use=max(bw_uses),
                recompute_seconds=None))
            base[key] = "input" if reader < n_layers else "head/input"
    # gradients of hidden states flowing backward: each one dies after the layer below used it
    tangent_last_use = max((block.buffers[k].free or 0) for k in traced.block.tangent_keys)
    for chunk in range(n_chunks):
        buffers[f"head{chunk}/{traced.head.dx_key}"].free = at_block(n_layers - 1, tangent_last_use)
    for layer in range(n_layers):
        key = f"L{layer}/{traced.block.dx_key}"
        buffers[key].free = at_block(layer - 1, tangent_last_use) if layer > 0 else len(ops) - 1

    weights: list[Weight] = []
    groups: dict[str, int] = {}
    first_fw: dict[str, int] = {}

    def add_weights(problem: Problem, group: str, prefix: str, at: Callable[[int], int]) -> None:
        for idx in problem.params:
            nbytes = problem.input_bytes[idx]
            params = nbytes // itemsize
            uses = [at(i) for i in problem.input_uses.get(idx, [])]
            grad_at = problem.grad_at.get(idx)
            # a tied LM head is the embedding's weight: one set of optimizer state, its two
            # gradients summed on the host
            owner = "embed" if spec.tied and group == "head" and params == spec.vocab * spec.hidden else group
            weights.append(Weight(
                f"{prefix}{idx}", owner, nbytes, params,
                [u for u in uses if u < n_fw], [u for u in uses if u >= n_fw],
                None if grad_at is None else at(grad_at), None if grad_at is None else prefix + problem.grad_key[idx]))
            if owner == group:
                groups[group] = groups.get(group, 0) + params
            first_fw[owner] = min([first_fw.get(owner, len(ops))] + [u for u in uses if u < n_fw])

    # the embedding: looked up at the start, its gradient made at the very end
    embed_params = spec.embedding_params()
    last = len(ops) - 1
    weights.append(Weight("embed", "embed", embed_params * itemsize, embed_params, [0], [last], last, "embed/grad"))
    buffers["embed/grad"] = Buffer("embed/grad", embed_params * itemsize, last, None)
    groups["embed"] = embed_params
    first_fw["embed"] = 0
    for layer in range(n_layers):
        add_weights(block, f"L{layer}", f"L{layer}/", lambda i, layer=layer: at_block(layer, i))
    last_chunk = n_chunks - 1
    add_weights(head, "head", f"head{last_chunk}/", lambda i: at_head(last_chunk, i))
    for w in weights:  # every chunk reads the head's weights
        if w.name.startswith(f"head{last_chunk}/"):
            idx = int(w.name.rsplit("/", 1)[1])
            w.fw_uses = []
            w.bw_uses = sorted(at_head(chunk, i) for chunk in range(n_chunks) for i in head.input_uses.get(idx, []))
    for w in weights:  # gradient buffers leave the device through the offload, not at a planned free
        if w.grad_key in buffers:
            buffers[w.grad_key].free = None
    order = ["embed"] + [f"L{layer}" for layer in range(n_layers)] + ["head"]
    problem = Problem(ops=ops, n_fw=n_fw, buffers=buffers, candidates=candidates,
                      fw_seconds=sum(o.seconds for o in ops[:n_fw]), bw_seconds=sum(o.seconds for o in ops[n_fw:]))
    return Layout(problem, base, weights, layer_of, {g: n for g, n in groups.items() if n}, order, first_fw,
                  full_recompute_s=traced.block.seconds_fw, itemsize=itemsize)
