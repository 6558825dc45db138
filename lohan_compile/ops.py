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
