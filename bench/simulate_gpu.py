"""The planner on a GPU preset, simulated: GPT-3 shapes on the RTX 4090 (24 GiB, PCIe 4.0).

Each GPT-3 shape (published: layers, hidden size, heads; sequence 2048) is built
on the meta device as a Hugging Face GPT-2-architecture model in bfloat16 (the
GPT-3 architecture), traced and planned once with ``lohan.explain`` on the
preset, with gradients offloaded to ``CPUAdamW`` (as training would run it; the
optimizer's own time on the CPU is not in these figures). The traced problem is
then solved for every fixed policy at the same budget; ``auto`` (which also
weighs torch's min-cut partition) and ``torch-min-cut`` are traced again under
the budget. Printed and written as JSON: predicted step
time, TFLOPS (6 x parameters x tokens per step, recomputation not counted),
device peak, and auto against the best fixed policy.

The budget is the card's memory less 1 GiB for the CUDA context and kernel
workspaces; the weights live on the device (they must fit beside the
activations: 13B needs parameter streaming, which comes later).

    python bench/simulate_gpu.py [--models gpt3-1.3b,gpt3-2.7b,gpt3-6.7b] [--batches 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import lohan_compile as lohan
from lohan_compile.errors import BudgetError
from lohan_compile.plan.policies import solve

GiB = 2**30
SHAPES = {  # GPT-3 paper, table 2.1: layers, d_model, heads
    "gpt3-1.3b": (24, 2048, 16),
    "gpt3-2.7b": (32, 2560, 32),
    "gpt3-6.7b": (32, 4096, 32),
    "gpt3-13b": (40, 5120, 40),
}
POLICIES = ("swap-all", "recompute-all", "keep-all")  # solved on the default partition


def build(name: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, hidden, heads = SHAPES[name]
    cfg = GPT2Config(vocab_size=50257, n_positions=2048, n_embd=hidden, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg).to(torch.bfloat16)
    return model


def run(name: str, batch: int, seq: int, budget: int) -> dict:
    model = build(name)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.zeros(batch, seq, dtype=torch.long)
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-4, max_grad_norm=1.0)
    kwargs = {"input_ids": ids}

    def lm_loss(out):  # HF GPT-2's own loss reads .item() on meta: compute it here
        return torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), ids.to("meta").flatten())

    start = time.perf_counter()
    report = lohan.explain(model, example_kwargs=kwargs, loss_fn=lm_loss, hardware="rtx4090", policy="keep-all",
                           optimizer=opt)
    trace_s = time.perf_counter() - start
    rows = {}
    graphs = [g for g in report.graphs if g.pass_report("plan_memory")]
    tokens = batch * seq
    rows["auto"] = {}
    for policy in POLICIES:
        total_s, peak, feasible, smallest = 0.0, 0, True, None
        for g in graphs:
            planned = g.pass_report("plan_memory")
            try:
                plan = solve(policy, planned["problem"], planned["rates"], budget)
            except BudgetError as e:
                feasible, smallest = False, e.smallest_feasible_bytes
                break
            total_s += plan.prediction.step_seconds
            peak = max(peak, plan.prediction.peak_device_bytes)
        rows[policy] = ({"feasible": True, "step_s": total_s, "peak_bytes": peak,
                         "tflops": 6 * n_params * tokens / total_s / 1e12}
                        if feasible else {"feasible": False, "smallest_feasible_bytes": smallest})
    # auto and torch-min-cut choose the partition itself: traced again under the budget
    for policy in ("auto", "torch-min-cut"):
        torch._dynamo.reset()
        try:
            r = lohan.explain(model, example_kwargs=kwargs, loss_fn=lm_loss, hardware="rtx4090",
                              policy=policy, memory_budget=budget, optimizer=opt)
            s = r.summary()
            rows[policy] = {"feasible": True, "step_s": s["predicted_step_s"], "peak_bytes": s["predicted_peak_bytes"],
                            "tflops": 6 * n_params * tokens / s["predicted_step_s"] / 1e12,
                            "partitioner": r.graphs[0].pass_report("partition_graph")["partitioner"]}
        except Exception as e:  # noqa: BLE001 - torch wraps the BudgetError
            err = BudgetError.within(e)
            if err is None:  # a compiler failure: recorded, so the table shows it
                rows[policy] = {"feasible": None, "error": str(e).splitlines()[1][:300]}
                print(f"{policy}: {rows[policy]['error']}")
                continue
            rows[policy] = {"feasible": False, "smallest_feasible_bytes": err.smallest_feasible_bytes}
    fixed = [p for p, r in rows.items() if p != "auto" and r.get("feasible")]
    best = min(fixed, key=lambda p: rows[p]["step_s"]) if fixed else None
    return {"model": name, "params": n_params, "batch": batch, "seq": seq, "budget_bytes": budget,
            "weights_bytes": 2 * n_params, "trace_s": trace_s, "graphs": len(graphs), "policies": rows,
            "best_fixed": best,
            "auto_over_best_fixed_step": rows["auto"]["step_s"] / rows[best]["step_s"]
            if best and rows["auto"].get("feasible") else None}


def show(row: dict) -> None:
    from tabulate import tabulate

    print(f"\n{row['model']} ({row['params'] / 1e9:.2f}B parameters, weights {row['weights_bytes'] / GiB:.1f} GiB), "
          f"batch {row['batch']} x {row['seq']}, budget {row['budget_bytes'] / GiB:.1f} GiB, "
          f"traced in {row['trace_s']:.0f} s")
    lines = []
    for p, r in row["policies"].items():
        if r.get("feasible") is None:
            lines.append([p, "compiler error", "", ""])
        elif r["feasible"]:
            lines.append([p, f"{r['step_s'] * 1e3:.1f}", f"{r['tflops']:.1f}", f"{r['peak_bytes'] / GiB:.2f}"])
        else:
            s = r["smallest_feasible_bytes"]
            lines.append([p, "BudgetError", "", f"needs {s / GiB:.2f}" if s else ""])
    print(tabulate(lines, headers=["policy", "predicted step ms", "TFLOPS", "device peak GiB"]))
    if row["auto_over_best_fixed_step"] is not None:
        print(f"auto step / best fixed ({row['best_fixed']}): {row['auto_over_best_fixed_step']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt3-1.3b,gpt3-2.7b,gpt3-6.7b")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    budget = lohan.hardware.preset("rtx4090").device_memory - 1 * GiB
    results = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = run(name, batch, args.seq, budget)
            show(row)
            results.append(row)
            torch._dynamo.reset()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
