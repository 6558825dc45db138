"""``lohan_compile.Options``: every ``options=`` key, parsed and validated once.

``Options(**options)`` raises ``ValueError`` at once for an unknown key or a
malformed value, so a script can check its configuration before torch wraps
compile errors into ``BackendCompilerFailed`` at the first call.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .plan.profile import HardwareProfile, preset
from .settings import EXECUTOR, EXECUTORS
from .units import parse_bytes

TORCH_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
POLICIES = (
    "auto",
    "keep-all",
    "swap-all",
    "recompute-all",
    "torch-min-cut",
    "zero-infinity",
    "zero-offload",
)
OFFLOAD_PARAMS = ("auto", True, False)
DATA_PARALLEL = ("auto", False)

def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _one_of(name: str, value: Any, choices) -> Any:
    # type-exact so that 1 is not taken for True
    if not any(type(value) is type(c) and value == c for c in choices):
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(
            f"{name}={value!r} is not valid; choose one of {listed}."
            + (_did_you_mean(value, choices) if isinstance(value, str) else "")
        )
    return value


def _loss_chunks(value: Any) -> Any:
    if value == "auto" and isinstance(value, str):
        return value
    if type(value) is int and value >= 1:
        return value
    raise ValueError(f"loss_chunks={value!r} is not valid; choose 'auto' or a number of chunks (an int >= 1; "
                     "1: never chunk the loss).")


def _folder(name: str, value: Any, *, must_exist: bool) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name}={value!r}: expected a folder path (str or os.PathLike) or None")
    path = os.fspath(value)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name}={path!r} exists and is not a folder; give a folder path")
    if must_exist and not os.path.isdir(path):
        raise ValueError(f"{name}={path!r} does not exist; create the folder first (mkdir -p {path})")
    return path


def _folders(name: str, value: Any) -> str | tuple[str, ...] | None:
    """One existing folder (a path), or several (a list or tuple of paths: one per drive)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name}=[]: give a folder, a list of folders, or None")
        paths = tuple(_folder(name, v, must_exist=True) for v in value)
        real = [os.path.realpath(p) for p in paths]
        if len(set(real)) != len(real):
            raise ValueError(f"{name}={list(paths)!r} names a folder twice; give each drive's folder once")
        return paths if len(paths) > 1 else paths[0]
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name}={value!r}: expected a folder path, a list of folder paths, or None")
    return _folder(name, value, must_exist=True)


class OffloadOptimizer:
    """Base of the optimizers the ``optimizer`` option accepts (``lohan.CPUAdamW``): optimizers
    that take each gradient as backward makes it and update on the host."""


