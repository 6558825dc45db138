"""The plans the backend makes, as text to compare across changes of the code's structure.

For each model of the planner bench (``bench/planner.py``, whose models it uses) and each budget and policy, compiles a
fresh copy with a fixed hardware preset (no measurement: the same estimates every run), runs
one training step (the plans made at compile time, before anything measured can change them)
and prints every graph's plan: its family, predicted peak and step, and each candidate's
decision with its release and prefetch points. Two runs of the same code print the same text;
a restructuring that changes no decision prints the same text too.

    python scripts/plan_fingerprint.py > before.txt   # then, after the change
    python scripts/plan_fingerprint.py | diff before.txt -
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import lohan_compile as lohan  # noqa: E402
from lohan_compile import settings  # noqa: E402
from planner import models  # noqa: E402  (bench/planner.py: the same models and batches)

POLICIES = ("auto", "swap-all", "recompute-all", "torch-min-cut", "keep-all")
FRACTIONS = (0.3, 0.5, 0.7)


def one_step(make, loss, batch, options):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make()
    cm = torch.compile(model, backend="lohan", options=options)
    loss(cm, batch).backward()
    return lohan.last_report()


def describe(report) -> list[str]:
    lines = []
    for g in report.graphs:
        planned = g.pass_report("plan_memory")
        part = g.pass_report("partition_graph") or {}
        if planned is None:
            lines.append(f"  {g.name}: not planned")
            continue
        plan = planned["plan"]
        lines.append(f"  {g.name}: partition {part.get('partitioner', '?').split(' (')[0]}, policy {plan.policy}, "
                     f"family {plan.family}, predicted peak {plan.prediction.peak_device_bytes}, "
                     f"step {plan.prediction.step_seconds * 1e3:.6f} ms")
        for key, d in sorted(plan.decisions.items()):
            lines.append(f"    {key}: {d.action.value} release_at={d.release_at} prefetch_at={d.prefetch_at} "
                         f"early={d.early_release} late={d.late_prefetch}")
    return lines


def main() -> None:
    with settings.EXECUTOR.override("fx"):
        for name, (make, loss, batch) in models().items():
            unplanned = one_step(make, loss, batch, {"hardware": "rtx4090", "offload_params": False})
            peak = unplanned.summary()["predicted_peak_bytes"]
            print(f"{name}: unplanned predicted peak {peak}")
            for fraction in FRACTIONS:
                budget = int(peak * fraction)
                for policy in POLICIES:
                    options = {"memory_budget": budget, "policy": policy, "hardware": "rtx4090",
                               "offload_params": False, "tune_plans": False}
                    try:
                        report = one_step(make, loss, batch, options)
                    except Exception as e:  # noqa: BLE001 - BudgetError arrives wrapped by torch
                        inner = lohan.BudgetError.within(e)
                        if inner is None:
                            raise
                        print(f" {fraction} {policy}: BudgetError, smallest {inner.smallest_feasible_bytes}")
                        continue
                    print(f" {fraction} {policy}:")
                    print("\n".join(describe(report)))


if __name__ == "__main__":
    main()
