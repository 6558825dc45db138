"""The user's modules outside the compiled step: what they read is the state after the last step.

With ``overlap="deferred"`` the optimizer's updates run after ``opt.step()`` returns, and a
streamed parameter has no data between uses. The compiled forward waits for each weight
itself; code outside it does not. So every module that owns an offloaded or streamed
parameter gets hooks (at compile time, once per module):

- ``state_dict()``: waits for that module's updates still running, and returns a streamed
  parameter's current value (a CPU copy of its host buffer) instead of its empty storage, so
  ``torch.save(model.state_dict())`` and ``save_pretrained`` write what training reached.
- ``forward`` outside torch.compile (an eager evaluation): waits for the updates of the
  module's weights; a streamed weight is refused with what to do (``lohan.materialized``).
- ``load_state_dict()``: waits for updates still running (they would overwrite the loaded
  value), gives a streamed parameter its storage for the copy and moves the loaded value to
  its host buffer, and makes the optimizer's fp32 master follow a loaded weight (unless the
  master already rounds to it: a checkpoint's optimizer state loaded first keeps its precision).

With nothing pending a hook costs a few dictionary lookups per parameter. Reading ``param.data``
directly is not hooked: call ``opt.synchronize()`` first.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Iterable

import torch

from ..errors import LohanError
from . import offload, stream

_hooked: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _managed(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters of ``module`` itself (not its children) that lohan offloads or streams."""
    out = []
    for name, p in module._parameters.items():
        if p is not None and (offload.runtime_offloading(p) is not None or stream.lookup(p) is not None):
            out.append((name, p))
    return out


def _wait(params: Iterable[torch.Tensor], *, loading: bool = False) -> None:
    """The weights of ``params`` as the last finished step left them: updates still running
    finish, and a step whose backward was interrupted (an exception, Ctrl-C) is rolled back.
    Weights a failed update left torn are refused, except to load new ones (``loading``)."""
    for p in params:
        runtime = offload.runtime_offloading(p)
        if runtime is None:
            continue
        if runtime.failed is None and runtime.in_step():
            if not runtime.roll_back_unfinished():
                if loading:
                    runtime.abort()  # new weights replace a step in flight (as opt.load_state_dict)
                else:
                    runtime.settle()
        if runtime.failed is not None:  # (also when rolling back just found the step torn)
            if loading:
                continue
            runtime.check_usable()
        if runtime.pending_weights:
            runtime.wait_weight(offload.key_of(p))


def _in_backward() -> bool:
    """Autograd is running a backward now (a hook must not roll back or wait for its step)."""
    return torch._C._current_graph_task_id() != -1


