"""Planning time against graph size: a LLaMA of 4 to 96 layers, planned on the meta device.

For each depth, ``lohan.explain`` traces one training step on ``meta`` (no memory, no
compute) and plans it under a budget of half its keep-all predicted peak with the ``auto``
policy. Reported per depth: joint-graph nodes, saved-activation candidates, seconds in the
``plan_memory`` pass (building the problem, the solver, the simulator; near zero where
``partition_graph`` already made auto's plan to choose the partition, which plan_memory then
takes), seconds in all passes, and the growth exponent of all passes between successive depths
(log time / log ops: 1 is linear).

    python bench/plan_scaling.py [--layers 4,8,16,32,64,96] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

import lohan_compile as lohan


def model(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def plan_once(layers: int, batch: int, seq: int) -> dict:
    m = model(layers)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    kwargs = {"input_ids": ids, "labels": ids}
    keep = lohan.explain(m, example_kwargs=kwargs, policy="keep-all", hardware="rtx4090")
    budget = int(0.5 * keep.summary()["predicted_peak_bytes"])
    start = time.perf_counter()
    report = lohan.explain(m, example_kwargs=kwargs, policy="auto", memory_budget=budget, hardware="rtx4090")
    total = time.perf_counter() - start
    g = report.graphs[0]
    passes = {p.name: p.seconds for p in g.passes}
    plan = g.pass_report("plan_memory")
    problem = plan.get("problem") if plan else None
    return {
        "layers": layers,
        "joint_nodes": sum(1 for _ in g.joint_nodes) if hasattr(g, "joint_nodes") else None,
        "candidates": len(problem.candidates) if problem is not None else None,
        "ops": len(problem.ops) if problem is not None else None,
        "plan_memory_s": passes.get("plan_memory"),
        "passes_s": sum(passes.values()),
        "explain_s": total,
        "predicted_peak_over_budget": report.summary()["predicted_peak_bytes"] / budget,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="4,8,16,32,64,96")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from tabulate import tabulate

    rows = []
    for n in [int(x) for x in args.layers.split(",")]:
        torch._dynamo.reset()
        r = plan_once(n, args.batch, args.seq)
        if rows and rows[-1]["ops"] and r["ops"]:
            r["exponent"] = math.log(r["passes_s"] / rows[-1]["passes_s"]) / math.log(r["ops"] / rows[-1]["ops"])
        rows.append(r)
        print(f"  {n} layers: {r['ops']} ops, plan_memory {r['plan_memory_s']:.2f} s, all passes {r['passes_s']:.2f} s",
              flush=True)
    print(tabulate([[r["layers"], r["ops"], r["candidates"], f"{r['plan_memory_s']:.3f}", f"{r['passes_s']:.3f}",
                     f"{r['explain_s']:.1f}", f"{r['passes_s'] / r['ops'] * 1e3:.2f}",
                     f"{r['exponent']:.2f}" if "exponent" in r else ""] for r in rows],
                   headers=["layers", "ops", "candidates", "plan_memory s", "all passes s", "explain s",
                            "passes ms / op", "exponent vs previous"]))
    first, last = rows[0], rows[-1]
    overall = math.log(last["passes_s"] / first["passes_s"]) / math.log(last["ops"] / first["ops"])
    print(f"\nplanning time grows as ops^{overall:.2f} from {first['layers']} to {last['layers']} layers (1.0: linear)")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        Path(args.json).write_text(json.dumps({"commit": commit,
                                               "command": " ".join(["plan_scaling.py", *(argv or sys.argv[1:])]),
                                               "rows": rows, "overall_exponent": overall}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
