"""Every ``torch.library`` op of lohan_compile, with its fake kernel, in one place.

Kinds of op:

- ops the C++ extension defines (``csrc/host_tier_ops.cpp``, ``csrc/adam_ops.cpp``): the host
  tier's graph interface and the CPU optimizer's kernels. ``load()`` builds or loads the
  extension, then registers their fake kernels here, so they can be traced::

    swap_out(Tensor src) -> Tensor            device -> host tier, returns at once
    swap_in(Tensor host, Device? device=None) -> Tensor   host tier -> device
    wait_tensor(Tensor(a) t) -> Tensor(a)     blocks until copies into t are done
    fingerprint(Tensor t) -> Tensor           64-bit checksum of a tensor's bytes
    adam_update(...), grad_stats(...)         see lohan_compile.adam_ops

  A swap's result is not valid until ``wait_tensor`` returns it; consumers use the wait's
  output, so the order is a data edge.

- ops defined here, whose kernels the runtime supplies (``implement``): gradient offload
  (``grad_ready``, ``grads_ready``, ``weight_ready``, ``weight_wait``: runtime/offload.py),
  gradients added into ``.grad`` in backward (``accumulate_check``, ``accumulate_grad``:
  runtime/grads.py) and
  parameter streaming (``fetch_param``, ``param_wait``, ``release_param``: runtime/stream.py).
  Defined here, below the passes, so that a pass can insert them without importing the
  runtime. On the meta device (``lohan.explain`` plans on meta) they do nothing.

Every op of those two kinds has side effects the graph cannot see (a copy in flight, a
keepalive, an optimizer update), so dead-code elimination keeps it even when its output looks
unused. A third kind only computes (``PURE_OPS``: the chunked LM head and loss of
``passes/chunk_loss.py``), in Python, and is treated like an aten op.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from .ext import load as load_extension
from .graph.shapes import hint_int
from .layout import dense_layout

_LIB = torch.library.Library("lohan", "FRAGMENT")


def _keep_in_graphs(name: str) -> None:
    packet = getattr(torch.ops.lohan, name)
    torch.fx.node.has_side_effect(packet.default)
    torch.fx.node.has_side_effect(packet)  # graphs traced with torch.ops.lohan.<name>(...)


def _alias(t: torch.Tensor, key: int) -> torch.Tensor:
    return torch.ops.aten.alias.default(t)


# name -> (schema, fake kernel: also the Meta kernel)
_RUNTIME_OPS: dict[str, tuple[str, Callable]] = {
    # ``stats``: the gradient's (the bucket's) ``grad_stats``, computed on the device before it left
    "grad_ready": ("grad_ready(Tensor host_grad, int key, Tensor? stats=None) -> ()",
                   lambda host_grad, key, stats=None: None),
    "grads_ready": ("grads_ready(Tensor host_bucket, int[] keys, Tensor? stats=None) -> ()",
                    lambda host_bucket, keys, stats=None: None),
    "weight_ready": ("weight_ready(int key) -> ()", lambda key: None),
    # a gradient added into its parameter's ``.grad`` where backward makes it (runtime/grads.py)
    # (``own``: nothing else holds the gradient's storage, so it may itself become ``.grad``)
    "accumulate_grad": ("accumulate_grad(Tensor grad, int key, bool own) -> ()", lambda grad, key, own: None),
    # first in a backward that adds into ``.grad``: what autograd would do otherwise for those
    # parameters is refused before any is added into (runtime/grads.py)
    "accumulate_check": ("accumulate_check(int[] keys) -> ()", lambda keys: None),
    "weight_wait": ("weight_wait(Tensor(a) weight, int key) -> Tensor(a)", _alias),
    "fetch_param": ("fetch_param(int key) -> ()", lambda key: None),
    "param_wait": ("param_wait(Tensor(a) t, int key) -> Tensor(a)", _alias),
    "release_param": ("release_param(int key) -> ()", lambda key: None),
}

for _name, (_schema, _fake) in _RUNTIME_OPS.items():
    _LIB.define(_schema)
    torch.library.register_fake(f"lohan::{_name}", _fake, lib=_LIB)
    if "Tensor" in _schema.partition("->")[0]:
        _LIB.impl(_name, _fake, "Meta")  # explain(): planned on meta, never run
    _keep_in_graphs(_name)


# a collective's wait (a data-parallel step's gradient reduction, ``passes/reduce_grads.py``)
# stays in the graph even where nothing reads what it waited for: the collective's buffer must
# not be freed or reused while the collective still writes into it
torch.fx.node.has_side_effect(torch.ops._c10d_functional.wait_tensor.default)


def implement(name: str, kernel: Callable) -> None:
    """The runtime's kernel of op ``name`` (one of the ops defined here), for every device."""
    if name not in _RUNTIME_OPS:
        raise ValueError(f"lohan::{name} is not an op defined in lohan_compile.ops; ops: {', '.join(_RUNTIME_OPS)}")
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")


