"""Several processes (``torchrun``): which process group a compiled training step averages its
gradients over, and what lohan refuses to train under one.

With a default process group of several ranks, a model compiled for training is data parallel
(option ``data_parallel="auto"``): the ``reduce_grads`` pass averages every parameter gradient
over the ranks inside the compiled backward, before the optimizer (a torch one reading
``param.grad``, or a ``CPUAdamW`` taking each gradient as backward makes it) sees it. A model
wrapped in ``DistributedDataParallel`` has its gradients reduced by DDP, so lohan does not.

With a ``CPUAdamW`` the ranks share the update, as ZeRO-Offload does: each parameter has one
owner rank (balanced by bytes), whose optimizer alone holds its fp32 state and updates it; at
``opt.step()`` the owner's updated weight is broadcast to the other ranks. Host memory and CPU
work of the optimizer per rank are about 1/N of one process's. Not with ``offload_params=True``
(a streamed weight lives in its rank's host tier, which the broadcast does not reach yet).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from ..errors import LohanError
from ..graph.pipeline import DataParallel
from ..options import Options
from ..runtime import offload
from .compiler import find_optimizer


def data_parallel(opts: Options, example_inputs: Sequence[Any]) -> DataParallel | None:
    """The group the training step compiled from ``example_inputs`` averages its gradients over
    (None: one process, ``data_parallel=False``, or DDP reduces them). Refuses what would train
    the ranks apart silently: a ``CPUAdamW`` under DDP (it takes each gradient inside the
    compiled backward, before DDP's hooks could reduce it), and parameters FSDP shards
    (DTensors: lohan's plans and optimizer work on whole tensors)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if any(_is_dtensor(t) for t in example_inputs):
        raise LohanError(
            "lohan cannot compile a model whose parameters FSDP shards (DTensor parameters): its plans "
            "and CPU optimizer work on whole tensors. Compile the model itself (lohan averages its "
            "gradients over the ranks), or wrap it in DistributedDataParallel.")
    world = torch.distributed.get_world_size()
    if world <= 1 or opts.data_parallel is False:
        return None
    if DistributedDataParallel._get_active_ddp_module() is not None:
        if find_optimizer(opts, example_inputs) is None:
            return None  # compiled inside DDP's forward: DDP reduces the gradients
        raise LohanError(
            f"lohan: this process is one of {world}, and the model is wrapped in DistributedDataParallel "
            "with a lohan CPUAdamW: CPUAdamW takes each gradient inside the compiled backward, before "
            "DDP's hooks could reduce it, so each rank would update from its own batch alone. Compile "
            "the model without DistributedDataParallel: lohan averages its gradients over the ranks "
            "itself. (Or pass options={'data_parallel': False, ...} if the ranks are meant to train apart.)")
    group = torch.distributed.group.WORLD
    rank = torch.distributed.get_rank()
    optimizer = find_optimizer(opts, example_inputs)
    owners = {}
    if optimizer is not None and opts.offload_params is not True:
        table = offload.owner_ranks(optimizer, world)
        owners = {i: table[id(t)] for i, t in enumerate(example_inputs) if id(t) in table}
    return DataParallel(world=world, rank=rank, group_name=group.group_name, owners=owners)


def _is_dtensor(t: Any) -> bool:
    # (a DTensor exists only once its module was imported: nothing to import here)
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)
