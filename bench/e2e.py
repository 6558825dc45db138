"""lohan end to end against torch's own ways to train, side by side in one run (CPU stand-in or GPU).

One small Hugging Face LLaMA (``tests/models.py``'s config), one batch, a training step
(forward and backward, gradients set to None before each) under:

- ``eager``: no compiler;
- ``torch.compile``: torch's default (Inductor, min-cut partitioner);
- ``torch checkpointing``: the same with the model's gradient checkpointing on (each
  decoder layer recomputed in backward);
- ``torch memory budget``: torch.compile with ``activation_memory_budget`` (``--torch-budget``);
- ``lohan``: ``backend="lohan"`` with nothing to move (no budget), through its whole
  pipeline and the Inductor executor;
- ``lohan budget``: lohan under a budget that makes it swap (``--budget``, a fraction of
  the peak of ``lohan``), its step time beside the simulator's prediction (from the cost
  model's estimates, and calibrated: simulated again with the compute times the executor
  measured in the first steps);
- ``lohan lowest``: lohan at the smallest budget its planner names (the ``BudgetError`` of a
  1 MiB budget; where the plan made then names a larger one, that one).

The lowest reachable peak of each system, with its step time: eager; torch checkpointing;
torch's min-cut at ``--torch-budget`` (0.1 by default); lohan lowest.

Compile time is the first step's (each variant compiles in a fresh, empty Inductor cache, so
none reuses another's kernels). Step times are medians of interleaved rounds, so drift on a
shared machine hits every variant alike. Device peak is each variant's own: the highest
device bytes during a step, less what the other variants hold, plus its own parameters
(the counting allocator, ``lohan_compile/runtime/device.py``, on the CPU stand-in;
``torch.cuda.max_memory_allocated`` on a GPU).

On a GPU (``--device cuda``, the default when there is one) step times are taken after
``torch.cuda.synchronize()``, and ``--hidden`` makes the model wide enough for the GPU to
have work (the tests' config is 64 wide: a GPU would time kernel launches).

    python bench/e2e.py [--layers 3 --batch 4 --seq 96] [--rounds 7] [--json out.json] [--png out.png]
    python bench/e2e.py --device cuda --hidden 1024 --layers 4 --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import lohan_compile as lohan  # noqa: E402
from lohan_compile.runtime import device  # noqa: E402


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def own_bytes(model: torch.nn.Module) -> int:
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Variant:
    """One way to run the training step: a model copy, how it is compiled, its measurements."""

    def __init__(self, name: str, make: Callable[[], torch.nn.Module], batch: torch.Tensor,
                 compile_fn: Callable[[torch.nn.Module], Any], compile_ctx: Callable[[], Any] = nullcontext,
                 lohan_report: bool = False):
        self.name = name
        self.batch = batch
        torch.manual_seed(0)
        self.model = make().to(DEVICE)
        self.fn = compile_fn(self.model)
        self.compile_ctx = compile_ctx
        self.lohan_report = lohan_report
        self.times: list[float] = []
        self.compile_s: float | None = None
        self.peak: int | None = None
        self.report: dict | None = None
        self.loss: float | None = None
        self.failed: str | None = None
        self.failed_bytes: int | None = None  # the smallest budget a BudgetError named

    def guarded(self, fn: Callable[[], Any]) -> None:
        """Run ``fn``; a BudgetError (a run-time re-plan that found no fit: every variant's
        model is alive beside this one, and the budget is for the whole device) stops this
        variant instead of the bench."""
        try:
            fn()
        except Exception as e:
            inner = lohan.BudgetError.within(e)
            if inner is None:
                raise
            self.failed = str(inner)
            self.failed_bytes = inner.smallest_feasible_bytes

    def step(self) -> float:
        self.model.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        loss = lm_loss(self.fn, self.batch)
        loss.backward()
        sync()
        elapsed = time.perf_counter() - start
        self.loss = float(loss.detach())
        if self.lohan_report:
            self.report = lohan.last_report().summary()
        return elapsed

    def first_step(self, cache_root: str) -> None:
        from torch._inductor.utils import fresh_cache

        with fresh_cache(dir=cache_root, delete=False), self.compile_ctx():
            self.compile_s = self.step()

    def measure_peak(self) -> int:
        self.model.zero_grad(set_to_none=True)
        gc.collect()
        start = device.allocated(DEVICE)
        device.reset_peak(DEVICE)
        self.step()
        self.peak = device.peak(DEVICE) - start + own_bytes(self.model)
        return self.peak


def build(args, cache_root: str) -> list[Variant]:
    from models import tiny_llama

    def make():
        if args.hidden is None:
            return tiny_llama(layers=args.layers)
        from transformers import LlamaConfig, LlamaForCausalLM

        h = args.hidden
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=args.vocab, hidden_size=h, intermediate_size=h * 11 // 4 // 64 * 64,
            num_hidden_layers=args.layers, num_attention_heads=max(1, h // 64),
            num_key_value_heads=max(1, h // 64), max_position_embeddings=max(64, args.seq)))

    g = torch.Generator().manual_seed(0)
    vocab = 128 if args.hidden is None else args.vocab
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(DEVICE)

    def checkpointed():
        m = make()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m

    def torch_budget():
        return torch._functorch.config.patch(activation_memory_budget=args.torch_budget)

    variants = [
        Variant("eager", make, batch, lambda m: m),
        Variant("torch.compile", make, batch, lambda m: torch.compile(m)),
        Variant("torch checkpointing", checkpointed, batch, lambda m: torch.compile(m)),
        Variant(f"torch memory budget {args.torch_budget:g}", make, batch, lambda m: torch.compile(m),
                compile_ctx=torch_budget),
        Variant("lohan", make, batch,
                lambda m: torch.compile(m, backend="lohan", options={"executor": "inductor"}), lohan_report=True),
    ]
    for v in variants:
        torch._dynamo.reset() if v.name == "eager" else None
        v.first_step(cache_root)
        print(f"  {v.name}: first step (compile) {v.compile_s:.1f} s", flush=True)
    # the budget: what the other variants hold now, plus a fraction of lohan's own peak
    unplanned = variants[-1].measure_peak()
    gc.collect()
    budget = device.allocated(DEVICE) + int(args.budget * unplanned)
    own_budget = int(args.budget * unplanned)
    v = Variant(f"lohan budget {args.budget:g}", make, batch,
                lambda m: torch.compile(m, backend="lohan",
                                        options={"executor": "inductor", "memory_budget": budget}),
                lohan_report=True)
    v.own_budget = own_budget
    v.first_step(cache_root)
    print(f"  {v.name}: first step (compile) {v.compile_s:.1f} s", flush=True)
    variants.append(v)
    variants.append(lohan_lowest(make, batch, cache_root))
    return variants


def lohan_lowest(make: Callable[[], torch.nn.Module], batch: torch.Tensor, cache_root: str,
                 tries: int = 6) -> Variant:
    """lohan at the smallest budget its planner names, above what the other variants hold."""
    gc.collect()
    held = device.allocated(DEVICE)
    named = held + (1 << 20)
    for _ in range(tries):
        budget = int(named * 1.002) if named > held + (1 << 20) else named
        v = Variant("lohan lowest", make, batch,
                    lambda m, budget=budget: torch.compile(m, backend="lohan", options={
                        "executor": "inductor", "memory_budget": budget}), lohan_report=True)
        v.own_budget = budget - held
        v.guarded(lambda: v.first_step(cache_root))
        for _ in range(2):  # (the re-plans after the first steps may name a larger budget)
            if v.failed is None:
                v.guarded(v.step)
        if v.failed is None:
            print(f"  {v.name}: first step (compile) {v.compile_s:.1f} s, budget "
                  f"{lohan.units.format_bytes(v.own_budget)} above the rest", flush=True)
            return v
        smallest = v.failed_bytes
        if smallest is None or smallest <= named:
            raise RuntimeError(f"lohan lowest: {v.failed}")
        named = smallest
        v = None  # (its model freed before the next try's is built)
        gc.collect()
    raise RuntimeError(f"lohan lowest: no budget held in {tries} tries")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--budget", type=float, default=0.6, help="lohan's budget: a fraction of its unplanned peak")
    ap.add_argument("--torch-budget", type=float, default=0.1, help="torch's activation_memory_budget")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="cuda when there is a GPU, else the CPU stand-in")
    ap.add_argument("--hidden", type=int, default=None,
                    help="a wider LLaMA (heads of 64, MLP 2.75x; default: the tests' 64-wide config)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary with --hidden")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--png", type=str, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tabulate import tabulate

    global DEVICE
    DEVICE = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if DEVICE.type == "cpu":
        device.install()  # count every allocation from here on, parameters included
    lohan.hardware.auto(device=DEVICE.type)  # measured once, before anything is timed
    print(f"{DEVICE.type}: LLaMA {args.layers} layers (hidden {args.hidden or 64}), batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads; "
          "compiling (each in a fresh Inductor cache):", flush=True)
    with tempfile.TemporaryDirectory(prefix="lohan_e2e_") as cache_root:
        variants = build(args, cache_root)
        for v in variants:  # warm up
            for _ in range(2):
                v.guarded(v.step)
        for _ in range(args.rounds):
            for v in variants:
                if v.failed is None:
                    v.guarded(lambda: v.times.append(statistics.median(v.step() for _ in range(args.steps))))
        for v in variants:
            if v.failed is None:
                v.guarded(v.measure_peak)
    failed = [v for v in variants if v.failed is not None]
    for v in failed:
        print(f"  {v.name}: stopped: {v.failed}")
    variants = [v for v in variants if v.failed is None and v.times]
    base = {v.name: v for v in variants}
    ref = base["torch.compile"]
    rows, out = [], []
    for v in variants:
        t = statistics.median(v.times)
        rec = {
            "variant": v.name,
            "step_ms": t * 1e3,
            "step_vs_torch_compile": t / statistics.median(ref.times),
            "compile_s": v.compile_s,
            "device_peak_bytes": v.peak,
            "loss": v.loss,
        }
        if v.report is not None:
            calibrated = v.report.get("calibrated_step_s")
            rec.update(predicted_step_ms=v.report["predicted_step_s"] * 1e3,
                       calibrated_step_ms=calibrated * 1e3 if calibrated is not None else None,
                       swapped_bytes=v.report["swapped_bytes"], recomputed_bytes=v.report["recomputed_bytes"])
        if hasattr(v, "own_budget"):
            rec["budget_bytes"] = v.own_budget
        out.append(rec)
        rows.append([
            v.name, f"{rec['step_ms']:.2f}", f"{rec['step_vs_torch_compile']:.3f}",
            f"{rec['predicted_step_ms']:.2f}" if "predicted_step_ms" in rec else "",
            f"{rec['calibrated_step_ms']:.2f}" if rec.get("calibrated_step_ms") is not None else "",
            f"{v.compile_s:.1f}" if v.name != "eager" else "",
            lohan.units.format_bytes(v.peak),
            lohan.units.format_bytes(rec["budget_bytes"]) if "budget_bytes" in rec else "",
            lohan.units.format_bytes(rec.get("swapped_bytes")) if "swapped_bytes" in rec else "",
        ])
    print(tabulate(rows, headers=["variant", "step ms (median)", "/ torch.compile", "predicted ms",
                                  "calibrated ms", "compile s (cold)", "device peak", "budget", "swapped"]))
    lohan_nothing = base["lohan"]
    ratio = statistics.median(lohan_nothing.times) / statistics.median(ref.times)
    print(f"\nlohan (nothing to move) / torch.compile step time: {ratio:.3f} (target <= 1.05)")
    budgeted = next((v for v in variants if v.name.startswith("lohan budget")), None)
    if budgeted is not None:
        print(f"lohan compile / torch.compile compile: {lohan_nothing.compile_s / ref.compile_s:.2f}x, "
              f"with the budget {budgeted.compile_s / ref.compile_s:.2f}x")
        calibrated = budgeted.report.get("calibrated_step_s")
        print(f"lohan budget: measured step {statistics.median(budgeted.times) * 1e3:.2f} ms, simulator predicted "
              f"{budgeted.report['predicted_step_s'] * 1e3:.2f} ms"
              + (f" ({calibrated * 1e3:.2f} ms with the compute times measured in its first steps)" if calibrated else "")
              + f"; device peak {budgeted.peak / budgeted.own_budget:.3f} x its budget")
    lowest = {label: base.get(name) for label, name in (
        ("eager", "eager"), ("torch checkpointing", "torch checkpointing"),
        (f"torch min-cut {args.torch_budget:g}", f"torch memory budget {args.torch_budget:g}"),
        ("lohan", "lohan lowest"))}
    lowest_rows = {label: {"device_peak_bytes": v.peak, "step_ms": statistics.median(v.times) * 1e3}
                   for label, v in lowest.items() if v is not None}
    print("\nlowest reachable device peak per system, with its step time:")
    print(tabulate([[label, lohan.units.format_bytes(r["device_peak_bytes"]), f"{r['step_ms']:.2f}"]
                    for label, r in lowest_rows.items()], headers=["system", "device peak", "step ms (median)"]))
    result = {
        "lowest_reachable": lowest_rows,
        "command": " ".join(["python", "bench/" + Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parent).stdout.strip(),
        "config": vars(args) | {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"},
        "variants": out,
        "stopped": {v.name: v.failed for v in failed},
        "lohan_over_torch_compile_step": ratio,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.png:
        plot(out, args.png)
    return 0


def plot(records: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--png needs matplotlib (pip install matplotlib); skipped")
        return
    names = [r["variant"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("step_ms", "step time (ms, median)"), ("compile_s", "compile time (s, cold cache)"),
              ("device_peak_bytes", "device peak (MiB)")]
    for ax, (key, title) in zip(axes, panels):
        values = [(r[key] or 0) / (2**20 if key == "device_peak_bytes" else 1) for r in records]
        ax.barh(names, values, color=["#888" if not n.startswith("lohan") else "#c44" for n in names])
        ax.set_title(title)
        ax.invert_yaxis()
    for y, r in enumerate(records):
        if "budget" in r["variant"] and r.get("predicted_step_ms") is not None:
            axes[0].plot([r["predicted_step_ms"]], [y], "k|", markersize=20, mew=2, label="predicted")
            if r.get("calibrated_step_ms") is not None:
                axes[0].plot([r["calibrated_step_ms"]], [y], "b|", markersize=20, mew=2,
                             label="predicted, measured compute")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].set_xlim(0, max(r["step_ms"] for r in records) * 2.0)
        axes[0].legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
