"""Data-parallel scaling, simulated: 13B and 70B on 1, 2 and 4 RTX 4090s of one LoHan-like server.

Each model is planned by ``lohan_compile.wholestep`` on the ``lohan-testbed`` preset
(RTX 4090s on PCIe 4.0 x16 each, two Xeon Gold 5320, 256 GB of host memory, 12 NVMe
SSDs) with ``gpus`` = 1, 2 and 4: every GPU runs the step on its own micro-batch of
``--batches`` sequences (the global batch is gpus x batch), the ranks share the
server's host memory, CPU and SSDs (each rank's share: ``wholestep.per_rank``), each
updates 1/gpus of the optimizer state, and each gradient is all-reduced through host
memory over the GPU's PCIe link (the 4090 has no NVLink). Throughput is model TFLOPS
of the whole server: 6 x parameters x global tokens / predicted step time,
recomputation not counted; "scaling" is TFLOPS at N GPUs over N x TFLOPS at one.

LoHan's paper reports 514 TFLOPS for 13B on 4 GPUs at a global batch of 256 (64 per GPU),
printed beside the plan of the same setting.

    python bench/plan_gpus.py [--models gpt3-13b,llama2-70b] [--batches 16,64] [--gpus 1,2,4]
                              [--json bench/results/plan_gpus.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

from lohan_compile import wholestep, zoo
from lohan_compile.hardware import preset

GiB = 2**30
PUBLISHED_LOHAN_13B_4GPU = {"model": "gpt3-13b", "gpus": 4, "global_batch": 256, "tflops": 514.0,
                            "source": "LoHan (arXiv 2403.06504), multi-GPU evaluation"}


def sweep(models: list[str], batches: list[int], gpus: list[int], seq: int) -> list[dict]:
    hw = preset("lohan-testbed")
    rows = []
    for model in models:
        for batch in batches:
            traced = wholestep.trace(zoo.PRESETS[model], batch, seq, hw)
            for n in gpus:
                start = time.perf_counter()
                plan = wholestep.WholeStep(traced, hw, gpus=n).plan("auto")
                row = {"model": model, "params": zoo.PRESETS[model].parameters(), "gpus": n, "batch": batch,
                       "global_batch": batch * n, "seq": seq, "planning_s": time.perf_counter() - start,
                       **plan.to_json()}
                row.pop("actions")
                rows.append(row)
                print(f"{model} batch {batch} x {n} GPUs: "
                      + (f"{plan.tflops:.1f} TFLOPS" if plan.feasible else f"infeasible ({plan.why})")
                      + f"  ({row['planning_s']:.0f} s)", flush=True)
    for row in rows:
        one = next((r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"] and r["gpus"] == 1
                    and r["feasible"]), None)
        row["scaling"] = (row["tflops"] / (row["gpus"] * one["tflops"])
                          if one is not None and row["feasible"] else None)
    return rows


def show(rows: list[dict]) -> None:
    lines = []
    for r in rows:
        peaks = r["peaks"]
        lines.append([r["model"], r["batch"], r["gpus"], r["global_batch"],
                      f"{r['tflops']:.1f}" if r["feasible"] else "infeasible",
                      f"{r['tflops'] / r['gpus']:.1f}" if r["feasible"] else "",
                      f"{r['scaling']:.2f}" if r["scaling"] is not None else "",
                      f"{r['step_s']:.2f}" if r["step_s"] else "",
                      f"{peaks.get('host', 0) / GiB:.0f}", f"{peaks.get('ssd', 0) / GiB:.0f}", r["why"][:70]])
    print("\npredicted on lohan-testbed (simulated), seq", rows[0]["seq"] if rows else "")
    print(tabulate(lines, headers=["model", "batch/GPU", "GPUs", "global", "TFLOPS", "per GPU", "scaling", "step s",
                                   "host GiB/rank", "SSD GiB/rank", "why / bottleneck"]))
    pub = PUBLISHED_LOHAN_13B_4GPU
    same = [r for r in rows if r["model"] == pub["model"] and r["gpus"] == pub["gpus"]
            and r["global_batch"] == pub["global_batch"] and r["feasible"]]
    if same:
        print(f"\n{pub['model']} on {pub['gpus']} GPUs, global batch {pub['global_batch']}: planned "
              f"{same[0]['tflops']:.0f} TFLOPS, LoHan reports {pub['tflops']:.0f} ({pub['source']})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt3-13b,llama2-70b")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--gpus", default="1,2,4")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = sweep(args.models.split(","), [int(b) for b in args.batches.split(",")],
                 [int(g) for g in args.gpus.split(",")], args.seq)
    show(rows)
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        out = {"commit": commit, "command": " ".join(["python"] + sys.argv),
               "hardware": preset("lohan-testbed").to_json(), "published": PUBLISHED_LOHAN_13B_4GPU, "results": rows}
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
