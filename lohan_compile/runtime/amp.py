"""torch's ``GradScaler`` with a ``CPUAdamW`` whose gradients lohan offloads.

GradScaler unscales and checks ``param.grad``, which offloaded parameters never get. For such an
optimizer, ``unscale_`` only records that its gradients count as unscaled from now on, and
``step`` hands the inverse of the scale to ``CPUAdamW.step``: the update unscales each gradient
(with the clip coefficient, in one multiplication), the global norm is the unscaled gradients',
and a step with an inf or NaN gradient is skipped, as GradScaler skips it. What the step found
goes back to the scaler, so that ``update()`` backs the scale off or grows it as it would have.

Every access to GradScaler's private state is in this module: a torch upgrade that moves it is
one edit here.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.amp.grad_scaler import GradScaler, OptState


_SCALING: "weakref.WeakSet[GradScaler]" = weakref.WeakSet()  # enabled scalers that scaled a loss


def scaling_seen() -> bool:
    """A live, enabled GradScaler has scaled a loss: an offloading optimizer's updates during
    backward would run on scaled gradients, so they keep roll-back copies (or wait for
    ``step()``, where the scale is known)."""
    return len(_SCALING) > 0


def note_scale(scaler: GradScaler) -> None:
    """``scaler.scale(...)`` is about to scale a loss (``scaling_seen`` while the scaler lives)."""
    if scaler.is_enabled():
        _SCALING.add(scaler)


def _optimizer_state(scaler: GradScaler, optimizer: Any, method: str) -> dict:
    scaler._check_scale_growth_tracker(method)
    return scaler._per_optimizer_states[id(optimizer)]


def unscale_(scaler: GradScaler, optimizer: Any) -> None:
    """``scaler.unscale_(optimizer)``: the gradients are unscaled inside the optimizer's update;
    the same errors as torch's for a second call or a call after ``step``."""
    if not scaler.is_enabled():
        return
    state = _optimizer_state(scaler, optimizer, "unscale_")
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    state["stage"] = OptState.UNSCALED


def step(scaler: GradScaler, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
    """``scaler.step(optimizer)``: the optimizer's step with the inverse scale, skipped inside
    when a gradient is inf or NaN; the scaler records whether one was."""
    if not scaler.is_enabled():
        return optimizer.step(*args, **kwargs)
    if "closure" in kwargs:
        raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
    state = _optimizer_state(scaler, optimizer, "step")
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("step() has already been called since the last update().")
    scale = scaler._scale
    # the reciprocal as torch's unscale_ computes it (in fp64, rounded to fp32); its presence
    # tells the optimizer the gradients are scaled (even by 1)
    inv_scale = float(scale.double().reciprocal().float())
    optimizer._inv_loss_scale = inv_scale
    try:
        result = optimizer.step(*args, **kwargs)
    finally:
        del optimizer._inv_loss_scale
    state["found_inf_per_device"] = {
        scale.device: torch.full((), float(bool(optimizer.found_inf)), dtype=torch.float32, device=scale.device)}
    state["stage"] = OptState.STEPPED
    return None if optimizer.found_inf else result
