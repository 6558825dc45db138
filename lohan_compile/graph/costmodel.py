"""``CostModel``: how long a node or a transfer takes on a ``HardwareProfile``.

A node costs ``max(FLOPs / matmul rate, bytes / memory bandwidth)`` plus a
fixed per-op overhead. FLOPs come from torch's own FLOP formulas
(``torch.utils.flop_counter``: matmul, attention, convolution and their
backward), with formulas added here for the CPU flash-attention kernel and lohan's chunked loss;
bytes are what the op reads and writes. View ops move nothing and cost
nothing. Sizes may be symbolic: they are evaluated with their hints.

On the CPU stand-in the profile's rates are measured on this machine
(``hardware.measure``), so the model is calibrated there; a node's measured
time, when known, replaces the estimate (``measured``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from .fxutil import is_view, output_tensors
from ..ops import CHUNK_KERNELS, HEAD_MATMULS, arg_values, chunking, pure_op_name
from ..hardware import HardwareProfile
from .shapes import hint_int, nbytes_hint

aten = torch.ops.aten

_FREE_OPS = {
    aten.detach.default,
    aten.alias.default,
    aten.lift_fresh.default,
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten.sym_storage_offset.default,
}


def _attention_flops(q: torch.Size, k: torch.Size, v: torch.Size) -> int:
    # Q K^T and P V: two batched matmuls of B*H x Sq x D by D x Sk (and Sk x Dv)
    b, h, sq, d = q
    sk, dv = k[-2], v[-1]
    return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv


def _attention_backward_flops(grad_out: torch.Size, q: torch.Size, k: torch.Size, v: torch.Size, *rest: Any) -> int:
    # grad_out, q, k, v, out, logsumexp...: recompute P, then dV, dP, dQ, dK: 2.5x forward
    return int(2.5 * _attention_flops(q, k, v))


def _head_flops(name: str, args: tuple) -> int:
    """lohan's chunked loss: its LM head matmuls, from the hidden states and the weight."""
    hidden, weight_t = (args[0], args[1]) if name == "chunked_linear_ce_forward" else (args[2], args[3])
    return HEAD_MATMULS[name] * 2 * hidden[0] * hidden[1] * weight_t[1]


# FLOPs of ops torch's table lacks (the CPU kernels of attention), from their argument shapes
_EXTRA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: lambda q, k, v, *rest: _attention_flops(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _attention_backward_flops,
}


def _to_shape(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.Size(hint_int(s) for s in x.shape)
    if isinstance(x, torch.SymInt):
        return hint_int(x)
    return x


def _arg_vals(node: fx.Node) -> tuple[tuple, dict]:
    def val(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    args = tree_map(val, node.args)
    kwargs = tree_map(val, node.kwargs)
    return args, kwargs


def node_flops(node: fx.Node) -> int:
    if node.op != "call_function":
        return 0
    target = node.target
    extra = _EXTRA_FLOPS.get(target)
    formula = flop_registry.get(getattr(target, "overloadpacket", None))
    head = pure_op_name(node) in HEAD_MATMULS
    if formula is None and extra is None and not head:
        return 0  # (before reading any size: most ops have no FLOP formula)
    args, kwargs = _arg_vals(node)
    shapes = tree_map(_to_shape, args)
    if head:
        return _head_flops(target._opname, shapes)
    if extra is not None:
        return extra(*shapes)
    try:
        out = tree_map(_to_shape, node.meta.get("val"))
        return int(formula(*shapes, **tree_map(_to_shape, kwargs), out_val=out))
    except Exception:  # a formula that does not understand these arguments counts nothing
        return 0


def node_bytes(node: fx.Node) -> int:
    """Bytes an op reads and writes (inputs and outputs), views excluded."""
    if node.op != "call_function" or node.target in _FREE_OPS or is_view(node):
        return 0
    if node.target is torch.ops.lohan.accumulate_grad.default:
        # (at most: it reads the gradient and ``.grad``, which is no input of the graph, and
        # writes ``.grad``; where ``.grad`` is None it copies the gradient, or takes it as it is)
        return 3 * sum(nbytes_hint(t) for t in output_tensors(node.args[0]))
    total = sum(nbytes_hint(t) for t in output_tensors(node))
    for a in node.all_input_nodes:
        total += sum(nbytes_hint(t) for t in output_tensors(a))
    return total


class CostModel:
    def __init__(self, hardware: HardwareProfile, measured: Mapping[str, float] | None = None):
        self.hw = hardware
        self.measured = dict(measured or {})

    def node_seconds(self, node: fx.Node) -> float:
        if node.name in self.measured:
            return self.measured[node.name]
        if node.op != "call_function" or node.target in _FREE_OPS or is_view(node):
            return 0.0
        flops = node_flops(node)
        nbytes = node_bytes(node)
        overhead = self.hw.op_overhead_s
        name = pure_op_name(node)
        if name is not None:
            # (the chunked loss: each chunk runs its own kernels, so more chunks cost more)
            rows, rows_per_chunk = chunking(name, arg_values(node))
            overhead *= CHUNK_KERNELS * -(-rows // max(rows_per_chunk, 1))
        return max(flops / self.hw.matmul_flops, nbytes / self.hw.memory_bandwidth) + overhead

    def memory_bound(self, node: fx.Node) -> bool:
        """Whether the op's time is its memory traffic rather than its arithmetic (an elementwise
        op, a norm, a reduction; not a matmul or attention)."""
        return node_flops(node) / self.hw.matmul_flops <= node_bytes(node) / self.hw.memory_bandwidth

    def fused_seconds(self, flops: int, boundary_bytes: int, kernels: int, one_by_one: float) -> float:
        """Ops of ``flops`` in all run as ``kernels`` fused kernels that read and write
        ``boundary_bytes`` in all (what Inductor makes of an elementwise chain), never estimated
        slower than the ``one_by_one`` seconds they take run one by one."""
        fused = max(flops / self.hw.matmul_flops, boundary_bytes / self.hw.memory_bandwidth)
        return min(fused + kernels * self.hw.op_overhead_s, one_by_one)

    def transfer_seconds(self, nbytes: int, queue: str) -> float:
        rate = {
            "d2h": self.hw.d2h_bandwidth,
            "h2d": self.hw.h2d_bandwidth,
            "ssd_read": self.hw.ssd_read_bandwidth * max(self.hw.ssd_count, 1),
            "ssd_write": self.hw.ssd_write_bandwidth * max(self.hw.ssd_count, 1),
        }[queue]
        if rate <= 0:
            raise ValueError(f"the hardware profile {self.hw.name!r} has no {queue} bandwidth")
        return nbytes / rate
