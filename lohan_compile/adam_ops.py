"""Python side of the CPU optimizer's C++ ops (csrc/adam_ops.cpp).

Importing this module builds/loads the extension; the ops' fake kernels (in
``lohan_compile.ops``) let them be traced (FakeTensor, torch.compile). The ops:

``torch.ops.lohan.adam_update(master, exp_avg, exp_avg_sq, grad, weight_out,
step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay=True,
grad_scale=1.0, isa="auto", num_threads=0, torch_threads=False) -> Tensor``
    One fused pass of Adam/AdamW over a bucket of tensors (lists of equal
    length; ``weight_out`` empty or one per tensor). Mutates master and
    moments, writes ``weight_out``, and returns float64 ``[sumsq, nonfinite]``
    of the scaled gradients. ``step`` holds each tensor's step count after
    this update.

``torch.ops.lohan.grad_stats(grad, grad_scale=1.0, isa="auto", num_threads=0, torch_threads=False) -> Tensor``
    The same ``[sumsq, nonfinite]`` without an update (the first pass of
    gradient clipping).

``torch.ops.lohan.adam_isa(isa="auto") -> str`` and ``adam_supported_isas() -> str[]``
    Which instruction set a request resolves to; which ones this CPU runs.

``num_threads=0`` means ``torch.get_num_threads()``. ``isa`` forces a code path
(tests compare them all); an unsupported one raises. ``torch_threads`` runs the
work on the calling thread's torch OpenMP team instead of lohan's own pool
(csrc/adam_ops.cpp, ``run_tasks``): the Python wrappers below choose it on
every thread but lohan's background update threads (:func:`background_thread`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from .ops import background_thread, load, on_background_thread  # noqa: F401 (background_thread: re-exported)

load()  # the extension, and the fake kernels of its ops (lohan_compile.ops)

ISAS = ("auto", "scalar", "avx2", "avx512", "avx512_bf16")


class GradStats(NamedTuple):
    """Squared L2 norm of a set of (scaled) gradients, and whether any element was inf/NaN."""

    sumsq: float
    nonfinite: bool

    @property
    def norm(self) -> float:
        return math.sqrt(self.sumsq)

    def __add__(self, other: "GradStats") -> "GradStats":  # type: ignore[override]
        return GradStats(self.sumsq + other.sumsq, self.nonfinite or other.nonfinite)


NO_GRADS = GradStats(0.0, False)


def _stats(t: torch.Tensor) -> GradStats:
    sumsq, nonfinite = t.tolist()
    return GradStats(sumsq, bool(nonfinite))


def adam_update(
    master: Sequence[torch.Tensor],
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    grad: Sequence[torch.Tensor],
    weight_out: Sequence[torch.Tensor],
    step: Sequence[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool = True,
    grad_scale: float = 1.0,
    isa: str = "auto",
    num_threads: int = 0,
) -> GradStats:
    """One fused Adam/AdamW pass over a bucket; see the module docstring."""
    if len(master) == 0:
        return NO_GRADS
    out = torch.ops.lohan.adam_update(
        list(master), list(exp_avg), list(exp_avg_sq), list(grad), list(weight_out),
        [float(s) for s in step], float(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), bool(decoupled_weight_decay), float(grad_scale), isa,
        int(num_threads), not on_background_thread(),
    )
    return _stats(out)


def grad_stats(grads: Sequence[torch.Tensor], grad_scale: float = 1.0, *, isa: str = "auto",
               num_threads: int = 0) -> GradStats:
    """Squared norm and non-finite flag of ``grads * grad_scale``, threaded, no update."""
    if len(grads) == 0:
        return NO_GRADS
    return _stats(torch.ops.lohan.grad_stats(list(grads), float(grad_scale), isa,
                                             int(num_threads), not on_background_thread()))


def supported_isas() -> list[str]:
    """Instruction sets this CPU can run, narrowest first (always starts with "scalar")."""
    return list(torch.ops.lohan.adam_supported_isas())


def resolve_isa(isa: str = "auto") -> str:
    """The instruction set a request runs with; raises RuntimeError if this CPU lacks it."""
    return str(torch.ops.lohan.adam_isa(isa))
