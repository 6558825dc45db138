"""Python side of the C++ ops: fake kernels (for tracing) and friendly wrappers."""

from __future__ import annotations

import torch

from .ext import load

load()  # the fake kernels below need the ops registered first


@torch.library.register_fake("lohan::fingerprint")
def _fingerprint_fake(self: torch.Tensor) -> torch.Tensor:
    return self.new_empty((), dtype=torch.int64)


def fingerprint(t: torch.Tensor) -> int:
    """64-bit fingerprint of a contiguous tensor's bytes, as an unsigned int."""
    value = int(torch.ops.lohan.fingerprint(t))
    return value & 0xFFFFFFFFFFFFFFFF


# ---- host tier: the graph interface (csrc/host_tier_ops.cpp) -----------------
#
#   swap_out(Tensor src) -> Tensor            device -> host tier, returns at once
#   swap_in(Tensor host, Device? device=None) -> Tensor   host tier -> device
#   wait_tensor(Tensor(a) t) -> Tensor(a)     blocks until copies into t are done
#
# A swap's result is not valid until wait_tensor returns it; consumers use the
# wait's output, so the order is a data edge. All three have side effects the
# graph cannot see (a copy in flight, keepalives), so dead-code elimination
# must keep them even when an output looks unused.


def is_dense(t: torch.Tensor) -> bool:
    """c10's is_non_overlapping_and_dense, written out so fake tensors with
    symbolic sizes answer it the way the C++ kernel will (guarding as needed)."""
    from .runtime.hosttier import _dense_layout

    return bool(_dense_layout(t.shape, t.stride()))


def _dense_strides(t: torch.Tensor) -> tuple:
    """The layout a swap keeps: the source's when it is dense, else contiguous."""
    if is_dense(t):
        return tuple(t.stride())
    from torch._prims_common import make_contiguous_strides_for

    return tuple(make_contiguous_strides_for(t.shape))


@torch.library.register_fake("lohan::swap_out")
def _swap_out_fake(src: torch.Tensor) -> torch.Tensor:
    # Also the Meta kernel: a plan traced on the meta device keeps host tensors on meta too.
    device = "meta" if src.device.type == "meta" else "cpu"
    return torch.empty_strided(src.shape, _dense_strides(src), dtype=src.dtype, device=device)


@torch.library.register_fake("lohan::swap_in")
def _swap_in_fake(host: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    if device is None:
        device = torch.device("meta" if host.device.type == "meta" else "cpu")
    return torch.empty_strided(host.shape, _dense_strides(host), dtype=host.dtype, device=device)


@torch.library.register_fake("lohan::wait_tensor")
def _wait_tensor_fake(t: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.alias.default(t)


SWAP_OPS = (
    torch.ops.lohan.swap_out.default,
    torch.ops.lohan.swap_in.default,
    torch.ops.lohan.wait_tensor.default,
)
for _op in SWAP_OPS:
    torch.fx.node.has_side_effect(_op)
    torch.fx.node.has_side_effect(_op.overloadpacket)  # graphs traced with torch.ops.lohan.swap_out(...)

# the optimizer's ops register their fake kernels on import: every op the library
# registers is then traceable as soon as the library is loaded
from . import adam_ops  # noqa: E402,F401