def _before_forward(module: torch.nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling() or _in_backward():
        return  # the compiled step waits for each weight itself
    managed = [p for _, p in _managed(module)]
    _wait(managed)
    if torch._C._dynamo.eval_frame.get_eval_frame_callback() is not None:
        return  # dynamo runs this call (a graph break inside the module): its graphs fetch weights
    for p in managed:
        s = stream.lookup(p)
        if s is not None and not s.resident:
            raise LohanError(
                f"{type(module).__name__} ran outside the compiled model while its weights are streamed "
                "(offload_params): they live in the host tier between steps. Evaluate it inside "
                "`with lohan_compile.materialized(model):`, or through the compiled model"
            )


def _after_state_dict(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    if _in_backward():
        return
    managed = _managed(module)
    _wait(p for _, p in managed)
    for name, p in managed:
        if prefix + name not in state_dict:
            continue
        runtime = offload.runtime_offloading(p)
        before = runtime.weight_before_step(offload.key_of(p)) if runtime is not None else None
        s = stream.lookup(p)
        if before is not None:  # between backward and step(): the weight eager would show
            state_dict[prefix + name] = before
        elif s is not None:
            state_dict[prefix + name] = s.value()


def _before_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
    managed = _managed(module)
    _wait((p for _, p in managed), loading=True)
    fetched = []
    for name, p in managed:
        s = stream.lookup(p)
        if s is not None and prefix + name in state_dict and not s.resident:
            # (after a failed update nothing is waited for: the value is replaced)
            s.fetch(after_update=runtime_failed(p) is None)
            s.wait()
            fetched.append(s)
    _loading[module] = fetched


_loading: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def runtime_failed(p: torch.Tensor) -> str | None:
    runtime = offload.runtime_offloading(p)
    return None if runtime is None else runtime.failed


@torch.no_grad()
def _after_load(module: torch.nn.Module, incompatible_keys: Any) -> None:
    fetched = {id(s): s for s in _loading.pop(module, [])}
    for _, p in _managed(module):
        s = stream.lookup(p)
        if s is not None and id(s) in fetched:
            s.set_value(p.detach())  # what the next fetch reads
            value = s.value()  # (a host copy for the optimizer's master: the device's copy goes)
            s.release()
        elif s is not None:
            value = s.value() if not s.resident else p.detach()
        else:
            value = p.detach()
        runtime = offload.runtime_offloading(p)
        if runtime is not None:
            runtime.adopt_weight(offload.key_of(p), value)


_later: list[weakref.ref] = []


def watch_later(modules: Iterable[torch.nn.Module]) -> None:
    """``watch(modules)`` at the next ``watch_pending()``: hooks are not added while dynamo
    compiles a frame (it checks its guards, module hooks among them, right after the backend
    returns), but when the compiled code first runs."""
    _later.extend(weakref.ref(m) for m in modules)


_roots: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # every root watched so far


def watch_pending() -> None:
    again = offload.take_eager_registrations()  # parameters taken on since: their modules too
    if _later or again:
        roots = [m for m in (ref() for ref in _later) if m is not None]
        _later.clear()
        watch([*roots, *(list(_roots) if again else ())])


def watch(modules: Iterable[torch.nn.Module]) -> int:
    """Hook every module among ``modules`` and their submodules that owns a parameter lohan
    offloads or streams (modules already hooked are skipped). Returns how many were hooked."""
    n = 0
    for root in modules:
        _roots.add(root)
        for module in root.modules():
            if module in _hooked or not _managed(module):
                continue
            _hooked[module] = (
                module.register_forward_pre_hook(_before_forward),
                module.register_state_dict_post_hook(_after_state_dict),
                module.register_load_state_dict_pre_hook(_before_load),
                module.register_load_state_dict_post_hook(_after_load),
            )
            n += 1
    return n


_ROOT = re.compile(r"([LG])\['([^']+)'\]")
_STEP = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)")


def _module_along(value: Any, path: str) -> torch.nn.Module | None:
    """The first module reached following ``path`` (``[0]._modules['x']...``) from ``value``."""
    pos = 0
    while not isinstance(value, torch.nn.Module):
        m = _STEP.match(path, pos)
        if m is None:
            return None
        key, index, attr = m.groups()
        try:
            if attr is not None:
                value = getattr(value, attr)
            else:
                value = value[int(index)] if index is not None else value[key]
        except Exception:  # noqa: BLE001 - a source this walk does not understand
            return None
        pos = m.end()
    return value


def roots_of_sources(sources: Iterable[str | None]) -> list[torch.nn.Module]:
    """The outermost modules that dynamo's input sources pass through (``L['self']._modules[...]``,
    ``L['args'][0]._modules[...]``), looked up in the frame being compiled now; empty outside
    dynamo (a graph handed to the backend directly)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - no frame is being compiled
        return []
    if tx is None:
        return []
    out: dict[int, torch.nn.Module] = {}
    for source in sources:
        m = _ROOT.match(source or "")
        if m is None:
            continue
        scope = tx.f_locals if m.group(1) == "L" else tx.f_globals
        if m.group(2) not in scope:
            continue
        module = _module_along(scope[m.group(2)], source[m.end():])
        if module is not None:
            out[id(module)] = module
    return list(out.values())
