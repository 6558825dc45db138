"""First-step time of deep models: how long until the first training step has run (issue 26).

A narrow Qwen2-style model from a config (hidden 64, 4 heads, vocabulary 256, batch 2 x 64)
at each depth, each case in a fresh dynamo state and a fresh Inductor cache directory, one
process, interleaved by depth:

- ``aot_eager`` (trace and AOTAutograd, no code generation) and ``inductor`` (torch.compile's
  default): the first forward+backward, from the call to the end of backward;
- lohan with the fx executor and with the Inductor executor under a budget of ``--fraction``
  of the unplanned peak (the device counter's peak of the ``aot_eager`` step of the same
  depth, the model and the batch included): the same first step, and the seconds of lohan's
  own passes over all graphs;
- one-time costs of the process's first compiles go to a one-layer model run first, in no row;
- ``peak_bytes``: the device counter over the first step, which sets the budget from the
  ``aot_eager`` row; lohan's runtime resets that counter at its step boundaries, so in lohan's
  rows it covers only part of the step (their ``predicted_peak_bytes`` is the plan's);
- under Inductor, how many of its FX graph cache lookups hit (identical segments of identical
  layers compile once: the fraction of hits says how much of a deep model compiles for free).

    python bench/compile_time.py [--layers 4,12,24] [--fraction 0.8] [--json bench/results/compile_time.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lohan_compile as lohan
from lohan_compile.runtime import device as device_memory


def model(layers: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).train()


def first_step(layers: int, backend: str, options: dict | None = None) -> dict:
    """Seconds of the first step (trace, compile, run), a fresh dynamo and Inductor cache."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lohan-bench-cache-")
    level = device_memory.allocated()  # (the peak counts the model and the batch, as a plan does)
    device_memory.reset_peak()
    m = model(layers)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(m, backend=backend, **({"options": options} if options else {}))
    start = time.perf_counter()
    compiled(input_ids=ids, labels=ids).loss.backward()
    seconds = time.perf_counter() - start
    out = {"first_step_s": round(seconds, 2), "peak_bytes": device_memory.peak() - level}
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    if hits or misses:
        out.update(fxgraph_cache_hits=hits, fxgraph_cache_misses=misses)
    if backend == "lohan":
        report = lohan.last_report()
        out["lohan_passes_s"] = round(sum(p.seconds for g in report.graphs for p in g.passes), 2)
        out["graphs"] = len(report.graphs)
        out["predicted_peak_bytes"] = report.summary()["predicted_peak_bytes"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="4,12,24")
    ap.add_argument("--fraction", type=float, default=0.8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # one-time costs of a process's first compile (imports, Inductor's toolchain checks) go to
    # no row: a one-layer model through every backend first
    warm = first_step(1, "aot_eager")
    for backend, options in (("inductor", None), ("lohan", {"executor": "fx"}), ("lohan", {"executor": "inductor"})):
        first_step(1, backend, dict(options or {}, memory_budget=int(warm["peak_bytes"] * args.fraction))
                   if backend == "lohan" else None)
    rows = []
    for layers in (int(x) for x in args.layers.split(",")):
        row = {"layers": layers, "aot_eager": first_step(layers, "aot_eager")}
        budget = int(row["aot_eager"]["peak_bytes"] * args.fraction)
        row["budget_bytes"] = budget
        row["lohan_fx"] = first_step(layers, "lohan", {"memory_budget": budget, "executor": "fx"})
        row["inductor"] = first_step(layers, "inductor")
        row["lohan_inductor"] = first_step(layers, "lohan", {"memory_budget": budget, "executor": "inductor"})
        base, ind = row["aot_eager"]["first_step_s"], row["inductor"]["first_step_s"]
        li = row["lohan_inductor"]
        looked = li.get("fxgraph_cache_hits", 0) + li.get("fxgraph_cache_misses", 0)
        print(f"{layers:3d} layers: aot_eager {base:.1f} s, lohan fx {row['lohan_fx']['first_step_s']:.1f} s "
              f"({row['lohan_fx']['first_step_s'] / base:.2f}x; passes {row['lohan_fx']['lohan_passes_s']:.1f} s); "
              f"inductor {ind:.1f} s, lohan inductor {li['first_step_s']:.1f} s ({li['first_step_s'] / ind:.2f}x; "
              f"FX graph cache hits {li.get('fxgraph_cache_hits', 0)}/{looked})", flush=True)
        rows.append(row)
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        Path(args.json).write_text(json.dumps({"commit": commit, "command": "python " + " ".join(sys.argv),
                                               "torch": torch.__version__, "threads": 1, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
