"""The activation planner, side by side with the fixed policies, on the CPU stand-in.

For each model and each budget (a fraction of the model's unplanned peak, measured
in this run), every policy is compiled and trained for a few steps; then the
policies that meet the budget are timed in interleaved rounds (medians), so that
drift on a shared machine hits all of them alike; in each round each policy runs a few
steps in a row, as training does, and the first (whose caches the previous copy
filled: up to 1.7x slower on this machine) is not counted. All copies exist, with their
gradients, before any compiles, and each budget is what the other copies hold plus
the fraction: every policy plans against what it runs beside. Printed and written as JSON:

- per policy: median step time, measured device peak above what the other copies hold
  against its share of the budget, and the
  simulator's predicted step time and peak (fidelity: predicted / measured), and the step
  simulated again with the op times the executor measured in its first steps (calibrated);
- per (model, budget): auto's step time over each fixed policy's, round by round (median,
  a 95% bootstrap interval, and the verdict: faster, slower, or within noise), the best
  fixed policy being the one auto fares worst against; and which plan auto runs (after its
  trial of the plans predicted close to its first choice, run through before the timed rounds).

    python bench/planner.py [--models llama,gpt2,block] [--fractions 0.3,0.5,0.7] [--rounds 21]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import lohan_compile as lohan  # noqa: E402
from lohan_compile import settings  # noqa: E402
from lohan_compile.backend.replan import Replanning  # noqa: E402
from lohan_compile.errors import BudgetError  # noqa: E402
from lohan_compile.runtime import device  # noqa: E402

POLICIES = ("auto", "swap-all", "recompute-all", "torch-min-cut", "keep-all")
# the copies share code objects (Hugging Face's forward wrappers): each has its own cache entry
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
# the steps auto's trial of close plans can take (each compiled, warmed up, then run in turn)
TRIAL_STEPS = Replanning.TRIAL_PLANS * (Replanning.TRIAL_WARMUP + Replanning.TRIAL_STEPS) + 1


def models():
    from models import Block, tiny_gpt2, tiny_llama

    def lm(m, ids):
        return m(input_ids=ids, labels=ids).loss

    def block_loss(m, x):
        return m(x).pow(2).mean()

    g = torch.Generator().manual_seed(0)
    return {
        # shapes where activations dominate the parameters
        "llama": (lambda: tiny_llama(layers=4), lm, torch.randint(0, 128, (8, 256), generator=g)),
        "gpt2": (lambda: tiny_gpt2(layers=4), lm, torch.randint(0, 128, (32, 64), generator=g)),  # 64 positions
        # a stack of blocks: one block alone has nothing to move (its peak is its own backward)
        "block": (lambda: torch.nn.Sequential(*(Block(128, 4) for _ in range(4))), block_loss,
                  torch.randn(16, 256, 128, generator=g)),
    }


class Runner:
    """One copy of a model, compiled under one policy and budget."""

    def __init__(self, make, loss, batch):
        torch.manual_seed(0)
        self.model = make()
        self.loss, self.batch = loss, batch
        self.cm = None

    def compile(self, options):
        self.cm = torch.compile(self.model, backend="lohan", options=options)

    def eager_grads(self):
        """Gradients on every parameter, as a compiled step leaves them."""
        self.loss(self.model, self.batch).backward()

    def step(self) -> float:
        self.model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        self.loss(self.cm, self.batch).backward()
        return time.perf_counter() - start


def measure(name, make, loss, batch, fractions, rounds, warmup=5, steps_per_round=3):
    """Every policy's copy is alive while each one compiles and runs (they are timed
    interleaved), and the budget counts the whole device: so all copies are made, with their
    gradients, before any compiles, and each policy's budget is what the others hold plus the
    fraction of one copy's unplanned peak. Every policy then plans against the same resident
    memory it later runs beside (a copy compiled before the others existed would see them
    appear at run time and re-plan)."""
    torch._dynamo.reset()
    gc.collect()
    before = device.allocated()
    base = Runner(make, loss, batch)
    base.compile(None)
    for _ in range(warmup):
        base.step()
    unplanned = lohan.last_report().summary()["measured_peak_bytes"] - before  # one copy, alone
    own = sum(p.numel() * p.element_size() for p in base.model.parameters())
    del base
    results = []
    for fraction in fractions:
        torch._dynamo.reset()
        gc.collect()
        runners = {p: Runner(make, loss, batch) for p in POLICIES}
        for r in runners.values():
            r.eager_grads()
        gc.collect()
        # the others' weights and gradients: less this copy's weights (counted in its unplanned
        # peak) and its gradients (freed as its step starts; all copies are alike)
        budget_base = device.allocated() - 2 * own
        budget = budget_base + int(unplanned * fraction)
        info = {}
        for policy in POLICIES:
            # no torch._dynamo.reset() here: it would drop the copies compiled before, and each
            # would compile again (a new plan, a new trial) at its first timed round
            r = runners[policy]
            try:
                # activations only (this compares the activation policies): the weights stay resident
                r.compile({"memory_budget": budget, "policy": policy, "offload_params": False})
                for _ in range(warmup + (TRIAL_STEPS if policy == "auto" else 0)):
                    r.step()  # auto: through its trial of close plans too, if it runs one
            except Exception as e:  # noqa: BLE001 - BudgetError arrives wrapped by torch
                inner = BudgetError.within(e)
                if inner is None:
                    raise
                info[policy] = {"feasible": False, "smallest_feasible_bytes": inner.smallest_feasible_bytes}
                del runners[policy]
                continue
            s = lohan.last_report().summary()
            info[policy] = {
                "feasible": True,
                "measured_peak_bytes": s["measured_peak_bytes"],
                "peak_over_budget": s["measured_peak_bytes"] / budget,
                "own_peak_over_own_budget": (s["measured_peak_bytes"] - budget_base) / (budget - budget_base),
                "predicted_peak_bytes": s["predicted_peak_bytes"],
                "predicted_step_s": s["predicted_step_s"],
                # simulated again with the op times the executor measured in its first steps
                "calibrated_step_s": s["calibrated_step_s"],
                "swapped_bytes": s["swapped_bytes"],
                "recomputed_bytes": s["recomputed_bytes"],
                "plans": s["plans"],  # auto: the plan each graph runs, and what its trial measured
                "plan_trials": s["plan_trials"],
            }
        times = {p: [] for p in runners}
        for k in range(rounds if runners else 0):
            # interleaved, and rotated: no copy always runs after the same other copy
            order = list(runners.items())
            order = order[k % len(order):] + order[:k % len(order)]
            for p, r in order:
                try:
                    # a few steps in a row, as training runs: the first after another copy's step
                    # finds the caches full of that copy's tensors, and is not counted
                    steps = [r.step() for _ in range(steps_per_round)]
                    times[p].append(statistics.median(steps[1:]) if len(steps) > 1 else steps[0])
                except Exception as e:  # noqa: BLE001
                    inner = BudgetError.within(e)
                    if inner is None:
                        raise
                    # the other policies' copies, alive beside it, count against its budget too
                    # (the budget is for the whole device): its re-plan found no fit
                    info[p] = {"feasible": False, "smallest_feasible_bytes": inner.smallest_feasible_bytes,
                               "while_timing": True}
                    del runners[p], times[p]
        for p in runners:
            med = statistics.median(times[p])
            info[p]["step_s"] = med
            info[p]["round_s"] = list(times[p])
            info[p]["predicted_over_measured_step"] = info[p]["predicted_step_s"] / med
            cal = info[p].get("calibrated_step_s")
            info[p]["calibrated_over_measured_step"] = cal / med if cal is not None else None
        fixed = [p for p in runners if p != "auto"]
        # rounds are interleaved: auto's time over a fixed policy's within one round cancels the
        # machine's drift (a slow minute hits both). Auto against each fixed policy, round by
        # round; the best fixed policy is the one auto fares worst against
        paired = {p: paired_ratio(times["auto"], times[p]) for p in fixed if "auto" in runners}
        best_fixed = max(paired, key=lambda p: paired[p]["median"]) if paired else None
        row = {
            "model": name, "fraction": fraction, "budget_bytes": budget, "unplanned_peak_bytes": unplanned,
            "others_bytes": budget_base,
            "policies": info, "best_fixed": best_fixed,
            "auto_over_fixed_paired": paired,
            # the ratio of the medians over all rounds (drift can move it: see the paired figure)
            "auto_over_best_fixed": (info["auto"]["step_s"] / info[best_fixed]["step_s"]) if best_fixed else None,
            "auto_over_best_fixed_paired": paired.get(best_fixed),
        }
        results.append(row)
        print_row(row)
    return results


def paired_ratio(a: list[float], b: list[float], resamples: int = 2000) -> dict:
    """``a`` over ``b`` round by round: the median, quartiles, and a 95% bootstrap interval of
    the median (rounds resampled); ``verdict``: "faster" or "slower" where the interval lies
    wholly below or above 1, else "within noise"."""
    import random

    ratios = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    lo, hi = medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]
    verdict = "faster" if hi < 1 else "slower" if lo > 1 else "within noise"
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "ci95": [lo, hi], "verdict": verdict,
            "rounds": len(ratios)}


def print_row(row):
    from tabulate import tabulate

    print(f"\n{row['model']} at {row['fraction']:.0%} of its unplanned peak "
          f"({row['fraction'] * row['unplanned_peak_bytes'] / 2**20:.1f} of {row['unplanned_peak_bytes'] / 2**20:.1f} MiB, "
          f"beside {row['others_bytes'] / 2**20:.1f} MiB the other copies hold)")
    lines = []
    for p in POLICIES:
        i = row["policies"].get(p)
        if i is None:
            continue
        if not i["feasible"]:
            lines.append([p, "BudgetError", "", "", "", "", ""])
            continue
        lines.append([
            p, f"{i['step_s'] * 1e3:.1f}", f"{i['own_peak_over_own_budget']:.3f}",
            f"{i['predicted_step_s'] * 1e3:.1f}", f"{i['predicted_over_measured_step']:.2f}",
            "" if i.get("calibrated_over_measured_step") is None else f"{i['calibrated_over_measured_step']:.2f}",
            f"{i['predicted_peak_bytes'] / i['measured_peak_bytes']:.3f}",
        ])
    print(tabulate(lines, headers=["policy", "step ms (median)", "own peak / own budget", "predicted ms",
                                   "pred / meas step", "calibrated / meas", "pred / meas peak"]))
    for p, paired in row.get("auto_over_fixed_paired", {}).items():
        best = " (best fixed: auto fares worst against it)" if p == row["best_fixed"] else ""
        print(f"auto / {p}, round by round: median {paired['median']:.3f} (95% interval "
              f"{paired['ci95'][0]:.3f}-{paired['ci95'][1]:.3f}, quartiles {paired['q1']:.3f}-{paired['q3']:.3f}): "
              f"auto {paired['verdict']}{best}")
    if row["auto_over_best_fixed"] is not None:
        print(f"auto / best fixed, ratio of medians over all rounds: {row['auto_over_best_fixed']:.3f}")
    a = row["policies"].get("auto") or {}
    if a.get("plans"):
        trials = "; ".join(", ".join(f"{v} {t * 1e3:.1f} ms" for v, t in g.items()) for g in a["plan_trials"] if g)
        print(f"auto runs {', '.join(str(p) for p in a['plans'])}" + (f" (its trial timed {trials})" if trials else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama,gpt2,block")
    ap.add_argument("--fractions", default="0.3,0.5,0.7")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--steps-per-round", type=int, default=3,
                    help="consecutive steps of each policy per round; the first is not counted")
    ap.add_argument("--json", default=None)
    ap.add_argument("--executor", default="fx", choices=["fx", "inductor"],
                    help="lohan's executor (fx: what bench/results/planner-* were taken with; "
                         "inductor compiles 45 plans for tens of seconds each)")
    args = ap.parse_args()
    device.install()  # count every allocation from here on
    lohan.hardware.auto()
    table = models()
    results = []
    with settings.EXECUTOR.override(args.executor):
        for name in args.models.split(","):
            make, loss, batch = table[name]
            results += measure(name, make, loss, batch, [float(f) for f in args.fractions.split(",")], args.rounds,
                               steps_per_round=args.steps_per_round)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
