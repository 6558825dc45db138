"""lohan_compile: a torch.compile backend for fine-tuning models larger than their GPU.

    cm = torch.compile(model, backend="lohan", options={...})

See README.md and DESIGN.md. Public names: ``Options``, ``BudgetError``,
``last_report``, ``Report``, ``CPUAdamW``.

Importing the package imports torch only when a name that needs it is first used, so the
graph-free planning wing (``lohan_compile.plan``) can be used without torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .errors import (
    BudgetError,
    ExtensionBuildError,
    HostMemoryError,
    LohanError,
    PassError,
    StorageError,
)
from .options import Options
from .plan.profile import HardwareProfile
from .units import parse_bytes

if TYPE_CHECKING:
    from .explainer import explain
    from .optim import CPUAdamW
    from .report import Report
    from .runtime.step import last_report
    from .runtime.stream import materialized, state_dict

__version__ = "0.2.0"

# names whose modules import torch: imported on first use
_LAZY = {
    "CPUAdamW": "optim",
    "Report": "report",
    "explain": "explainer",  # (a module named explain would shadow the function)
    "last_report": "runtime.step",
    "materialized": "runtime.stream",
    "state_dict": "runtime.stream",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule: lohan.hardware, ...
    else:
        raise AttributeError(f"module 'lohan_compile' has no attribute {name!r}")
    globals()[name] = value
    return value


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
