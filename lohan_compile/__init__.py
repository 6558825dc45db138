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
    "parse_bytes",
    "__version__",
]
