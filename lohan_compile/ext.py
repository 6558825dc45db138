"""The C++ extension: built on first use, cached, loaded once.

The sources in ``csrc/`` ship with the package (``lohan_compile/csrc`` once
installed) and are compiled by ``torch.utils.cpp_extension.load`` the first
time an op is needed, into torch's extension cache (``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``). A change to any source, flag or
torch version triggers a rebuild; otherwise loading takes milliseconds. The
library registers ops and torch classes only (``TORCH_LIBRARY_FRAGMENT(lohan,
...)``); it is not a Python module, so they are reached as ``torch.ops.lohan.*``
and ``torch.classes.lohan.*``.

Set ``LOHAN_EXT_VERBOSE=1`` to see the compiler's output.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import torch

from . import settings
from .errors import ExtensionBuildError

NAME = "lohan_compile_ext"
# -ffp-contract=off: the CPU optimizer promises the same fp32 roundings on every
# instruction-set path (csrc/adam_body.h); no multiply-add may be fused behind its back.
CFLAGS = ["-O3", "-std=c++17", "-fno-strict-aliasing", "-ffp-contract=off", "-pthread"]
# The CPU optimizer runs on torch's OpenMP team where torch has one
# (csrc/adam_ops.cpp, run_tasks). Only the compile step gets -fopenmp: with no
# OpenMP library linked, its symbols resolve to the runtime libtorch_cpu loads.
OPENMP_CFLAGS = ["-fopenmp"]
# dlopen (the CUDA runtime, found at run time for pinned memory) lives in libdl
# on glibc < 2.34; the copy engine and SSD tier start threads.
LDFLAGS = ["-ldl", "-pthread"]

_lock = threading.RLock()
_loaded = False


def source_dir() -> Path:
    """Where the C++ sources are: csrc/ beside this package in a checkout, else the package data."""
    checkout = Path(__file__).resolve().parent.parent / "csrc"
    if checkout.is_dir() and any(checkout.glob("*.cpp")):
        return checkout
    installed = Path(__file__).resolve().parent / "csrc"
    if installed.is_dir() and any(installed.glob("*.cpp")):
        return installed
    raise ExtensionBuildError(
        f"lohan_compile's C++ sources are missing (looked in {checkout} and {installed}); "
        "reinstall the package"
    )


def sources() -> list[str]:
    return sorted(str(p) for p in source_dir().glob("*.cpp"))


def missing_tool() -> str | None:
    """Why a build cannot run here (no C++ compiler, no ninja), or None."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return (
            f"no C++ compiler found (looked for {cxx!r}, from $CXX or the default 'c++'). "
            "lohan_compile builds its C++ extension on first use: install one "
            "(Debian/Ubuntu: apt install g++; Fedora: dnf install gcc-c++) or point $CXX at it."
        )
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "building lohan_compile's C++ extension needs ninja: pip install ninja"
    return None


def load() -> None:
    """Build (if needed) and load the extension; registers ``torch.ops.lohan.*``."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        from torch.utils import cpp_extension

        cflags, ldflags, name = CFLAGS, LDFLAGS, NAME
        if torch.backends.openmp.is_available():
            cflags = [*cflags, *OPENMP_CFLAGS]
        sanitize = settings.EXT_SANITIZE.get()
        if sanitize:
            # a separate build: never mixed up with the normal one
            cflags = [*cflags, f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
            ldflags = [*LDFLAGS, f"-fsanitize={sanitize}"]
            name = f"{NAME}_{sanitize.replace(',', '_')}"
        try:
            cpp_extension.load(
                name=name,
                sources=sources(),
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                is_python_module=False,
                verbose=settings.EXT_VERBOSE.get(),
            )
        except Exception as e:
            # A cached build loads without any tools; only a (re)build needs them.
            reason = missing_tool()
            if reason is not None:
                raise ExtensionBuildError(reason) from e
            raise ExtensionBuildError(
                f"building lohan_compile's C++ extension failed: {type(e).__name__}: {e}\n"
                "Run again with LOHAN_EXT_VERBOSE=1 to see the compiler output; "
                "a stale build can be removed from "
                f"{cpp_extension._get_build_directory(name, verbose=False)}."
            ) from e
        _loaded = True


def cpp_ops():
    """``torch.ops.lohan``, loading the extension first (``lohan_compile.ops.load`` also
    registers the ops' fake kernels, for tracing)."""
    load()
    return torch.ops.lohan
