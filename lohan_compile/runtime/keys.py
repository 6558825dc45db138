"""One integer key per parameter: the name the graph ops give it.

The backend takes a key for every parameter of a graph before the passes run, so a pass can
write it into the ops it inserts (``weight_ready(key)``, ``fetch_param(key)``) without touching
the runtime; the runtime entries (an offloaded gradient, a streamed weight) are bound to the
same key after the passes ran. A key dies with its parameter: an id reused by a new tensor
gets a new key.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch

# re-entrant: a collection inside ``key_for`` may run ``drop`` (a weakref callback) on this thread
_lock = threading.RLock()
_next = itertools.count()
_key_of: dict[int, int] = {}  # id(param) -> key
_param_of: dict[int, weakref.ref] = {}  # key -> param


def key_for(param: torch.Tensor) -> int:
    """``param``'s key, made on first use."""
    with _lock:
        key = _key_of.get(id(param))
        if key is not None and _param_of[key]() is param:
            return key
        key = next(_next)
        _key_of[id(param)] = key
        _param_of[key] = weakref.ref(param, _forget(id(param), key))
        return key


def existing_key(param: torch.Tensor) -> int | None:
    """``param``'s key if it has one."""
    with _lock:
        key = _key_of.get(id(param))
        return key if key is not None and _param_of[key]() is param else None


def param_of(key: int) -> torch.Tensor | None:
    """The parameter of ``key``, while it lives."""
    with _lock:
        ref = _param_of.get(key)
        return ref() if ref is not None else None


def _forget(ident: int, key: int):
    def drop(_ref) -> None:
        with _lock:
            _param_of.pop(key, None)
            if _key_of.get(ident) == key:
                del _key_of[ident]

    return drop
