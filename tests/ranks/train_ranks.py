"""Run under ``torchrun --nproc_per_node 2`` as ``train_ranks.py CASE OUT_DIR``: what lohan does
with a model trained by several processes (tests/test_distributed.py). Each rank writes
``OUT_DIR/rank<N>.json``."""

import copy
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


def batches(of_rank=rank):
    g = torch.Generator().manual_seed(100 + of_rank)  # each rank its own data
    return [torch.randn(2, 16, 32, generator=g) for _ in range(3)]


CLIP = 0.05  # (the gradients' norm is above it: every step clips)


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


class Lopsided(torch.nn.Module):
    """A block and a large layer the step never uses: rank 0 updates the large weight, rank 1
    every parameter of the block, so rank 0 takes no gradient in a step."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(512, 512)
        self.block = Block(d=32, heads=2)

    def forward(self, x):
        return self.block(x)


torch.manual_seed(0)
model = {"eager-head": EagerHead, "lopsided": Lopsided}.get(case, lambda: Block(d=32, heads=2))()
reference = copy.deepcopy(model)
run = torch.nn.parallel.DistributedDataParallel(model) if case.startswith("ddp") else model
options = {"executor": "fx", **({"data_parallel": False} if case == "apart" else {})}
if case in ("ddp-cpuadamw", "eager-head", "lopsided"):
    opt = lohan_compile.CPUAdamW(model.parameters(), lr=0.1, max_grad_norm=CLIP if case != "ddp-cpuadamw" else None)
    options["optimizer"] = opt
else:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
compiled = torch.compile(run, backend="lohan", options=options)
out = {"rank": rank, "case": case, "initial": float(torch.stack([p.detach().norm() for p in model.parameters()]).sum())}
out["grad_norms"] = []
try:
    for x in batches():
        compiled(x).square().mean().backward()
        opt.step()
        out["grad_norms"].append(getattr(opt, "last_grad_norm", None))
        opt.zero_grad()
except Exception as e:  # noqa: BLE001 - reported to the test (torch wraps the backend's error)
    out["error"] = f"{type(e).__name__}: {e}"
if case in ("eager-head", "lopsided"):
    # one process on the global batch (the mean of the ranks' losses), clipping by its norm
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.1)
    out["reference_grad_norms"] = []
    for xs in zip(*(batches(r) for r in range(world))):
        torch.stack([reference(x).square().mean() for x in xs]).mean().backward()
        out["reference_grad_norms"].append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)))
        ref_opt.step()
        ref_opt.zero_grad()
    out["max_error"] = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), reference.parameters()))
norm = torch.stack([p.detach().norm() for p in model.parameters()]).sum()
gathered = [torch.zeros(()) for _ in range(world)]
dist.all_gather(gathered, norm)
out["norms"] = [float(t) for t in gathered]
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()

# What this rank computed is written. A rank was once seen to abort while the interpreter shut
# down ("terminate called without an active exception": a C++ thread still joinable at exit),
# after its work and its file; that is not what these scripts test, and it is not understood
# yet (see the README's "Several GPUs"): leave without running the exit-time destructors.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