# -- the C++ ops --------------------------------------------------------------------------


def is_dense(t: torch.Tensor) -> bool:
    """``dense_layout`` of a tensor, judged as the C++ kernel will (guarding symbolic sizes)."""
    return bool(dense_layout(t.shape, t.stride()))


def _swap_strides(t: torch.Tensor) -> tuple:
    """The layout a swap keeps: the source's when it is dense, else contiguous."""
    if is_dense(t):
        return tuple(t.stride())
    from torch._prims_common import make_contiguous_strides_for

    return tuple(make_contiguous_strides_for(t.shape))


def _swap_out_fake(src: torch.Tensor) -> torch.Tensor:
    # Also the Meta kernel: a plan traced on the meta device keeps host tensors on meta too.
    device = "meta" if src.device.type == "meta" else "cpu"
    return torch.empty_strided(src.shape, _swap_strides(src), dtype=src.dtype, device=device)


def _swap_in_fake(host: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    if device is None:
        device = torch.device("meta" if host.device.type == "meta" else "cpu")
    return torch.empty_strided(host.shape, _swap_strides(host), dtype=host.dtype, device=device)


def _adam_update_fake(master, exp_avg, exp_avg_sq, grad, weight_out, step, lr, beta1, beta2,
                      eps, weight_decay, decoupled_weight_decay=True, grad_scale=1.0,
                      isa="auto", num_threads=0, torch_threads=False):
    return torch.empty(2, dtype=torch.float64)


def _grad_stats_fake(grad, grad_scale=1.0, isa="auto", num_threads=0, torch_threads=False):
    return torch.empty(2, dtype=torch.float64)


_CPP_FAKES: dict[str, Callable] = {
    "swap_out": _swap_out_fake,
    "swap_in": _swap_in_fake,
    "wait_tensor": lambda t: torch.ops.aten.alias.default(t),
    "fingerprint": lambda t: t.new_empty((), dtype=torch.int64),
    "adam_update": _adam_update_fake,
    "grad_stats": _grad_stats_fake,
}
_SWAP_OPS = ("swap_out", "swap_in", "wait_tensor")

_thread = threading.local()


def background_thread() -> None:
    """Marks the calling thread as a lohan background thread for the rest of its life.

    The CPU optimizer's kernels called from it run on lohan's own pool: an OpenMP region
    there would start a second team of threads beside the team of the thread running
    backward. On every other thread they run on torch's team, whose threads are awake right
    after torch's own ops (csrc/adam_ops.cpp, ``run_tasks``)."""
    _thread.background = True


def on_background_thread() -> bool:
    return getattr(_thread, "background", False)
_fakes_lock = threading.Lock()
_fakes_registered = False


def load() -> None:
    """Build or load the C++ extension, and register its ops' fake kernels (once)."""
    global _fakes_registered
    load_extension()
    with _fakes_lock:
        if _fakes_registered:
            return
        for name, fake in _CPP_FAKES.items():
            torch.library.register_fake(f"lohan::{name}", fake, lib=_LIB)
        for name in _SWAP_OPS:
            _keep_in_graphs(name)
        _fakes_registered = True


def swap_ops() -> tuple:
    """The host tier's graph ops (loading the extension first)."""
    load()
    return tuple(getattr(torch.ops.lohan, name).default for name in _SWAP_OPS)


def swap_ops_available() -> bool:
    """Whether the host tier's swap ops can run here (the extension loads and defines them)."""
    load()
    return hasattr(torch.ops.lohan, "swap_out")


def fingerprint(t: torch.Tensor) -> int:
    """64-bit fingerprint of a contiguous tensor's bytes, as an unsigned int."""
    load()
    value = int(torch.ops.lohan.fingerprint(t))
    return value & 0xFFFFFFFFFFFFFFFF


# -- the chunked LM head and loss (``passes/chunk_loss.py``) -------------------------------
#
# Cross-entropy over a vocabulary, computed a chunk of rows at a time so that no tensor of all
# the rows' logits in the loss's dtype, their log-softmax or their gradient ever exists: forward
# keeps only each row's log-sum-exp, and backward recomputes each chunk's logits from the
# hidden states and the head's weight. Pure computations (no side effects): dead-code
# elimination may drop them like any aten op.

_NLL_MEAN = 1  # nll_loss's reduction code for "mean" (2 is "sum"; 0, "none", is not chunked)


def _row_chunks(rows: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, rows)) for start in range(0, rows, max(chunk, 1))]


