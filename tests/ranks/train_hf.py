"""Run under ``torchrun --nproc_per_node 2`` as ``train_hf.py CASE OUT_DIR``: the Hugging Face
Trainer on several processes, ``lohan`` (prepared by ``lohan_compile.hf.prepare``: the bare model
compiled, its gradients averaged over the ranks inside the compiled backward) or ``ddp`` (the
plain Trainer: accelerate wraps the model in DistributedDataParallel); ``-accumulating``: two
micro-batches per step. Each rank writes
``OUT_DIR/rank<N>.json`` (tests/test_distributed.py)."""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

from lohan_compile import hf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from models import tiny_llama  # noqa: E402
from test_hf_trainer import Tokens  # noqa: E402

torch.set_num_threads(1)
case, out_dir = sys.argv[1], sys.argv[2]
args = TrainingArguments(
    output_dir=out_dir, use_cpu=True, report_to=[], per_device_train_batch_size=2, max_steps=4,
    learning_rate=1e-3, weight_decay=0.1, warmup_steps=1, logging_steps=1, save_strategy="steps", save_steps=4,
    dataloader_num_workers=0, seed=0, optim="adamw_torch", max_grad_norm=1.0, disable_tqdm=True,
    ddp_backend="gloo", gradient_accumulation_steps=2 if case.endswith("-accumulating") else 1,
)
torch.manual_seed(0)
trainer = Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(24))
if case.startswith("lohan"):
    hf.prepare(trainer, executor="fx")
trainer.train()
rank, world = dist.get_rank(), dist.get_world_size()
logs = [{k: h[k] for k in ("step", "loss", "grad_norm", "learning_rate")} for h in trainer.state.log_history
        if "loss" in h]
state = trainer.model.state_dict()
norm = torch.stack([v.float().norm() for v in state.values()]).norm()
gathered = [torch.zeros(()) for _ in range(world)]
dist.all_gather(gathered, norm)
# the checkpoint's optimizer state: the whole one (every parameter's), whichever rank saved it
saved = torch.load(os.path.join(out_dir, "checkpoint-4", "optimizer.pt"), weights_only=True)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world": world, "logs": logs, "norms": [float(t) for t in gathered],
               "saved_states": len(saved["state"]), "saved_shard": "lohan_shard" in saved,
               "state": {k: v.float().flatten()[:64].tolist() for k, v in state.items()}}, f)

# What this rank computed is written. A rank was once seen to abort while the interpreter shut
# down ("terminate called without an active exception": a C++ thread still joinable at exit),
# after its work and its file; that is not what these scripts test, and it is not understood
# yet (see the README's "Several GPUs"): leave without running the exit-time destructors.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
