"""Sizes that may be symbolic.

After a recompile with dynamic shapes, node sizes are ``SymInt``s backed by
sympy expressions. Everything here takes ints or SymInts, never crashes on a
symbol, and keeps the expression: reports print it, and the runtime evaluates
it with the sizes a graph is really called with (``bind_symbols``).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterable, Iterator, Mapping, Sequence

import sympy
import torch
from torch._prims_common import is_contiguous_or_false

# Used only when an unbacked size has no hint at all (data-dependent sizes).
UNBACKED_FALLBACK = 4096

# Sizes to plan for, overriding the hints (a re-plan for sizes larger than the first ones), with
# the value of each expression evaluated so far under them (a plan evaluates the same few
# expressions for every node)
_PLANNING_SIZES: contextvars.ContextVar[tuple[Mapping[sympy.Symbol, sympy.Integer], dict] | None] = (
    contextvars.ContextVar("lohan_planning_sizes", default=None))


@contextlib.contextmanager
def planning_sizes(bindings: Mapping[sympy.Symbol, int] | None) -> Iterator[None]:
    """Evaluate symbolic sizes with ``bindings`` instead of their hints, in this scope."""
    token = _PLANNING_SIZES.set(({k: sympy.Integer(v) for k, v in bindings.items()}, {}) if bindings else None)
    try:
        yield
    finally:
        _PLANNING_SIZES.reset(token)


def expr_of(x: Any) -> sympy.Expr:
    """The sympy expression of an int or SymInt."""
    if isinstance(x, torch.SymInt):
        return x.node.expr
    if isinstance(x, (int, sympy.Expr)):
        return sympy.sympify(x)
    raise TypeError(f"expected an int or SymInt, got {type(x).__name__}")


def hint_int(x: Any) -> int:
    """A concrete value for an int or SymInt: its size hint, without adding guards."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        node = x.node
        planning = _PLANNING_SIZES.get()
        if planning is not None:
            override, known = planning
            value = known.get(node.expr)
            if value is None:
                value = known[node.expr] = sympy.sympify(node.expr.xreplace(override))
            if value.is_number:
                return int(value)
        if node.has_hint():
            return int(node.hint)
        shape_env = getattr(node, "shape_env", None)
        if shape_env is not None:
            value = shape_env.size_hint(node.expr, allow_none=True)
            if value is not None:
                return int(value)
        return UNBACKED_FALLBACK
    if isinstance(x, sympy.Expr):
        if x.is_number:
            return int(x)
        raise ValueError(f"no hint for symbolic size {x}")
    raise TypeError(f"expected an int or SymInt, got {type(x).__name__}")


def definitely_contiguous(val: torch.Tensor) -> bool:
    """``val`` is contiguous whatever its symbolic sizes stand for (False when that depends on
    them), without adding a guard."""
    return bool(is_contiguous_or_false(val))


def nbytes_expr(val: torch.Tensor) -> sympy.Expr:
    """Bytes a tensor value's elements occupy (numel x itemsize), possibly symbolic."""
    numel = sympy.Integer(1)
    for s in val.shape:
        numel = numel * expr_of(s)
    return sympy.expand(numel * val.element_size())


def nbytes_hint(val: torch.Tensor) -> int:
    n = 1
    for s in val.shape:
        n *= hint_int(s)
    return n * val.element_size()


def bind_symbols(vals: Sequence[Any], args: Sequence[Any]) -> dict[sympy.Symbol, int]:
    """Map each free symbol of the placeholders' fake values to the runtime value.

    ``vals`` are the placeholders' ``meta["val"]`` (ints, SymInts, tensors),
    ``args`` the values the graph is called with, in the same order. A symbol
    is bound where it appears alone: as a SymInt input or as one dimension.
    """
    out: dict[sympy.Symbol, int] = {}
    for val, arg in zip(vals, args):
        if isinstance(val, torch.SymInt) and isinstance(arg, (int, torch.SymInt)):
            _bind(out, val.node.expr, arg)
        elif isinstance(val, torch.Tensor) and isinstance(arg, torch.Tensor):
            for s, a in zip(val.shape, arg.shape):
                if isinstance(s, torch.SymInt):
                    _bind(out, s.node.expr, a)
    return out


def _bind(out: dict, expr: sympy.Expr, value: Any) -> None:
    if isinstance(expr, sympy.Symbol) and isinstance(value, int):
        out[expr] = value


def evaluate(expr: sympy.Expr, bindings: Mapping[sympy.Symbol, int]) -> int | None:
    """The integer value of ``expr`` under ``bindings``; None if a symbol stays free."""
    value = sympy.sympify(expr.xreplace(dict(bindings))) if bindings else expr
    return int(value) if value.is_number else None


def sum_exprs(exprs: Iterable[sympy.Expr]) -> sympy.Expr:
    return sympy.expand(sympy.Add(*exprs))
