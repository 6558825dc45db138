"""LoHan's setting, simulated: 13B, 70B and 175B fine-tuned on one RTX 4090 with 256 GB and 12 SSDs.

Every model is planned by ``lohan_compile.wholestep`` (one block traced on the
meta device, repeated) on the ``lohan-testbed`` preset (RTX 4090 on PCIe 4.0
x16, two Xeon Gold 5320 with DDR4-3200 x 16 channels, 256 GB of host memory,
12 NVMe SSDs), at sequence 1024, for each batch size; lohan's ``auto`` against
the ``zero-infinity`` and ``zero-offload`` baselines (modeled from what
DeepSpeed does: see lohan_compile/wholestep/), and for 13B also against lohan's fixed
policies. Throughput is model TFLOPS: 6 x parameters x tokens / predicted step
time, recomputation not counted.

Also printed: how the 13B ratio of auto to zero-infinity depends on the GPU's
achievable matmul throughput, the one rate both sides share (the preset
assumes 60% of the datasheet's 165 TFLOPS).

    python bench/paper.py [--models gpt3-13b,llama2-70b,gpt3-175b] [--batches 8,16,32,48,64]
                          [--json bench/results/paper.json] [--png bench/results/paper.png]
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
PUBLISHED_ZERO_INFINITY_13B_TFLOPS = 45.0  # Fuyou (arXiv 2403.06504 v1), abstract


def row(plan: wholestep.StepPlan) -> dict:
    out = plan.to_json()
    out.pop("actions")
    return out


def sweep(model: str, batches: list[int], hw, seq: int, fixed: bool) -> list[dict]:
    results = []
    for batch in batches:
        start = time.perf_counter()
        traced = wholestep.trace(zoo.PRESETS[model], batch, seq, hw)
        step = wholestep.WholeStep(traced, hw)
        policies = ["auto", "zero-infinity", "zero-offload"] + (["keep-all", "swap-all", "recompute-all"] if fixed else [])
        plans = {p: step.plan(p) for p in policies}
        if fixed:
            plans["checkpoint"] = step.checkpointed()
        r = {"model": model, "params": zoo.PRESETS[model].parameters(), "batch": batch, "seq": seq,
             "planning_s": time.perf_counter() - start, "policies": {p: row(q) for p, q in plans.items()}}
        a, z = plans["auto"], plans["zero-infinity"]
        r["auto_over_zero_infinity"] = a.tflops / z.tflops if a.feasible and z.feasible else None
        results.append(r)
        cells = [f"{q.tflops:.1f}" if q.feasible else "infeasible" for q in plans.values()]
        print(f"{model} batch {batch}: " + ", ".join(f"{p} {c}" for p, c in zip(plans, cells))
              + f"  ({r['planning_s']:.0f} s)", flush=True)
    return results


def sensitivity(hw, seq: int) -> list[dict]:
    out = []
    for eff in (0.60, 0.75, 0.90):
        h = hw.with_(matmul_flops=eff * 165.2e12)
        step = wholestep.WholeStep(wholestep.trace(zoo.PRESETS["gpt3-13b"], 32, seq, h), h)
        a, z = step.plan("auto"), step.plan("zero-infinity")
        out.append({"matmul_efficiency": eff, "auto_tflops": a.tflops, "zero_infinity_tflops": z.tflops,
                    "ratio": a.tflops / z.tflops})
    return out


def show(results: list[dict], sens: list[dict]) -> None:
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        policies = list(rows[0]["policies"])
        lines = []
        for r in rows:
            cells = []
            for p in policies:
                q = r["policies"][p]
                cells.append(f"{q['tflops']:.1f}" if q["feasible"] else "—")
            ratio = r["auto_over_zero_infinity"]
            peak = r["policies"]["auto"]["peaks"]
            lines.append([r["batch"], *cells, f"{ratio:.2f}" if ratio else "",
                          f"{peak.get('device', 0) / GiB:.1f}", f"{peak.get('host', 0) / GiB:.0f}",
                          f"{peak.get('ssd', 0) / GiB:.0f}", r["policies"]["auto"]["why"][:60]])
        print(f"\n{model} ({rows[0]['params'] / 1e9:.1f}B), predicted TFLOPS on lohan-testbed, seq {rows[0]['seq']}")
        print(tabulate(lines, headers=["batch", *policies, "auto/zero-inf", "auto dev GiB", "host GiB", "SSD GiB",
                                       "auto: why / bottleneck"]))
    if sens:
        print("\n13B, batch 32: auto against zero-infinity as the GPU's achievable matmul rate changes")
        print(tabulate([[f"{s['matmul_efficiency']:.0%}", f"{s['auto_tflops']:.1f}", f"{s['zero_infinity_tflops']:.1f}",
                         f"{s['ratio']:.2f}"] for s in sens],
                       headers=["matmul / 165 TFLOPS", "auto", "zero-infinity", "ratio"]))
    z13 = [r for r in results if r["model"] == "gpt3-13b"]
    if z13:
        print("\nzero-infinity on 13B against the published 45 TFLOPS: " + ", ".join(
            f"batch {r['batch']} {r['policies']['zero-infinity']['tflops'] / PUBLISHED_ZERO_INFINITY_13B_TFLOPS - 1:+.0%}"
            for r in z13 if r["policies"]["zero-infinity"]["feasible"]))


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lohan_compile[plot]'): no PNG")
        return
    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model]
        for p, style in (("auto", "o-"), ("zero-infinity", "s--"), ("zero-offload", "^:")):
            pts = [(r["batch"], r["policies"][p]["tflops"]) for r in rows if r["policies"][p]["feasible"]]
            if pts:
                ax.plot(*zip(*pts), style, label="lohan auto" if p == "auto" else p)
        ax.set_title(f"{model} on lohan-testbed (simulated)")
        ax.set_xlabel("batch (x 1024 tokens)")
        ax.set_ylabel("TFLOPS (6·P·tokens / step)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt3-13b,llama2-70b,gpt3-175b")
    ap.add_argument("--batches", default="8,16,32,48,64")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--no-sensitivity", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()
    hw = preset("lohan-testbed")
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    for model in args.models.split(","):
        results += sweep(model, batches, hw, args.seq, fixed=model == "gpt3-13b")
    sens = [] if args.no_sensitivity else sensitivity(hw, args.seq)
    show(results, sens)
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        Path(args.json).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "commit": commit,
                                               "hardware": hw.to_json(), "results": results, "sensitivity": sens},
                                              indent=2, default=str))
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