def _ce_forward_by_rows(rows: int, chunk_logits, target: torch.Tensor, ignore_index: int, reduction: int,
                        compute_dtype: torch.dtype, chunk: int, device: torch.device):
    """The cross-entropy of ``rows`` rows whose logits ``chunk_logits(start, end)`` gives a chunk
    at a time: (loss, total weight, each row's log-sum-exp in fp32)."""
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for start, end in _row_chunks(rows, chunk):
        x = chunk_logits(start, end).to(torch.float32)
        row_lse = torch.logsumexp(x, dim=1)
        lse[start:end] = row_lse
        t = target[start:end]
        valid = t != ignore_index
        picked = x.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
        del x
        total += torch.where(valid, row_lse - picked, 0.0).sum()
        count += valid.sum()
    weight = count.to(compute_dtype)
    loss = (total / count if reduction == _NLL_MEAN else total).to(compute_dtype)
    return loss, weight, lse


@torch.library.custom_op("lohan::chunked_ce_forward", mutates_args=())
def chunked_ce_forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: int,
                       compute_dtype: torch.dtype, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``nll_loss_forward(log_softmax(logits.to(compute_dtype)), target)`` chunk by chunk of
    rows: (loss, total weight, each row's log-sum-exp in fp32, what backward needs)."""
    return _ce_forward_by_rows(logits.shape[0], lambda start, end: logits[start:end], target, ignore_index,
                               reduction, compute_dtype, chunk, logits.device)


@chunked_ce_forward.register_fake
def _chunked_ce_forward_fake(logits, target, ignore_index, reduction, compute_dtype, chunk):
    return (logits.new_empty((), dtype=compute_dtype), logits.new_empty((), dtype=compute_dtype),
            logits.new_empty((logits.shape[0],), dtype=torch.float32))


@torch.library.custom_op("lohan::chunked_linear_ce_forward", mutates_args=())
def chunked_linear_ce_forward(hidden: torch.Tensor, weight_t: torch.Tensor, target: torch.Tensor,
                              ignore_index: int, reduction: int, compute_dtype: torch.dtype,
                              chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``chunked_ce_forward(hidden @ weight_t, ...)`` where nothing else reads the logits: each
    chunk's logits are made from the hidden states and the weight, so all of them never exist."""
    return _ce_forward_by_rows(hidden.shape[0], lambda start, end: torch.mm(hidden[start:end], weight_t), target,
                               ignore_index, reduction, compute_dtype, chunk, hidden.device)


@chunked_linear_ce_forward.register_fake
def _chunked_linear_ce_forward_fake(hidden, weight_t, target, ignore_index, reduction, compute_dtype, chunk):
    return (hidden.new_empty((), dtype=compute_dtype), hidden.new_empty((), dtype=compute_dtype),
            hidden.new_empty((hidden.shape[0],), dtype=torch.float32))


@torch.library.custom_op("lohan::chunked_linear_ce_backward", mutates_args=())
def chunked_linear_ce_backward(grad_loss: torch.Tensor, grad_logits: torch.Tensor | None, hidden: torch.Tensor,
                               weight_t: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                               total_weight: torch.Tensor, ignore_index: int, reduction: int,
                               compute_dtype: torch.dtype, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``hidden`` (rows x hidden) and of ``weight_t.t()`` (vocabulary x
    hidden) through ``logits = hidden @ weight_t`` and the chunked loss, chunk by chunk of rows:
    each chunk's logits recomputed, its softmax from the saved log-sum-exp, the loss's gradient
    cast back to the logits' dtype and ``grad_logits`` (the gradient of the logits themselves,
    where they are also an output) added; the weight's gradient summed over chunks in fp32."""
    rows = hidden.shape[0]
    if grad_logits is not None:
        grad_logits = grad_logits.reshape(rows, -1)  # (the logits' tangent comes in the output's shape)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    grad_weight = torch.zeros(weight_t.shape[1], weight_t.shape[0], dtype=torch.float32, device=hidden.device)
    scale = (grad_loss.to(torch.float32) / total_weight.to(torch.float32) if reduction == _NLL_MEAN
             else grad_loss.to(torch.float32))
    for start, end in _row_chunks(rows, chunk):
        h = hidden[start:end]
        x = torch.mm(h, weight_t)
        p = torch.exp(x.to(torch.float32) - lse[start:end].unsqueeze(1))
        del x
        t = target[start:end]
        valid = t != ignore_index
        p.scatter_add_(1, torch.where(valid, t, 0).unsqueeze(1),
                       torch.full((end - start, 1), -1.0, dtype=torch.float32, device=p.device))
        p.mul_(torch.where(valid, scale, 0.0).unsqueeze(1))
        g = p.to(compute_dtype)
        del p
        if grad_logits is not None:  # (added in the dtype of the logits it is the gradient of)
            g = grad_logits[start:end] + g.to(grad_logits.dtype)
        g = g.to(hidden.dtype)
        grad_hidden[start:end] = torch.mm(g, weight_t.t())
        grad_weight.addmm_(g.t().to(torch.float32), h.to(torch.float32))
        del g  # (before the next chunk's logits: ``pure_op_scratch`` counts one chunk's tensors)
    return grad_hidden, grad_weight.to(weight_t.dtype)


@chunked_linear_ce_backward.register_fake
def _chunked_linear_ce_backward_fake(grad_loss, grad_logits, hidden, weight_t, target, lse, total_weight,
                                     ignore_index, reduction, compute_dtype, chunk):
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            weight_t.new_empty((weight_t.shape[1], weight_t.shape[0])))


# lohan's ops that compute and do nothing else: measured and estimated like aten's
PURE_OPS = frozenset({"chunked_ce_forward", "chunked_linear_ce_forward", "chunked_linear_ce_backward"})

# where each takes its rows (the tokens) and its rows per chunk, by argument position
_ROWS_ARG = {"chunked_ce_forward": (0, 5), "chunked_linear_ce_forward": (0, 6), "chunked_linear_ce_backward": (2, 10)}
CHUNK_KERNELS = 14  # kernels each of them runs per chunk: the cost of a chunk beyond its arithmetic


def pure_op_name(node: Any) -> str | None:
    """The ``PURE_OPS`` name an fx node calls (``torch.ops.lohan.<name>``), or None."""
    target = getattr(node, "target", None)
    if getattr(node, "op", None) != "call_function" or getattr(target, "namespace", None) != "lohan":
        return None
    return target._opname if target._opname in PURE_OPS else None


def arg_values(node: Any) -> list:
    """A node's arguments, nodes as their fake values."""
    return [a.meta.get("val") if hasattr(a, "meta") else a for a in node.args]


def chunking(name: str, args: list) -> tuple[int, int]:
    """(rows, rows per chunk) of a ``PURE_OPS`` call's arguments (fake values or tensors)."""
    rows_at, chunk_at = _ROWS_ARG[name]
    return hint_int(args[rows_at].shape[0]), int(args[chunk_at])


def vocabulary(name: str, args: list) -> int:
    """The columns of the logits of a ``PURE_OPS`` call's arguments."""
    return hint_int((args[0] if name == "chunked_ce_forward" else args[1] if name == "chunked_linear_ce_forward"
                     else args[3]).shape[1])


def with_rows_per_chunk(name: str, args: tuple, rows_per_chunk: int) -> tuple:
    """``args`` of a ``PURE_OPS`` call with another number of rows per chunk."""
    chunk_at = _ROWS_ARG[name][1]
    return (*args[:chunk_at], rows_per_chunk, *args[chunk_at + 1:])


# how many times each of them does the LM head's matmul (rows x hidden by hidden x vocabulary):
# the forward that makes its own logits once; the backward makes them again, then the gradients
# of the hidden states and of the weight
HEAD_MATMULS = {"chunked_linear_ce_forward": 1, "chunked_linear_ce_backward": 3}


def pure_op_scratch(name: str, args: list) -> int:
    """The device bytes a ``PURE_OPS`` op holds beyond its inputs and outputs at its highest
    point, from its arguments' (fake) values, as its kernel above allocates (measured on the
    CPU, per element of a chunk's logits): forward, a chunk's fp32 copy where the logits are not
    fp32 and the log-sum-exp's shifted copy (the forward that makes its own logits: the chunk's
    logits and their fp32 copy, or the copy and the shifted copy, whichever is more); backward,
    the chunk's logits, their shifted copy and its exponential, and the weight gradient's fp32
    accumulator where the weight is not fp32."""
    if name == "chunked_ce_forward":
        logits, chunk = args[0], args[5]
        vocab, itemsize = hint_int(logits.shape[1]), logits.element_size()
        return int(chunk * vocab * (4 + (4 if itemsize != 4 else 0)))
    if name == "chunked_linear_ce_forward":
        weight_t, chunk = args[1], args[6]
        vocab, itemsize = hint_int(weight_t.shape[1]), weight_t.element_size()
        # (8 for every dtype of 4 bytes or fewer: the chunk's logits and their fp32 copy never
        # outlast the copy and the shifted copy)
        return int(chunk * vocab * max(itemsize + (4 if itemsize != 4 else 0), 8))
    weight_t, chunk = args[3], args[10]
    vocab, itemsize = hint_int(weight_t.shape[1]), weight_t.element_size()
    accumulator = hint_int(weight_t.shape[0]) * vocab * 4 if itemsize != 4 else 0
    return int(chunk * vocab * (itemsize + 8) + accumulator)
