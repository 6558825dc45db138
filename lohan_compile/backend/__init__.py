"""The ``lohan`` torch.compile backend: the entry point (this module), the graph compiler
(``compiler.py``: AOTAutograd callbacks, the pass pipeline, binding the runtime, executors)
and the compiled callable that plans again when a plan no longer fits (``replan.py``).


``torch.compile(model, backend="lohan", options={...})`` finds
``lohan_backend`` through the ``torch_dynamo_backends`` entry point. Dynamo
hands it an FX graph and example inputs (the real parameters); the backend
builds AOTAutograd with its own partition function, so the joint
forward+backward graph goes through the pass pipeline, then runs the forward
and backward graphs (``executor``): by default Inductor compiles the compute
between lohan's ops, which run in the planned order (``graph/segments.py``);
``executor="fx"`` runs them as plain fx.

``mode=``: torch passes its compile mode to custom backends. With the
Inductor executor the mode selects Inductor's options (max-autotune and so on)
except CUDA graphs, which cannot capture lohan's host-side copies and
optimizer; with the fx executor it has no effect (a log message says so).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..errors import LohanError
from ..hardware import auto
from ..ops import swap_ops_available
from ..options import Options
from ..runtime import hosttier
from .distributed import data_parallel
from .replan import Replanning

log = logging.getLogger(__name__)


def lohan_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Any = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """torch.compile backend entry point (see the module docstring)."""
    opts = Options.coerce(options, mode=mode)
    if opts.hardware == "auto" and any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs):
        opts = opts.replace(hardware=auto(device="cuda"))  # plan a GPU's graph with the GPU's speeds
    check_supported(opts)
    group = data_parallel(opts, example_inputs)
    use_host_tier(opts)
    return Replanning(gm, example_inputs, opts, data_parallel=group)


_tiers: dict[tuple[int | None, str | None], Any] = {}


def use_host_tier(opts: Options) -> None:
    """With ``host_memory_budget`` or ``ssd_dir``, the host tier the step uses is one with that
    budget and SSD folder (made once per setting, kept current): swapped activations and
    gradients live in it, and optimizer state beyond the budget goes to its SSD folder."""
    if opts.host_memory_budget is None and opts.ssd_dir is None:
        return
    key = (opts.host_memory_budget, opts.ssd_dir)
    tier = _tiers.get(key)
    if tier is None or tier.closed:
        arena = None if opts.host_memory_budget is None else hosttier.HostTier.arena_bytes_for(opts.host_memory_budget)
        kwargs = {} if arena is None else {"arena_bytes": arena}
        tier = _tiers[key] = hosttier.HostTier.from_options(opts, **kwargs)
    current = hosttier.current_if_set()
    if current is None or current._obj is not tier._obj:
        if any(t._obj is (current._obj if current else None) for k, t in _tiers.items() if k != key):
            log.warning("lohan: host_memory_budget/ssd_dir changed from an earlier compile; the process "
                        "has one current host tier, and graphs compiled before now use the new one too")
        hosttier.set_current(tier)


def check_supported(opts: Options) -> None:
    """Refuse, with a clear message, options this version cannot honour yet.

    Accepting them would silently run something other than what was asked.
    """
    unsupported = []
    if opts.policy in ("zero-infinity", "zero-offload"):
        unsupported.append(f"policy={opts.policy!r} (a baseline of `lohan plan`, simulated only)")
    if opts.policy == "swap-all" and not swap_ops_available():
        unsupported.append("policy='swap-all' (the host tier's swap ops are not built)")
    if unsupported:
        raise LohanError(
            "lohan_compile 0.2 cannot honour these options yet: "
            + "; ".join(unsupported)
            + ". Remove them, or use policy 'auto', 'keep-all' or 'recompute-all'."
        )
