"""The parts of a model traced once each: a decoder block and the head (final norm, LM head,
loss), on the ``meta`` device, through the same passes as training (seconds, no memory)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..explainer import explain
from ..hardware import HardwareProfile, resolve
from ..plan.problem import Problem
from ..plan.profile import GiB
from ..zoo import Block, Head, ModelSpec

HEAD_CHUNK_BYTES = 1 * GiB  # the LM head's fp32 logits per chunk of tokens


@dataclass
class Part:
    """A traced module (the block, the head): its planning problem and the flows across its edges."""

    problem: Problem
    x_index: int  # example-input index of the hidden state it reads
    y_key: str | None  # forward buffer of the hidden state it returns (None: the head)
    dx_key: str  # buffer of the gradient of its input
    tangent_keys: tuple[str, ...]
    seconds_fw: float
    trace_s: float


def _part(module: torch.nn.Module, args: tuple, hw: HardwareProfile, loss_fn: Callable) -> Part:
    start = time.perf_counter()
    report = explain(module, *args, loss_fn=loss_fn, hardware=hw, policy="keep-all")
    graphs = [g for g in report.graphs if g.pass_report("plan_memory")]
    if len(graphs) != 1:
        raise RuntimeError(f"expected one training graph for {type(module).__name__}, got {len(graphs)}")
    problem: Problem = graphs[0].pass_report("plan_memory")["problem"]
    # the hidden state: the one input that is not a parameter and gets a gradient
    x_index = next(i for i in problem.input_uses if i not in problem.params and i in problem.grad_key)
    bw_names = {o.name for o in problem.ops[problem.n_fw:]}
    # backward's inputs that no backward op makes: the gradients flowing in from outside
    tangents = tuple(k for k, b in problem.buffers.items()
                     if k.startswith("bw:") and b.alloc == problem.n_fw and k[3:] not in bw_names)
    fw_out = [k for k, b in problem.buffers.items() if k.startswith("fw:") and b.free is None]
    y_key = max(fw_out, key=lambda k: problem.buffers[k].bytes) if fw_out else None
    return Part(problem, x_index, y_key, problem.grad_key[x_index], tangents, problem.fw_seconds,
                time.perf_counter() - start)


@dataclass
class Traced:
    spec: ModelSpec
    batch: int
    seq: int
    dtype: torch.dtype
    hardware: HardwareProfile
    block: Part
    head: Part
    head_chunks: int = 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def trace(spec: ModelSpec, batch: int, seq: int, hardware: Any = "rtx4090",
          dtype: torch.dtype = torch.bfloat16) -> Traced:
    """Trace one block and the head of ``spec`` on the meta device (seconds, no memory)."""
    hw = resolve(hardware)
    torch._dynamo.reset()
    with torch.device("meta"):
        block = Block(spec).to(dtype)
        head = Head(spec).to(dtype)
    x = torch.empty(batch, seq, spec.hidden, device="meta", dtype=dtype, requires_grad=True)
    block_part = _part(block, (x,), hw, lambda y: y.float().sum())
    tokens = batch * seq
    # the head runs in the fewest chunks whose fp32 logits each fit HEAD_CHUNK_BYTES
    chunks = next(k for k in range(1, tokens + 1)
                  if tokens % k == 0 and (tokens // k) * spec.vocab * 4 <= HEAD_CHUNK_BYTES or k == tokens)
    x_head = torch.empty(1, tokens // chunks, spec.hidden, device="meta", dtype=dtype, requires_grad=True)
    labels = torch.zeros(1, tokens // chunks, dtype=torch.long, device="meta")
    head_part = _part(head, (x_head, labels), hw, lambda loss: loss)
    torch._dynamo.reset()
    return Traced(spec, batch, seq, dtype, hw, block_part, head_part, chunks)
