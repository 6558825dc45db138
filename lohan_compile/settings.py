"""Every environment setting lohan_compile reads, declared once.

Code asks ``settings.DEBUG.get()``; tests override a setting for a scope with
``with settings.DEBUG.override(True): ...``. Passes never read settings: the
backend reads them once per compile and hands the values to the pipeline.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{name}={text!r}: expected one of 1/0, true/false, yes/no, on/off")


def _parse_names(name: str, text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _parse_path(name: str, text: str) -> str | None:
    return text or None


@dataclass
class Setting(Generic[T]):
    env: str
    default: T
    parse: Callable[[str, str], T]
    doc: str

    def __post_init__(self) -> None:
        self._overrides: list[T] = []

    def get(self) -> T:
        if self._overrides:
            return self._overrides[-1]
        text = os.environ.get(self.env)
        if text is None:
            return self.default
        return self.parse(self.env, text)

    @contextlib.contextmanager
    def override(self, value: T) -> Iterator[None]:
        self._overrides.append(value)
        try:
            yield
        finally:
            self._overrides.pop()


DEBUG: Setting[bool] = Setting(
    "LOHAN_DEBUG", False, _parse_bool,
    "Check every graph after every pass (lint, fake values, lohan metadata).",
)
DISABLE_PASSES: Setting[tuple[str, ...]] = Setting(
    "LOHAN_DISABLE_PASSES", (), _parse_names,
    "Comma-separated pass names to skip, to bisect a miscompile.",
)
DUMP_DIR: Setting[str | None] = Setting(
    "LOHAN_DUMP_DIR", None, _parse_path,
    "Folder for annotated graph dumps (the dump_dir option takes precedence).",
)
EXT_VERBOSE: Setting[bool] = Setting(
    "LOHAN_EXT_VERBOSE", False, _parse_bool,
    "Show the compiler's output while the C++ extension builds.",
)

EXT_SANITIZE: Setting[str | None] = Setting(
    "LOHAN_EXT_SANITIZE", None, _parse_path,
    "Build the C++ extension with -fsanitize=<value> (e.g. 'address'), for scripts/sanitize.sh; "
    "the process must preload the sanitizer's runtime.",
)

EXECUTORS = ("fx", "inductor")


def _parse_executor(name: str, text: str) -> str:
    value = text.strip().lower()
    if value not in EXECUTORS:
        raise ValueError(f"{name}={text!r}: expected one of {', '.join(EXECUTORS)}")
    return value


EXECUTOR: Setting[str] = Setting(
    "LOHAN_EXECUTOR", "inductor", _parse_executor,
    "The executor when options do not name one: 'inductor' (compute compiled by Inductor) or "
    "'fx' (plain fx, for debugging; the tests pin it except where they test Inductor).",
)

ALL: tuple[Setting, ...] = (DEBUG, DISABLE_PASSES, DUMP_DIR, EXECUTOR, EXT_VERBOSE, EXT_SANITIZE)
