"""lohan_compile: a torch.compile backend for fine-tuning models larger than their GPU.

    cm = torch.compile(model, backend="lohan", options={...})

See README.md and DESIGN.md. Public names: ``Options``, ``BudgetError``,
``last_report``, ``Report``, ``CPUAdamW``.
"""

from __future__ import annotations

from .errors import (
    BudgetError,
    ExtensionBuildError,
    HostMemoryError,
    LohanError,
    PassError,
    StorageError,
)
from .explain import explain
from .hardware import HardwareProfile
from .optim import CPUAdamW
from .options import Options, parse_bytes
from .report import Report

__version__ = "0.2.0"


def materialized(module):
    """Context manager: inside it, the streamed parameters of ``module`` (``offload_params``)
    hold their current values on the device (evaluation without compiling, ``save_pretrained``).
    See ``lohan_compile.runtime.stream.materialized``."""
    from .runtime import stream

    return stream.materialized(module)


def state_dict(module, *args, **kwargs) -> dict:
    """``module.state_dict()`` with the current value of every streamed parameter (host copies)."""
    from .runtime import stream

    return stream.state_dict(module, *args, **kwargs)


def last_report() -> Report | None:
    """Report of the most recent completed training step (None before the first)."""
    from .runtime.step import TRACKER

    return TRACKER.last_report()


__all__ = [
    "BudgetError",
    "CPUAdamW",
    "ExtensionBuildError",
    "HardwareProfile",
    "HostMemoryError",
    "LohanError",
    "Options",
    "PassError",
    "Report",
    "StorageError",
    "explain",
    "last_report",
    "materialized",
    "state_dict",
    "parse_bytes",
    "__version__",
]
