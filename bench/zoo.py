"""Model families beyond decoder LLMs: does the budget hold, is the prediction right, is
training exact? (issue 29)

For each family (a residual CNN with batch norm and pooling, ViT, T5, a mixture-of-experts
decoder, BERT's masked LM, and a plain ``torch.nn`` model with a custom autograd function
and in-place ops), built here from configs with small shapes:

- the unplanned peak: the step under ``aot_eager`` (DESIGN.md's profiler method, the
  highest of the steps measured);
- for each budget (a fraction of that peak) and each executor: the measured peak of every
  step (the profiler, highest of all steps, the first included), the prediction of the plan
  that ran last (less what earlier cases of the process left on the device, which the plan
  holds and the profiler does not see), and measured / budget, predicted / measured and
  predicted / the last step's peak (the step that ran that plan: earlier ones may have run
  other plans, or measured segments while compiling); ``BudgetError`` with its smallest
  feasible peak where no plan fits;
- exactness: ``CPUAdamW`` (gradients offloaded to the host tier) through lohan against
  eager ``torch.optim.AdamW`` from the same weights and batches, the largest parameter
  difference after the steps.

    python bench/zoo.py [--families cnn,vit,t5,moe,bert,custom,issue-cnn] [--fractions 0.8,0.95]
        [--executors fx,inductor] [--steps 4] [--out bench/results/zoo.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import lohan_compile as lohan
from lohan_compile.errors import BudgetError
from lohan_compile.measure import measure_device_peak

torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # (no bias before a batch norm, as in ResNets: its gradient is rounding noise, which
        # Adam turns into full-size steps of either sign, so it compares nothing)
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(F.relu(x + self.block(x)))


class IssueCNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


class ScaledSiLU(torch.autograd.Function):
    """x * sigmoid(x) * scale with a hand-written backward (saves only its input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.scale = scale
        return x * torch.sigmoid(x) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * ctx.scale * s * (1 + x * (1 - s)), None


class CustomNet(nn.Module):
    """Not from Hugging Face: a custom autograd function and in-place ops."""

    def __init__(self, width: int = 256, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            y = ScaledSiLU.apply(layer(h), 1.5)
            y.mul_(0.5).add_(h)  # in place
            h = self.norm(y)
        return self.out(torch.relu_(h))


def families() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], Callable[[nn.Module, Any], torch.Tensor]]]:
    """name -> (build the model, make the batch, the loss of a (compiled) model on a batch)."""
    from transformers import (BertConfig, BertForMaskedLM, MixtralConfig, MixtralForCausalLM, T5Config,
                              T5ForConditionalGeneration, ViTConfig, ViTForImageClassification)

    g = torch.Generator().manual_seed(0)

    def images():
        return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)

    def tokens(batch=4, seq=64):
        return torch.randint(0, 256, (batch, seq), generator=g)

    def vit():
        return ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=128, num_labels=10))

    def t5():
        return T5ForConditionalGeneration(T5Config(vocab_size=256, d_model=64, d_ff=128, d_kv=16, num_layers=2,
                                                   num_heads=4, decoder_start_token_id=0))

    def moe():
        return MixtralForCausalLM(MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                num_local_experts=4, num_experts_per_tok=2,
                                                max_position_embeddings=128))

    def bert():
        return BertForMaskedLM(BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=128))

    def ce(m, batch):
        x, y = batch
        return F.cross_entropy(m(x), y)

    def mlm_batch():
        ids = tokens()
        labels = torch.full_like(ids, -100)
        labels[:, ::7] = ids[:, ::7]
        return ids, labels

    return {
        "cnn": (ResidualCNN, images, ce),
        # the CNN of issue 29, as it reported it (batch 16 x 3 x 64 x 64)
        "issue-cnn": (IssueCNN, lambda: (torch.randn(16, 3, 64, 64, generator=g),
                                         torch.randint(0, 10, (16,), generator=g)), ce),
        "vit": (vit, images, lambda m, b: m(pixel_values=b[0], labels=b[1]).loss),
        "t5": (t5, lambda: (tokens(), tokens(seq=32)), lambda m, b: m(input_ids=b[0], labels=b[1]).loss),
        "moe": (moe, tokens, lambda m, ids: m(input_ids=ids, labels=ids).loss),
        "bert": (bert, mlm_batch, lambda m, b: m(input_ids=b[0], labels=b[1]).loss),
        "custom": (CustomNet, lambda: (torch.randn(1024, 64, generator=g), torch.randint(0, 10, (1024,), generator=g)),
                   ce),
    }


