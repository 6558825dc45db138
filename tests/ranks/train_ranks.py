"""Run under ``torchrun --nproc_per_node 2`` as ``train_ranks.py CASE OUT_DIR``: what lohan does
with a model trained by several processes (tests/test_distributed.py). Each rank writes
``OUT_DIR/rank<N>.json``."""

import json
import os
import sys

import torch
import torch.distributed as dist

import lohan_compile  # noqa: F401 - the backend's entry point is found without it; imported as users do

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from models import Block  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
case, out_dir = sys.argv[1], sys.argv[2]


def batches():
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    return [torch.randn(2, 16, 32, generator=g) for _ in range(3)]


class EagerHead(torch.nn.Module):
    """A block whose head dynamo never compiles: its weight's gradient reaches the optimizer
    from autograd, outside the compiled graphs."""

    def __init__(self):
        super().__init__()
        self.block = Block(d=32, heads=2)
        self.head = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.eager_head(self.block(x))

    @torch.compiler.disable
    def eager_head(self, y):
        return self.head(y)


if case == "lopsided":
    # another model first, whose one large weight rank 0 updates: the next model's parameters
    # all go to rank 1, which then holds less (rank 0 updates none of them)
    other = torch.nn.Linear(512, 512)
    other_opt = lohan_compile.CPUAdamW(other.parameters())
    torch.compile(other, backend="lohan", options={"executor": "fx"})(torch.randn(2, 512)).sum().backward()
    other_opt.step()

torch.manual_seed(0)
model = EagerHead() if case == "eager-head" else Block(d=32, heads=2)
run = torch.nn.parallel.DistributedDataParallel(model) if case.startswith("ddp") else model
options = {"executor": "fx", **({"data_parallel": False} if case == "apart" else {})}
if case in ("ddp-cpuadamw", "eager-head", "lopsided"):
    opt = lohan_compile.CPUAdamW(model.parameters(), lr=0.1)
    options["optimizer"] = opt
else:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
compiled = torch.compile(run, backend="lohan", options=options)
out = {"rank": rank, "case": case, "initial": float(torch.stack([p.detach().norm() for p in model.parameters()]).sum())}
try:
    for x in batches():
        compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
except Exception as e:  # noqa: BLE001 - reported to the test (torch wraps the backend's error)
    out["error"] = f"{type(e).__name__}: {e}"
norm = torch.stack([p.detach().norm() for p in model.parameters()]).sum()
gathered = [torch.zeros(()) for _ in range(world)]
dist.all_gather(gathered, norm)
out["norms"] = [float(t) for t in gathered]
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
