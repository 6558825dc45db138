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
import sys
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.nn.parallel import DistributedDataParallel

from ..errors import LohanError
from ..hardware import auto
from ..ops import swap_ops_available
from ..options import Options
from ..runtime import hosttier
from .compiler import find_optimizer
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
    check_distributed(opts, example_inputs)
    use_host_tier(opts)
    return Replanning(gm, example_inputs, opts)


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


def check_distributed(opts: Options, example_inputs: Sequence[Any]) -> None:
    """Under a process group of several ranks, refuse a training graph whose gradients nothing
    would reduce: each rank would train on its own data alone, silently. A model wrapped in
    ``DistributedDataParallel`` is compiled inside DDP's forward, and DDP reduces its gradients;
    ``data_parallel=False`` says the ranks are meant to train apart. Parameters sharded by FSDP
    (DTensors) are refused: lohan's plans and optimizer work on whole tensors."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if any(_is_dtensor(t) for t in example_inputs):
        raise LohanError(
            "lohan cannot compile a model whose parameters FSDP shards (DTensor parameters): its plans "
            "and CPU optimizer work on whole tensors. Wrap the model in DistributedDataParallel instead "
            "(each rank then holds the whole model, and lohan offloads it as on one GPU).")
    world = torch.distributed.get_world_size()
    if world <= 1 or opts.data_parallel is False or not torch.is_grad_enabled():
        return
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        return  # nothing to train
    if DistributedDataParallel._get_active_ddp_module() is not None:
        if find_optimizer(opts, example_inputs) is None:
            return  # compiled inside DDP's forward: DDP reduces the gradients
        raise LohanError(
            f"lohan: this process is one of {world}, and the model is wrapped in DistributedDataParallel "
            "with a lohan CPUAdamW: CPUAdamW takes each gradient inside the compiled backward, before "
            "DDP's hooks could reduce it, so each rank would update from its own batch alone. lohan does "
            "not reduce gradients across processes yet: with several processes, train with a torch "
            "optimizer (DDP reduces its gradients), or pass options={'data_parallel': False, ...} if the "
            "ranks are meant to train apart.")
    raise LohanError(
        f"lohan: this process is one of {world} (torch.distributed's default process group), and the "
        "model compiled for training is not wrapped in DistributedDataParallel. lohan does not reduce "
        "gradients across processes yet, so each rank would train on its own batch alone. Compile "
        "DistributedDataParallel(model) instead (its gradient reduction keeps working with lohan), or "
        "pass options={'data_parallel': False, ...} if the ranks are meant to train apart.")


def _is_dtensor(t: Any) -> bool:
    # (a DTensor exists only once its module was imported: nothing to import here)
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)
