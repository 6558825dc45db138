"""Every ``torch.library`` op of lohan_compile, with its fake kernel, in one place.

Two kinds of op:

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
  (``grad_ready``, ``grads_ready``, ``weight_ready``, ``weight_wait``: runtime/offload.py) and
  parameter streaming (``fetch_param``, ``param_wait``, ``release_param``: runtime/stream.py).
  Defined here, below the passes, so that a pass can insert them without importing the
  runtime. On the meta device (``lohan.explain`` plans on meta) they do nothing.

Every op here has side effects the graph cannot see (a copy in flight, a keepalive, an
optimizer update), so dead-code elimination keeps it even when its output looks unused.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from .ext import load as load_extension
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
    "grad_ready": ("grad_ready(Tensor host_grad, int key) -> ()", lambda host_grad, key: None),
    "grads_ready": ("grads_ready(Tensor host_bucket, int[] keys) -> ()", lambda host_bucket, keys: None),
    "weight_ready": ("weight_ready(int key) -> ()", lambda key: None),
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
                      isa="auto", num_threads=0):
    return torch.empty(2, dtype=torch.float64)


def _grad_stats_fake(grad, grad_scale=1.0, isa="auto", num_threads=0):
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
