"""Run under ``torchrun --nproc_per_node N`` as ``train_dp.py CASE OUT_DIR``: a bare Hugging Face
LLaMA-style model compiled with lohan and trained data parallel, each rank on its slice of a
global batch, next to one eager process on the whole global batch (``torch.optim.AdamW`` and
``clip_grad_norm_``), computed in every rank. Each rank writes ``OUT_DIR/rank<N>.json``
(tests/test_distributed.py).

CASE: ``cpuadamw`` (a CPUAdamW with clipping), ``swap`` (and a memory budget under which the plan
swaps), ``stream`` (and ``offload_params=True``), ``torch-inductor`` (a torch AdamW reading
``param.grad``, clipping by ``clip_grad_norm_``, the Inductor executor).
"""

import contextlib
import copy
import json
import math
import os
import sys

import torch
import torch.distributed as dist

import lohan_compile as lohan

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from models import tiny_llama  # noqa: E402

STEPS, ROWS, TOKENS, LR, CLIP = 4, 2, 16, 1e-2, 1.0
VOCAB = 512  # (embedding and LM head large enough to be reduced alone, the rest in a bucket)

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
case, out_dir = sys.argv[1], sys.argv[2]

g = torch.Generator().manual_seed(7)
batches = [torch.randint(0, VOCAB, (world * ROWS, TOKENS), generator=g) for _ in range(STEPS)]


def loss_of(m, ids):
    return m(input_ids=ids, labels=ids).loss


torch.manual_seed(0)
model = tiny_llama(vocab=VOCAB)
# the reference first, and only its result kept: on the CPU stand-in what it holds while the
# compiled model trains would be device memory beside the step's budget
reference = copy.deepcopy(model)
ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.01)
reference_losses = []
for ids in batches:
    ref_loss = loss_of(reference, ids)
    ref_loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
    ref_opt.step()
    ref_opt.zero_grad()
    reference_losses.append(float(ref_loss.detach()))
ref = {k: v.detach().clone() for k, v in reference.state_dict().items()}
ref_moments = {i: (st["exp_avg"].clone(), st["exp_avg_sq"].clone()) for i, st in ref_opt.state_dict()["state"].items()}
del reference, ref_opt, ref_loss


def state_bytes(optimizer):
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


options = {"executor": "inductor" if case == "torch-inductor" else "fx"}
if case == "swap":
    # below what a plan that keeps everything predicts (the ranks agree: the same model)
    twin = copy.deepcopy(model)
    probe = torch.compile(twin, backend="lohan", options={**options, "optimizer": lohan.CPUAdamW(twin.parameters())})
    loss_of(probe, batches[0][:ROWS]).backward()
    # (a budget per rank: the ranks run different plans, their collectives still in one order)
    options["memory_budget"] = int((0.8 + 0.1 * rank) * lohan.last_report().summary()["predicted_peak_bytes"])
    del probe, twin
if case == "stream":
    options["offload_params"] = True
if case in ("torch-inductor", "ddp"):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
else:
    opt = lohan.CPUAdamW(model.parameters(), lr=LR, weight_decay=0.01, max_grad_norm=CLIP)
    options["optimizer"] = opt
run = torch.nn.parallel.DistributedDataParallel(model) if case == "ddp" else model
compiled = torch.compile(run, backend="lohan", options=options)

out = {"rank": rank, "world": world, "case": case, "losses": [], "reference_losses": reference_losses, "summaries": []}


def payload(events, name):
    """Bytes of the fp32 tensors gloo's collectives named ``name`` carried (each event lists the
    shapes of all its tensors; a 3-element one is the step's exchange of the gradient norm, the
    non-finite flag and whether a rank cannot take the weights, not a gradient)."""
    return sum(4 * math.prod(shape) for e in events if e.name == name and e.input_shapes != [[3]]
               for shape in e.input_shapes)


for step, ids in enumerate(batches):
    mine = ids[rank * ROWS:(rank + 1) * ROWS]
    profiling = step == len(batches) - 1  # the collectives the last step ran, counted where they ran
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) \
            if profiling else contextlib.nullcontext() as prof:
        loss = loss_of(compiled, mine)
        loss.backward()
        if case in ("torch-inductor", "ddp"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
    if profiling:
        events = prof.events()
        out["measured_reduced_bytes"] = payload(events, "gloo:all_reduce")
        out["measured_broadcast_bytes"] = payload(events, "gloo:broadcast")
    summary = lohan.last_report().summary()
    out["summaries"].append({k: summary.get(k) for k in ("swapped_bytes", "d2h_bytes", "h2d_bytes", "measured_peak_bytes", "predicted_peak_bytes", "plans", "reduced_bytes",
                                                          "budget_bytes")})
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    out["losses"].append(float(mean) / world)


mine = model.state_dict()
out["relative_error"] = {k: float((mine[k] - ref[k]).norm() / ref[k].norm()) for k in ref}
out["model_relative_error"] = float(torch.cat([(mine[k] - ref[k]).flatten() for k in ref]).norm()
                                   / torch.cat([ref[k].flatten() for k in ref]).norm())
out["max_abs_error"] = {k: float((mine[k] - ref[k]).abs().max()) for k in ref}
out["lr"] = LR
out["state_bytes"] = state_bytes(opt) if isinstance(opt, lohan.CPUAdamW) else None
if isinstance(opt, lohan.CPUAdamW):
    # a rank's checkpoint holds its part and says so; the whole one equals one process's state
    # and loads into a CPUAdamW of one process
    out["shard"] = opt.state_dict().get("lohan_shard")
    full = opt.full_state_dict()
    out["full_state_params"] = len(full["state"])
    out["full_steps"] = sorted({float(st["step"]) for st in full["state"].values()})
    out["moment_errors"] = [max(float((st["exp_avg"] - ref_moments[i][0]).abs().max()),
                                float((st["exp_avg_sq"] - ref_moments[i][1]).abs().max()))
                            for i, st in full["state"].items()]
    alone = lohan.CPUAdamW(tiny_llama(vocab=VOCAB).parameters(), lr=LR)  # (a model of one process)
    alone.load_state_dict(full)
    out["loaded_params"] = len(alone.state)
# one process's CPUAdamW of a compiled fp32 model holds a host master and two moments per weight
out["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
out["whole_state_bytes"] = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
out["reduce_grads"] = [g.pass_report("reduce_grads") for g in lohan.last_report().graphs]
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
