"""Gradients added into ``param.grad`` where backward makes them (``passes/accumulate_grads.py``).

Autograd adds a parameter's gradient into ``.grad`` when the backward graph returns, so a
step that accumulates micro-batches holds the earlier ``.grad`` and every new gradient at
once. ``lohan::accumulate_grad(grad, key, own)`` does autograd's addition inside backward, right
after the gradient is made, and backward returns no gradient for it:

- ``.grad`` defined: added in place (``grad`` is then freed where the plan frees it);
- ``.grad`` None (a first micro-batch after ``zero_grad(set_to_none=True)``): ``grad``
  becomes ``.grad``, as autograd makes it (the tensor itself where nothing else holds its
  storage and it is laid out as the parameter, else a copy laid out as the parameter);
- a backward that does not accumulate into this parameter (``backward(inputs=[...])``
  without it): nothing, as autograd does nothing.

What autograd would do differently is refused rather than computed otherwise: a hook
registered on the parameter after it was compiled (it would not see the gradient), and
``torch.autograd.grad`` asking for it (backward returns none to give it). The refusal comes
from ``lohan::accumulate_check(keys)``, first in backward, so no ``.grad`` is half added into.
"""

from __future__ import annotations

import torch

from .. import ops
from ..errors import LohanError
from . import keys


def has_grad_hooks(param: torch.Tensor) -> bool:
    """Hooks that see a gradient on its way into ``.grad`` or once it is there."""
    return bool(param._backward_hooks) or bool(getattr(param, "_post_accumulate_grad_hooks", None))


def _accumulator(param: torch.Tensor) -> torch.autograd.graph.Node:
    """The parameter's AccumulateGrad node (asked for each time: held, it would hold the
    parameter, which it references, for as long as this module lives)."""
    with torch.enable_grad():
        return param.view_as(param).grad_fn.next_functions[0][0]


def _will_accumulate(param: torch.Tensor) -> bool:
    try:
        return torch._C._will_engine_execute_node(_accumulator(param))
    except RuntimeError as e:
        if "autograd.grad" not in str(e):
            raise
        raise LohanError(
            "torch.autograd.grad asked for the gradient of a parameter this compiled model adds into "
            "its .grad inside backward (it was compiled while .grad held gradients of earlier "
            "micro-batches, so that only one copy of them exists); backward returns none to give. "
            "Call model.zero_grad(set_to_none=True) and torch._dynamo.reset() before compiling a "
            "model whose gradients torch.autograd.grad reads."
        ) from None


def _as_grad(grad: torch.Tensor, param: torch.Tensor, own: bool) -> torch.Tensor:
    """What becomes ``param.grad`` where it is None, as autograd makes it: the gradient itself
    where nothing else holds its storage (``own``, known when the graph was rewritten), it is
    the whole of it, and it is laid out as the parameter; else a copy laid out as the parameter
    (its strides where it is dense, else contiguous)."""
    dense = ops.is_dense(param)
    whole = grad.storage_offset() == 0 and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
    if own and whole and (grad.stride() == param.stride() or not dense):
        return grad
    if dense:
        return torch.empty_strided(param.shape, param.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)
    return grad.clone(memory_format=torch.contiguous_format)


def _param(key: int) -> torch.Tensor:
    param = keys.param_of(key)
    if param is None:
        raise LohanError("a parameter of this compiled model no longer exists; compile the model again")
    return param


# whether the backward running now adds into each parameter's .grad, found by its
# accumulate_check for its accumulate_grad ops (each reads its own once: nothing outlives them)
_WILL: dict[int, bool] = {}


def _accumulate_check_impl(param_keys: list[int]) -> None:
    will = {}
    for key in param_keys:
        param = _param(key)
        if has_grad_hooks(param):
            raise LohanError(
                "a hook was registered on a parameter after the model was compiled, which adds that "
                "parameter's gradient into .grad inside backward (the hook would not see it); register "
                "hooks before compiling, or call torch._dynamo.reset() after registering them"
            )
        will[key] = _will_accumulate(param)  # (raises where torch.autograd.grad asks for it)
    _WILL.update(will)


def _accumulate_grad_impl(grad: torch.Tensor, key: int, own: bool) -> None:
    param = _param(key)
    will = _WILL.pop(key, None)
    if not (_will_accumulate(param) if will is None else will):
        return
    with torch.no_grad():
        if param.grad is None:
            param.grad = _as_grad(grad, param, own)
        else:
            param.grad.add_(grad)


ops.implement("accumulate_check", _accumulate_check_impl)
ops.implement("accumulate_grad", _accumulate_grad_impl)
