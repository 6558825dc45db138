"""Exceptions users can catch by type."""

from __future__ import annotations


class LohanError(RuntimeError):
    """Base class of lohan_compile's own errors."""


class BudgetError(LohanError):
    """No plan fits the memory budget.

    ``smallest_feasible_bytes`` is the smallest budget some plan reaches (or
    ``None`` when even that could not be determined).
    """

    def __init__(self, message: str, *, smallest_feasible_bytes: int | None = None):
        super().__init__(message)
        self.smallest_feasible_bytes = smallest_feasible_bytes

    @staticmethod
    def within(exc: BaseException) -> "BudgetError | None":
        """The BudgetError an exception carries: itself, or the one torch wrapped while compiling
        (``BackendCompilerFailed``: its cause / ``inner_exception``); None if there is none."""
        seen = set()
        while exc is not None and id(exc) not in seen:
            if isinstance(exc, BudgetError):
                return exc
            seen.add(id(exc))
            exc = exc.__cause__ or getattr(exc, "inner_exception", None) or exc.__context__
        return None


class PassError(LohanError):
    """A pass failed or left a broken graph; the message names pass and node."""


class ExtensionBuildError(LohanError):
    """The C++ extension could not be built or loaded."""


class HostMemoryError(LohanError, MemoryError):
    """The host tier cannot hold a block: ``host_memory_budget`` would be exceeded
    and there is no SSD tier to spill to (or the OS refused the memory)."""


class StorageError(LohanError, OSError):
    """The SSD tier failed: no space, a file-size limit, an I/O error, a short
    read, a checksum mismatch, or an ``ssd_dir`` that is missing, not a folder
    or not writable. ``errno`` is set when the OS gave one."""
