"""``lohan plan`` against the runtime: the bytes a training step moves on each link (host to
device, device to host, SSD read, SSD write), predicted by the whole-step model and measured by
the runtime, for the same model, budgets and hardware profile.

    python bench/link_bytes.py [--layers 12] [--steps 5] [--json bench/results/link_bytes.json]

The model is the LLaMA-style model of ``bench/ssd.py`` (hidden 256, vocabulary 1024, fp32 or
bf16 weights, batch 2 x 128) with ``offload_params=True``, clipping and ``ssd_dir``. Each case
trains ``--steps`` steps and takes the link bytes of the step before the last from the report
(``h2d_bytes``, ``d2h_bytes``: counted by the copy engine; ``ssd_read_bytes``,
``ssd_write_bytes``: counted by the SSD tier's I/O threads). The prediction is
``WholeStep(trace(spec, ...)).plan("auto", offload_params=True).traffic`` for the spec read
from the same config, traced in the same dtype, on this machine's measured profile
(``hardware="auto"``) with the host memory set so that the host tier has the run's
``host_memory_budget`` (``lohan plan`` leaves 5% of the host memory to the system) and one SSD.

Cases:
- ``host memory``: no host budget, no SSD (the state in host memory), for the step time;
- ``all on SSD``: the smallest host budget (only the staging of one update in host memory);
  the device budget leaves every activation on the device.
- ``quarter``: the host budget a quarter of the weights and fp32 moments, as in
  ``bench/ssd.py``: some of the state in host memory, the rest on SSD.
- ``bf16``: bf16 weights (fp32 masters), the smallest host budget.
- ``activations planned``: ``quarter`` with the device budget half the weights, as in
  ``bench/ssd.py``: the runtime's planner and the whole-step model each choose how the
  activations leave the device; reported, not gated (the two plan different graphs: the
  runtime the model's own joint graph, ``lohan plan`` a block of ``zoo.Block`` traced on meta).

Also printed: each case's step time (median of the steps after the second, each ending with
``opt.synchronize()`` so that its deferred updates count in it; not interleaved, so read it
beside ``bench/ssd.py``'s) against the predicted one, with the waits the plan predicts and
how long it predicts the SSD queues busy, on SSD bandwidths given as ``--ssd-read`` and
``--ssd-write`` (default: the tier's own on this machine, ``bench/results/ssd.json``).

Gate: every link within 10% in every case but the last.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lohan_compile as lohan  # noqa: E402
from lohan_compile.hardware import resolve  # noqa: E402
from lohan_compile.runtime import device, hosttier, offload  # noqa: E402
from lohan_compile.wholestep import CONTEXT_BYTES, HOST_RESERVE_FRACTION, WholeStep, trace  # noqa: E402
from lohan_compile.zoo import from_hf_config  # noqa: E402

LINKS = ("h2d_bytes", "d2h_bytes", "ssd_read_bytes", "ssd_write_bytes")
GATE = 0.10
BATCH, SEQ = 2, 128


def config(layers: int) -> dict:
    return dict(model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=1024,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def measure(cfg: dict, dtype: torch.dtype, host: str, device_fraction: float | None, ssd_dir: Path,
            steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch._dynamo.reset()
    hosttier.set_current(None)
    gc.collect()
    held = device.allocated()  # (what the process holds before this model: the device budget's base)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})).to(dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-4, max_grad_norm=1.0)
    options = {"optimizer": opt, "offload_params": True, "executor": "fx", "tune_plans": False}
    if host == "smallest":
        host_budget = offload.smallest_host_budget(opt, beyond_host=True)
    elif host == "quarter":  # a quarter of the weights and fp32 moments
        host_budget = (weights + 8 * sum(p.numel() for p in model.parameters())) // 4
    else:  # everything in host memory
        host_budget = None
    if host_budget is not None:
        options.update(host_memory_budget=host_budget, ssd_dir=str(ssd_dir))
    if device_fraction is not None:
        options["memory_budget"] = held + int(device_fraction * weights)
    cm = torch.compile(model, backend="lohan", options=options)
    batch = torch.randint(0, cfg["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    rows, seconds = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = cm(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.synchronize()  # (the step's deferred updates inside its time)
        seconds.append(time.perf_counter() - start)
        opt.zero_grad()
        rows.append(lohan.last_report().summary())
    row = rows[-2]  # (a steady step whose successor ran: its deferred updates' I/O is counted)
    out = {k: row[k] for k in LINKS + ("swapped_bytes", "recomputed_bytes", "host_peak_bytes")}
    out["step_s"] = statistics.median(seconds[2:])  # (after the compiles and first measurements)
    out.update(host_memory_budget=host_budget, weights_bytes=weights,
               memory_budget=options.get("memory_budget"), device_budget_over_held=options.get("memory_budget")
               and options["memory_budget"] - held)
    opt.state.clear()
    if host_budget is not None:
        hosttier.current().close()
    return out


def predict(cfg: dict, dtype: torch.dtype, measured: dict, ssd_read: float, ssd_write: float) -> dict:
    spec = from_hf_config(cfg, "link-bytes")
    host = measured["host_memory_budget"]
    hw = dataclasses.replace(
        resolve("auto"), device_memory=64 << 30, ssd_count=1 if host else 0, ssd_read_bandwidth=ssd_read,
        ssd_write_bandwidth=ssd_write, ssd_capacity=1 << 40,
        host_memory=int(host / (1 - HOST_RESERVE_FRACTION)) + 1 if host else 1 << 40)
    over = measured["device_budget_over_held"]
    budget = (over + CONTEXT_BYTES) if over else hw.device_memory
    plan = WholeStep(trace(spec, BATCH, SEQ, hw, dtype=dtype), hw, budget=budget).plan("auto", offload_params=True)
    placement = plan.placement
    return {
        "feasible": plan.feasible, "why": plan.why,
        "h2d_bytes": plan.traffic["h2d"], "d2h_bytes": plan.traffic["d2h"],
        "ssd_read_bytes": plan.traffic["ssd_read"], "ssd_write_bytes": plan.traffic["ssd_write"],
        "device_peak_bytes": plan.peaks.get("device", 0) - CONTEXT_BYTES,
        "step_s": plan.step_s, "exposed_s": plan.exposed, "busy_s": plan.busy,
        "groups_on_ssd": {"weights": len(placement.weights_ssd), "gradients": len(placement.grads_ssd),
                          "state": len(placement.state_ssd)},
        "activations": {k: v for k, v in plan.actions.items() if v != "keep"},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--ssd-read", type=float, default=2.2e9,
                   help="SSD read bytes/s of the profile (bench/results/ssd.json: the tier's, here)")
    p.add_argument("--ssd-write", type=float, default=4.4e9, help="SSD write bytes/s of the profile")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result: dict = {"command": "python " + " ".join(sys.argv), "commit": commit, "cases": []}
    print(f"command: {result['command']}\ncommit {commit}; torch {torch.__version__}")
    cases = [("host memory", torch.float32, "all", None, True),
             ("all on SSD", torch.float32, "smallest", None, True), ("quarter", torch.float32, "quarter", None, True),
             ("bf16", torch.bfloat16, "smallest", None, True),
             ("activations planned", torch.float32, "quarter", 0.5, False)]
    base = Path(tempfile.mkdtemp(prefix="lohan-bench-links-", dir=Path.cwd()))
    ok = True
    try:
        cfg = config(a.layers)
        for name, dtype, host, fraction, gated in cases:
            folder = base / name.replace(" ", "-")
            folder.mkdir()
            measured = measure(cfg, dtype, host, fraction, folder, a.steps)
            predicted = predict(cfg, dtype, measured, a.ssd_read, a.ssd_write)
            ratios = {k: measured[k] / predicted[k] if predicted[k] else (1.0 if not measured[k] else float("inf"))
                      for k in LINKS}
            within = all(abs(r - 1) <= GATE for r in ratios.values())
            ok &= within or not gated
            result["cases"].append({"case": name, "dtype": str(dtype), "gated": gated, "within_gate": within,
                                    "measured": measured, "predicted": predicted, "ratio": ratios})
            print(f"\n{name} ({dtype}, host budget {measured['host_memory_budget'] or 'none'}, "
                  f"{'device budget ' + format(measured['memory_budget'], ',') + ' B' if fraction else 'no device budget'})"
                  f": plan {'feasible' if predicted['feasible'] else 'INFEASIBLE'}, groups on SSD "
                  f"{predicted['groups_on_ssd']}")
            for k in LINKS:
                print(f"   {k:>16} measured {measured[k]:>13,}  predicted {predicted[k]:>13,}  {ratios[k]:.3f}")
            print(f"   activations: runtime swapped {measured['swapped_bytes']:,} B, recomputed "
                  f"{measured['recomputed_bytes']:,} B; lohan plan: {predicted['activations'] or 'all kept'}")
            print(f"   step: measured {measured['step_s']:.3f} s, predicted {predicted['step_s']:.3f} s; predicted "
                  f"waits {({k: round(v, 3) for k, v in predicted['exposed_s'].items() if v > 1e-4})}, SSD busy "
                  f"{predicted['busy_s']['ssd_read']:.3f} s read, {predicted['busy_s']['ssd_write']:.3f} s write")
            print(f"   {'within' if within else 'NOT within'} {GATE:.0%}{'' if gated else ' (not gated)'}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result["gate_pass"] = ok
    print(f"\ngate (every link within {GATE:.0%} where activations stay on the device): {'PASS' if ok else 'FAIL'}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {a.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
