"""Beyond host memory, measured: the SSD tier's throughput over 1, 2 and 4 folders against
``dd``, and a training step whose state lives on SSD against the same step with all of it in
host memory, side by side in one process.

    python bench/ssd.py [--dir FOLDER] [--ssd-bytes 1GiB] [--reps 3] [--steps 8] \\
        [--json bench/results/ssd.json]

1. Sequential write and read GB/s of the tier with ``ssd_dir`` as 1, 2 and 4 folders (blocks
   striped over them, as over the drives of a RAID 0) against ``dd`` with direct I/O
   (``oflag=direct`` / ``iflag=direct``, the better of bs=4M and bs=64M) on the same disk,
   interleaved rep by rep, best of --reps. On this machine every folder is on one disk, so
   more folders cannot be faster; on a machine with one folder per drive, give them with
   ``--dir A --dir B ...``. Gate: at least 80% of dd each way, every folder count.
2. A LLaMA-style model (hidden 256, 12 layers, vocabulary 1024: 12.3M parameters, 49 MB of fp32
   weights) with ``offload_params=True``, clipping, the device budget half its weights, trained
   in two configurations, one step of each in turn: "host" (no host budget: weights, gradients
   and optimizer state in host memory) and "ssd" (``host_memory_budget`` a quarter of the
   weights and fp32 moments, ``ssd_dir``). Per step, medians over the steps after the first
   two (each step ends with ``opt.synchronize()``, so that deferred updates finish inside the
   step they belong to and never overlap the other configuration's): wall time; SSD bytes read
   and written (the tier's counters); the time the SSD queues
   were busy (union of the recorded SSD spans) and how much of it the step thread spent
   waiting (in ``opt.step()``, and in forward for a deferred update of a weight, which is
   where SSD reads and writes that were not hidden show).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lohan_compile as lohan  # noqa: E402
from host_tier import run_dd, tier_pass  # noqa: E402
from lohan_compile.runtime import device, hosttier, offload  # noqa: E402
from lohan_compile.units import format_bytes, parse_bytes  # noqa: E402

GATE = 0.80


def throughput(dirs: list[Path], dd_dir: Path, total: int, reps: int) -> dict:
    """The tier over ``dirs`` and dd in ``dd_dir``, interleaved rep by rep; best GB/s of each."""
    block = 64 << 20
    n = max(1, total // block)
    total = n * block
    tier = hosttier.HostTier(None, ssd_dir=[str(d) for d in dirs], arena_bytes=block,
                             ssd_threads=max(4, 2 * len(dirs)))
    best: dict[str, float] = {}
    try:
        pattern = torch.randint(0, 255, (block,), dtype=torch.uint8)
        bufs = [tier.empty((block,), torch.uint8) for _ in range(n)]  # aligned: in place
        for i, b in enumerate(bufs):
            b.copy_(pattern)
            b[:8] = i
        tokens = [tier.empty((block,), torch.uint8, where="ssd") for _ in range(n)]

        def ours(write: bool) -> float:
            return tier_pass(tier, bufs, tokens, pattern, total, write)

        dd_file = dd_dir / "dd-bench.bin"
        for _ in range(reps):
            for kind, write in (("write", True), ("read", False)):
                for bs in (4, 64):
                    args = (["if=/dev/zero", f"of={dd_file}", f"bs={bs}M", f"count={total // (bs << 20)}",
                             "oflag=direct"] if write else [f"if={dd_file}", "of=/dev/null", f"bs={bs}M",
                                                             "iflag=direct"])
                    best[f"dd {kind}"] = max(best.get(f"dd {kind}", 0.0), run_dd(args))
                best[f"tier {kind}"] = max(best.get(f"tier {kind}", 0.0), ours(write))
        dd_file.unlink()
        return {"folders": len(dirs), "io_mode": tier.ssd.io_mode, "bytes": total, "best_gb_per_s": best}
    finally:
        tier.close()


# ---- the training step ---------------------------------------------------------------------

def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


class Timed:
    """Seconds the step thread spends in a function, summed (bench-only instrumentation)."""

    def __init__(self, owner: type, name: str):
        self.owner, self.name, self.seconds = owner, name, 0.0
        self.original = getattr(owner, name)
        timed = self

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return timed.original(*args, **kwargs)
            finally:
                timed.seconds += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def busy_seconds(spans: list, kinds: tuple[str, ...]) -> float:
    """Length of the union of the spans of ``kinds`` (seconds)."""
    iv = sorted((s[2], s[3]) for s in spans if s[0] in kinds)
    total, end = 0.0, None
    for a, b in iv:
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def train_side_by_side(ssd_dir: Path, steps: int) -> dict:
    batch = torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(0))
    weights = sum(p.numel() * p.element_size() for p in model().parameters())
    moments = 2 * weights
    waits = Timed(offload.OffloadRuntime, "wait_weight")
    runs: dict[str, dict] = {}

    def step(name: str) -> None:
        run = runs[name]
        if run["tier"] is not None:
            hosttier.set_current(run["tier"])  # (the graph ops use the current tier)
        stats0 = run["tier"].stats() if run["tier"] is not None else None
        waits.take()
        t0 = time.perf_counter()
        loss = run["cm"](input_ids=batch, labels=batch).loss
        loss.backward()
        t1 = time.perf_counter()
        run["opt"].step()
        # deferred updates finish inside the step measured: the other configuration's step
        # comes next, and must not share the machine with this one's SSD work
        run["opt"].synchronize()
        t2 = time.perf_counter()
        run["opt"].zero_grad()
        forward_waits = waits.take()
        if run["tier"] is None:
            run["tier"] = hosttier.current()  # the tier its compile made current
        stats = run["tier"].stats()
        report = lohan.last_report()
        summary = report.summary()
        row = {
            "step_s": t2 - t0, "step_call_s": t2 - t1, "weight_wait_s": forward_waits,
            "ssd_read_bytes": stats.ssd_bytes_read - (stats0.ssd_bytes_read if stats0 else 0),
            "ssd_write_bytes": stats.ssd_bytes_written - (stats0.ssd_bytes_written if stats0 else 0),
            # (the step's recorded spans: a deferred update's I/O after step() returned counts in
            # the next step)
            "ssd_busy_s": busy_seconds(report.copy_events, ("ssd_read", "ssd_write")),
            "h2d_bytes": summary["h2d_bytes"], "d2h_bytes": summary["d2h_bytes"],
            "device_peak_bytes": summary["measured_peak_bytes"], "host_peak_bytes": summary["host_peak_bytes"],
            "predicted_step_s": summary["predicted_step_s"], "loss": float(loss),
        }
        run["rows"].append(row)
        print(f"   step {len(run['rows']) - 1} {name:>4}: {row['step_s']:6.3f} s, SSD read "
              f"{format_bytes(row['ssd_read_bytes'])} written {format_bytes(row['ssd_write_bytes'])}", flush=True)

    for name in ("host", "ssd"):
        # each built, compiled and run once before the next is built: on the CPU stand-in every
        # tensor is device memory, and a model not yet compiled holds its weights there
        torch._dynamo.reset()
        hosttier.set_current(None)
        gc.collect()
        budget = device.allocated() + weights // 2  # (what the process holds before this model)
        m = model()
        opt = lohan.CPUAdamW(m.parameters(), lr=1e-4, max_grad_norm=1.0)
        options = {"optimizer": opt, "offload_params": True, "executor": "fx", "tune_plans": False,
                   "memory_budget": budget}
        if name == "ssd":
            options.update(host_memory_budget=(weights + moments) // 4, ssd_dir=str(ssd_dir))
        cm = torch.compile(m, backend="lohan", options=options)
        runs[name] = {"model": m, "opt": opt, "cm": cm, "tier": None, "rows": [], "options": options}
        step(name)
    for _ in range(steps - 1):
        for name in runs:
            step(name)
    out = {"weights_bytes": weights, "moments_bytes": moments}
    for name, run in runs.items():
        rows = run["rows"][2:]
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "loss"}
        med["losses"] = [r["loss"] for r in run["rows"]]
        med["memory_budget"] = run["options"]["memory_budget"]
        med["host_memory_budget"] = run["options"].get("host_memory_budget")
        out[name] = med
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", action="append", default=None,
                   help="a folder to stripe over (repeat: one per drive); default: 1, 2 and 4 temp folders here")
    p.add_argument("--ssd-bytes", default="1GiB")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result: dict = {"command": "python " + " ".join(sys.argv), "commit": commit, "throughput": []}
    print(f"command: {result['command']}\ncommit {commit}; torch {torch.__version__}, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = Path(tempfile.mkdtemp(prefix="lohan-bench-ssd-", dir=Path.cwd()))
    try:
        torch.set_num_threads(1)  # preparing the data needs no intra-op parallelism
        print(f"\n1. sequential throughput, {format_bytes(parse_bytes(a.ssd_bytes))} per pass, best of {a.reps}, GB/s")
        print(f"   {'folders':>8} {'write':>7} {'dd':>6} {'ratio':>6} {'read':>7} {'dd':>6} {'ratio':>6}")
        ok = True
        sets = [[Path(d) for d in a.dir]] if a.dir else [
            [base / f"d{k}-{i}" for i in range(k)] for k in (1, 2, 4)]
        for dirs in sets:
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
            r = throughput(dirs, dirs[0], parse_bytes(a.ssd_bytes), a.reps)
            best = r["best_gb_per_s"]
            w, rd = best["tier write"] / best["dd write"], best["tier read"] / best["dd read"]
            r["ratio"] = {"write": w, "read": rd}
            ok &= w >= GATE and rd >= GATE
            result["throughput"].append(r)
            print(f"   {len(dirs):>8} {best['tier write']:>7.2f} {best['dd write']:>6.2f} {w:>5.0%} "
                  f"{best['tier read']:>7.2f} {best['dd read']:>6.2f} {rd:>5.0%}")
        print(f"   I/O: {result['throughput'][0]['io_mode']}; gate (>= {GATE:.0%} of dd both ways, every "
              f"folder count): {'PASS' if ok else 'FAIL'}")
        result["gate_pass"] = ok
        torch.set_num_threads(os.cpu_count() or 1)
        print(f"\n2. a training step beyond host memory against the same step in host memory ({a.steps} steps "
              "each, interleaved; medians after the first two)")
        (base / "train").mkdir()
        t = train_side_by_side(base / "train", a.steps)
        result["training"] = t
        h, s = t["host"], t["ssd"]
        print(f"   weights {format_bytes(t['weights_bytes'])}, fp32 moments {format_bytes(t['moments_bytes'])}; "
              f"host budget of the ssd run {format_bytes(s['host_memory_budget'])}; device budgets "
              f"{format_bytes(h['memory_budget'])} (host run), {format_bytes(s['memory_budget'])} (ssd run)")
        for key, label in (("step_s", "step (s)"), ("step_call_s", "opt.step() (s)"),
                           ("weight_wait_s", "forward waits for updates (s)"), ("ssd_busy_s", "SSD queues busy (s)"),
                           ("ssd_read_bytes", "SSD read (bytes)"), ("ssd_write_bytes", "SSD written (bytes)"),
                           ("host_peak_bytes", "host tier peak (bytes)"), ("device_peak_bytes", "device peak (bytes)"),
                           ("predicted_step_s", "planner's step, no SSD (s)")):
            print(f"   {label:>32} {h[key]:>14.4g} {s[key]:>14.4g}")
        print(f"   ssd / host step time: {s['step_s'] / h['step_s']:.2f}x; losses equal: {h['losses'] == s['losses']}")
        ok &= s["host_peak_bytes"] <= s["host_memory_budget"] and s["device_peak_bytes"] <= s["memory_budget"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {a.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
