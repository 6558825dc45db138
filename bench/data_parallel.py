"""Data parallel training on this machine's CPU (gloo): what a rank computes, holds and sends.

Runs ``tests/ranks/train_dp.py`` under ``torchrun`` for each world size and case (a Hugging Face
LLaMA-style model from a config, 4 steps with clipping, each rank on its slice of the global
batch) and records, per rank, the distance to one eager process with ``AdamW`` and
``clip_grad_norm_`` on the global batch, the optimizer state the rank's ``CPUAdamW`` holds
against one process's, and the bytes its collectives carried in a step (counted by the
profiler where they ran) against the plan. ``ddp`` is the same model wrapped in
``DistributedDataParallel`` with a torch AdamW, for comparison.

    python bench/data_parallel.py [--worlds 2,4] [--cases cpuadamw,swap,ddp]

Writes ``bench/results/data_parallel.json`` with the commit and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "ranks" / "train_dp.py"


def run(case: str, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(world), str(SCRIPT), case, out], capture_output=True, text=True, env=env,
                              timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"{case} at {world} ranks failed:\n{done.stderr[-3000:]}")
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def row(case: str, world: int, ranks: list[dict]) -> dict:
    held = [r["state_bytes"] for r in ranks]
    return {
        "case": case,
        "world": world,
        "max_loss_difference": max(abs(a - b) for r in ranks for a, b in zip(r["losses"], r["reference_losses"])),
        "max_relative_error": max(r["model_relative_error"] for r in ranks),
        "max_element_error": max(max(r["max_abs_error"].values()) for r in ranks),
        "learning_rate": ranks[0]["lr"],
        "state_bytes_per_rank": held,
        "state_fraction_per_rank": None if held[0] is None else [h / ranks[0]["whole_state_bytes"] for h in held],
        "one_process_state_bytes": ranks[0]["whole_state_bytes"],
        "reduced_bytes_planned": ranks[0]["summaries"][-1]["reduced_bytes"],
        "reduced_bytes_measured": [r["measured_reduced_bytes"] for r in ranks],
        "broadcast_bytes_measured": [r["measured_broadcast_bytes"] for r in ranks],
        "collectives_per_step": max((g or {}).get("collectives", 0) for r in ranks for g in r["reduce_grads"]),
        "measured_peak_within_budget": all(s["budget_bytes"] is None or s["measured_peak_bytes"] <= s["budget_bytes"]
                                           for r in ranks for s in r["summaries"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--cases", default="cpuadamw,swap,ddp")
    args = parser.parse_args()
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        for case in args.cases.split(","):
            rows.append(row(case, world, run(case, world)))
            print(json.dumps(rows[-1]))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {"commit": commit, "command": "python bench/data_parallel.py " + " ".join(sys.argv[1:]), "rows": rows}
    path = ROOT / "bench" / "results" / "data_parallel.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
