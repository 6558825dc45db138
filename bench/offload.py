"""Active gradient offloading on the CPU stand-in: device memory saved, optimizer overlap.

A parameter-heavy configuration (parameter bytes at least twice the activation
bytes) trained side by side in one process:

- eager: the model with torch.optim.AdamW; gradients stay on the device until step();
- lohan: the compiled model with CPUAdamW and gradient offloading, for each of the
  two designs (``overlap="speculative"``: updates during backward with roll-back
  copies; ``"deferred"``: updates after backward, overlapping the next forward),
  with gradient clipping on.

Reported: the device peak of forward+backward (device counter), its drop against
eager as a share of the parameter bytes (gate: at least 50%); from the runtime's
timeline, the share of the optimizer's work that ran while compute ran (gate: at
least half), and how long ``opt.step()`` still waited; step times (medians).

    python bench/offload.py [--steps 12] [--layers 4] [--hidden 512]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from pathlib import Path

import torch

import lohan_compile as lohan
from lohan_compile.runtime import device


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg)


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def overlap_share(events, spans):
    """Share of the events' busy time that falls inside the compute spans."""
    busy = inside = 0.0
    for e in events:
        busy += e.end - e.start
        for s, t in spans:
            inside += max(0.0, min(e.end, t) - max(e.start, s))
    return inside / busy if busy else 0.0


def run_eager(model, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    peaks, times = [], []
    for ids in batches:
        start = time.perf_counter()
        device.reset_peak()
        loss_of(model, ids).backward()
        peaks.append(device.peak())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return peaks, times


def run_lohan(model, batches, overlap, max_grad_norm):
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-4, max_grad_norm=max_grad_norm, overlap=overlap, num_threads=1)
    cm = torch.compile(model, backend="lohan", options={"optimizer": opt})
    peaks, times, step_waits, spans = [], [], [], []
    for ids in batches:
        start = time.perf_counter()
        loss_of(cm, ids).backward()
        report = lohan.last_report()
        peaks.append(report.summary()["measured_peak_bytes"])
        spans += [(r.start, r.start + r.seconds) for r in report.runs]
        s = time.perf_counter()
        opt.step()
        step_waits.append(time.perf_counter() - s)
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    opt.synchronize()
    runtime = opt._lohan_offload
    # the first steps learn the step's graphs; measure overlap on the later ones
    later = [e for e in runtime.events.copy() if e.kind == "update" and e.start >= spans[len(spans) // 2][0]]
    clipped = sum(runtime.recent_clips)
    return peaks, times, step_waits, overlap_share(later, spans), clipped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device.install()
    base = build(args)
    param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(args.steps)]

    eager_peaks, eager_times = run_eager(copy.deepcopy(base), batches)
    # eager's first step runs before AdamW creates its state: parameters, gradients, activations
    results = {"param_bytes": param_bytes,
               "eager": {"peak_bytes": max(eager_peaks[1:]), "peak_bytes_without_optimizer_state": eager_peaks[0],
                         "step_s": statistics.median(eager_times[2:])}}
    # what forward keeps for backward, as the compiler measures it
    torch._dynamo.reset()
    probe = copy.deepcopy(base)
    loss_of(torch.compile(probe, backend="lohan"), batches[0]).backward()
    act = lohan.last_report().summary()["kept_bytes"]
    del probe
    gc.collect()
    results["activation_bytes"] = act
    print(f"parameters {param_bytes / 2**20:.1f} MiB, activations kept for backward {act / 2**20:.1f} MiB "
          f"(parameters / activations = {param_bytes / max(act, 1):.1f}, needs at least 2)")
    print(f"eager: fw+bw device peak {results['eager']['peak_bytes'] / 2**20:.1f} MiB with AdamW's state on the "
          f"device ({eager_peaks[0] / 2**20:.1f} MiB before it exists), step {results['eager']['step_s'] * 1e3:.1f} ms")
    # clipping that rarely triggers (a limit above the gradient norms), and clipping at every step
    for label, limit in (("rare clipping", 1e6), ("clipping every step", 1e-3)):
        for overlap in ("speculative", "deferred", "auto"):
            torch._dynamo.reset()
            gc.collect()
            peaks, times, waits, share, clipped = run_lohan(copy.deepcopy(base), batches, overlap, limit)
            gc.collect()
            peak = max(peaks[1:])
            # against eager's peak without optimizer state: what offloading gradients saves
            drop = eager_peaks[0] - peak
            r = results[f"{overlap}, {label}"] = {
                "peak_bytes": peak,
                "drop_over_param_bytes": drop / param_bytes,
                "drop_against_eager_with_adamw_state": (results["eager"]["peak_bytes"] - peak) / param_bytes,
                "optimizer_overlap_share": share,
                "step_wait_s": statistics.median(waits[2:]),
                "step_s": statistics.median(times[2:]),
                "steps_clipped_of_last_10": clipped,
            }
            print(f"lohan {overlap:11s} {label:20s}: peak {peak / 2**20:.1f} MiB, drop {drop / 2**20:.1f} MiB = "
                  f"{r['drop_over_param_bytes']:.0%} of the parameter bytes (gate 50%: "
                  f"{'pass' if r['drop_over_param_bytes'] >= 0.5 else 'FAIL'}); optimizer work during compute "
                  f"{share:.0%} (gate 50%: {'pass' if share >= 0.5 else 'FAIL'}); opt.step() waits "
                  f"{r['step_wait_s'] * 1e3:.1f} ms; step {r['step_s'] * 1e3:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    from lohan_compile import settings

    with settings.EXECUTOR.override("fx"):  # the fx executor, as bench/results/offload.json was taken (Inductor: bench/e2e.py)
        main()