def peaks(build, batch, loss, backend: str, options: dict | None, steps: int):
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        model = build().train()
        kwargs = {"options": options} if options is not None else {}
        # the batch too is made under the profiler: the plan counts it, so the measurement must
        mine = tuple(t.clone() for t in batch) if isinstance(batch, tuple) else batch.clone()
        return model, torch.compile(model, backend=backend, **kwargs), mine

    def step(state):
        model, compiled, mine = state
        model.zero_grad(set_to_none=True)
        loss(compiled, mine).backward()

    m = measure_device_peak(make, step, steps=steps)
    return list(m.step_peaks), (lohan.last_report() if backend == "lohan" else None)


def exactness(build, batch, loss, executor: str, steps: int) -> float:
    """Largest parameter difference after ``steps`` of CPUAdamW through lohan vs eager AdamW."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = build().train()
    torch.manual_seed(0)
    mine = build().train()
    mine.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = lohan.CPUAdamW(mine.parameters(), lr=1e-3)
    compiled = torch.compile(mine, backend="lohan", options={"optimizer": opt, "executor": executor})
    for _ in range(steps):
        torch.manual_seed(1)
        loss(ref, batch).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        torch.manual_seed(1)
        loss(compiled, batch).backward()
        opt.step()
        opt.zero_grad()
    with lohan.materialized(mine):
        return max((a.detach() - b.detach()).abs().max().item()
                   for a, b in zip(ref.parameters(), mine.parameters()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="cnn,vit,t5,moe,bert,custom")
    ap.add_argument("--fractions", default="0.8,0.95")
    ap.add_argument("--executors", default="fx,inductor")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="bench/results/zoo.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = families()
    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{'family':8} {'executor':9} {'unplanned':>10} {'budget':>8} {'measured':>9} {'predicted':>10} "
          f"{'meas/bud':>8} {'pred/meas':>9} {'pred/last':>9}")
    for name in args.families.split(","):
        build, make_batch, loss = table[name]
        batch = make_batch()
        unplanned = max(peaks(build, batch, loss, "aot_eager", None, args.steps)[0])
        for executor in args.executors.split(","):
            row_x = {"family": name, "executor": executor, "unplanned_bytes": unplanned}
            try:
                row_x["max_param_diff"] = exactness(build, batch, loss, executor, 3)
            except Exception as e:  # noqa: BLE001 - a bench reports what failed and goes on
                row_x["exactness_error"] = f"{type(e).__name__}: {e}"[:300]
            for frac in (float(f) for f in args.fractions.split(",")):
                budget = int(unplanned * frac)
                row = dict(row_x, fraction=frac, budget_bytes=budget)
                start = time.perf_counter()
                try:
                    measured, report = peaks(build, batch, loss, "lohan",
                                             {"memory_budget": budget, "executor": executor}, args.steps)
                    # the plan also holds what earlier cases of this process left on the device,
                    # which the profiler (started with this case) does not see: not compared
                    left = report.graphs[0].resident_outside_bytes or 0
                    row.update(measured_bytes=max(measured), step_peaks=measured,
                               predicted_bytes=report.summary()["predicted_peak_bytes"] - left,
                               left_by_earlier_cases_bytes=left)
                except Exception as e:  # noqa: BLE001
                    err = e.__cause__ if isinstance(e.__cause__, BudgetError) else e
                    row["error"] = f"{type(err).__name__}: {err}"[:400]
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                mib = 2**20
                if "measured_bytes" in row:
                    print(f"{name:8} {executor:9} {unplanned / mib:9.2f}M {budget / mib:7.2f}M "
                          f"{row['measured_bytes'] / mib:8.2f}M {row['predicted_bytes'] / mib:9.2f}M "
                          f"{row['measured_bytes'] / budget:8.3f} {row['predicted_bytes'] / row['measured_bytes']:9.3f}"
                          f" {row['predicted_bytes'] / measured[-1]:9.3f}"
                          f"  diff {row.get('max_param_diff', row.get('exactness_error'))}", flush=True)
                else:
                    print(f"{name:8} {executor:9} {unplanned / mib:9.2f}M {budget / mib:7.2f}M  {row['error'][:160]}",
                          flush=True)
    out = {"commit": commit, "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