@dataclass(frozen=True, init=False)
class Options:
    """Validated ``options=`` of ``torch.compile(..., backend="lohan")``.

    Keys (DESIGN.md): ``memory_budget``, ``optimizer``, ``hardware``,
    ``offload_params``, ``ssd_dir``, ``host_memory_budget``, ``policy``,
    ``dump_dir``; and ``executor`` (``"inductor"`` compiles the compute of the
    rewritten graphs with Inductor, ``"fx"`` runs them as plain fx, for
    debugging; left out: ``LOHAN_EXECUTOR``, else ``"inductor"``), ``mode`` (torch's
    compile mode, passed to Inductor), ``disable_passes`` (names of passes
    to skip, to bisect), ``debug`` (check graphs after every pass), ``tune_plans``
    (policy ``"auto"`` under a budget: when other plans are predicted close to the one it
    chose, run each for a few steps and keep the fastest measured; default True),
    ``data_parallel`` (``"auto"``: under a process group of several ranks the step must be
    data parallel; ``False``: each rank trains on its own data, on purpose), ``loss_chunks``
    (the LM head's cross-entropy computed a chunk of tokens at a time, ``passes/chunk_loss.py``:
    ``"auto"``: under a budget, where its fp32 logits take at least 4 MiB; or a number of
    chunks, 1 never).
    """

    memory_budget: int | None = None
    optimizer: Any = None
    hardware: Any = "auto"
    offload_params: Any = "auto"
    ssd_dir: str | tuple[str, ...] | None = None  # one folder, or several (striped)
    host_memory_budget: int | None = None
    policy: str = "auto"
    dump_dir: str | None = None
    executor: str | None = None  # resolved when constructed (settings.EXECUTOR)
    mode: str = "default"
    disable_passes: tuple[str, ...] = ()
    debug: bool | None = None
    tune_plans: bool = True
    data_parallel: Any = "auto"
    loss_chunks: Any = "auto"

    def __init__(self, **options: Any) -> None:
        valid = [f.name for f in fields(self)]
        for key in options:
            if key not in valid:
                raise ValueError(
                    f"unknown lohan option {key!r}.{_did_you_mean(key, valid)} "
                    f"Valid options: {', '.join(valid)}."
                )
        values = {f.name: f.default for f in fields(self)}
        values.update(options)
        parsed = {
            "memory_budget": None
            if values["memory_budget"] is None
            else parse_bytes(values["memory_budget"], name="memory_budget"),
            "optimizer": _check_optimizer(values["optimizer"]),
            "hardware": _check_hardware(values["hardware"]),
            "offload_params": _one_of("offload_params", values["offload_params"], OFFLOAD_PARAMS),
            "ssd_dir": _folders("ssd_dir", values["ssd_dir"]),
            "host_memory_budget": None
            if values["host_memory_budget"] is None
            else parse_bytes(values["host_memory_budget"], name="host_memory_budget"),
            "policy": _one_of("policy", values["policy"], POLICIES),
            "dump_dir": _folder("dump_dir", values["dump_dir"], must_exist=False),
            "executor": _default_executor()
            if values["executor"] is None
            else _one_of("executor", values["executor"], EXECUTORS),
            "mode": _one_of("mode", "default" if values["mode"] is None else values["mode"], TORCH_MODES),
            "disable_passes": _check_names("disable_passes", values["disable_passes"]),
            "debug": _check_bool("debug", values["debug"], allow_none=True),
            "tune_plans": _check_bool("tune_plans", values["tune_plans"]),
            "data_parallel": _one_of("data_parallel", values["data_parallel"], DATA_PARALLEL),
            "loss_chunks": _loss_chunks(values["loss_chunks"]),
        }
        for key, value in parsed.items():
            object.__setattr__(self, key, value)

    @classmethod
    def coerce(cls, options: "Options | Mapping[str, Any] | None", *, mode: str | None = None) -> "Options":
        """Options from what torch.compile hands a backend (dict, Options or None) and its ``mode=``."""
        if options is None:
            opts = cls()
        elif isinstance(options, Options):
            opts = options
        elif isinstance(options, Mapping):
            opts = cls(**options)
        else:
            raise ValueError(
                f"options={options!r}: expected a dict of lohan options or a lohan_compile.Options"
            )
        if mode is not None and mode != "default":
            if opts.mode not in ("default", mode):
                raise ValueError(f"mode={mode!r} conflicts with options['mode']={opts.mode!r}")
            opts = opts.replace(mode=mode)
        return opts

    def replace(self, **changes: Any) -> "Options":
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        current.update(changes)
        return Options(**current)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _default_executor() -> str:
    return EXECUTOR.get()


def _check_optimizer(value: Any) -> Any:
    if value is None or isinstance(value, OffloadOptimizer):
        return value
    raise ValueError(
        f"optimizer={type(value).__name__}: expected a lohan_compile.CPUAdamW or None. "
        "A torch optimizer needs no option: keep calling its step() as usual."
    )


def _check_hardware(value: Any) -> Any:
    if value == "auto" or isinstance(value, HardwareProfile):
        return value
    if not isinstance(value, str):
        raise ValueError(f"hardware={value!r}: expected 'auto', a preset name or a lohan_compile.HardwareProfile")
    try:
        preset(value)
    except ValueError as e:
        raise ValueError(f"hardware={value!r}: {e}") from None
    return value


def _check_names(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = tuple(p.strip() for p in value.split(",") if p.strip())
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name}={value!r}: expected a list of pass names or a comma-separated string")
    return tuple(value)


def _check_bool(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    if isinstance(value, bool) or (allow_none and value is None):
        return value
    raise ValueError(f"{name}={value!r}: expected True{', False or None' if allow_none else ' or False'}")
