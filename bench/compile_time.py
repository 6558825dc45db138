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
  layers compile once: the fraction of hits says how much of a deep model compiles for free);
- ``--replan LAYERS``: at that depth, lohan (fx executor) re-planning for a size growth. The
  model runs sequences of 64, then 96 tokens (dynamo compiles the graph again with symbolic
  sizes: ``dynamic_first_s``, that graph's first compile; ``dynamic_second_s``: its second step,
  which collects the garbage dynamo's trace left), then 256 (past the plan's headroom:
  lohan plans the symbolic graph again, ``replan_step_s``), then 256 again (``plain_step_s``).
  The re-plan costs ``replan_step_s - plain_step_s``; ``traced_again``: whether AOTAutograd
  traced the graph again for it, ``replan_passes_s`` and ``replan_partition``: lohan's passes in
  it and what its partitioning weighed (``weighed_after_steps``: the steps after which the
  partitions are weighed, where the re-plan weighed none). Its budget is ``--fraction`` of what the 256-token step
  allocated under ``aot_eager`` above the model (weights not included).

    python bench/compile_time.py [--layers 4,12,24] [--fraction 0.8] [--backends aot_eager,lohan_fx,...]
                                 [--replan 48] [--json bench/results/compile_time.json]
"""

from __future__ import annotations

import argparse
import gc
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
    gc.collect()  # (an earlier case's garbage freed during the step would lower the peak over ``level``)
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


def replan(layers: int, fraction: float) -> dict:
    """A re-plan for a size growth against the compile it replaces (fx executor)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    m = model(layers)
    gen = torch.Generator().manual_seed(1)

    def step(compiled, tokens: int) -> float:
        ids = torch.randint(0, 256, (2, tokens), generator=gen)
        m.zero_grad(set_to_none=True)  # (as a training loop does: no step adds to an earlier one's .grad)
        start = time.perf_counter()
        compiled(input_ids=ids, labels=ids).loss.backward()
        return time.perf_counter() - start

    gc.collect()  # (as in ``first_step``)
    level = device_memory.allocated()
    device_memory.reset_peak()
    step(torch.compile(m, backend="aot_eager"), 256)
    budget = int((device_memory.peak() - level) * fraction)  # the largest step's unplanned peak
    m.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="lohan", options={"memory_budget": budget, "executor": "fx"})
    out = {"budget_bytes": budget, "static_first_s": round(step(compiled, 64), 2)}
    out["dynamic_first_s"] = round(step(compiled, 96), 2)
    # (its compiled callable's one-time collection of dynamo's garbage, on the call after its
    # first step, belongs to that first compile, not to the re-plan)
    out["dynamic_second_s"] = round(step(compiled, 96), 2)
    before = [g.name for g in lohan.last_report().graphs]
    traced = counters["aot_autograd"]["total"]
    out["replan_step_s"] = round(step(compiled, 256), 2)
    out["traced_again"] = counters["aot_autograd"]["total"] > traced
    out["graphs"] = {"before": before, "after": [g.name for g in lohan.last_report().graphs]}
    (graph,) = lohan.last_report().graphs
    out["replan_passes_s"] = {p.name: round(p.seconds, 2) for p in graph.passes}
    partitioned = graph.pass_report("partition_graph")
    out["replan_partition"] = {k: partitioned.get(k) for k in ("partitioner", "partitions_reused", "partitions_made",
                                                              "keep_all_step_s", "auto_default_partition_step_s",
                                                              "auto_min_cut_partition_step_s", "weighed", "gain_bound_s",
                                                              "weighed_after_steps")}
    out["plain_step_s"] = round(step(compiled, 256), 2)
    out["replan_s"] = round(out["replan_step_s"] - out["plain_step_s"], 2)
    out["replan_over_first"] = round(out["replan_s"] / out["dynamic_first_s"], 3)
    out["replan_over_static_first"] = round(out["replan_s"] / out["static_first_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="4,12,24")
    ap.add_argument("--fraction", type=float, default=0.8)
    ap.add_argument("--backends", default="aot_eager,lohan_fx,inductor,lohan_inductor",
                    help="which rows to run (aot_eager always runs: it sets the budget)")
    ap.add_argument("--replan", type=int, default=None, metavar="LAYERS", help="also time a re-plan at this depth")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    backends = set(args.backends.split(","))
    unknown = backends - {"aot_eager", "lohan_fx", "inductor", "lohan_inductor"}
    if unknown:
        ap.error(f"unknown --backends {sorted(unknown)}: choose from aot_eager, lohan_fx, inductor, lohan_inductor")
    torch.set_num_threads(1)
    # one-time costs of a process's first compile (imports, Inductor's toolchain checks) go to
    # no row: a one-layer model through every backend first
    cases = {  # row name -> (backend, its options but the budget, compared with)
        "lohan_fx": ("lohan", {"executor": "fx"}, "aot_eager"),
        "inductor": ("inductor", None, None),
        "lohan_inductor": ("lohan", {"executor": "inductor"}, "inductor"),
    }
    cases = {name: case for name, case in cases.items() if name in backends}
    warm = first_step(1, "aot_eager")
    for backend, options, _ in cases.values():
        first_step(1, backend, dict(options, memory_budget=int(warm["peak_bytes"] * args.fraction))
                   if backend == "lohan" else None)
    rows = []
    for layers in (int(x) for x in args.layers.split(",")):
        row = {"layers": layers, "aot_eager": first_step(layers, "aot_eager")}
        budget = int(row["aot_eager"]["peak_bytes"] * args.fraction)
        row["budget_bytes"] = budget
        line = [f"{layers:3d} layers: aot_eager {row['aot_eager']['first_step_s']:.1f} s"]
        for name, (backend, options, against) in cases.items():
            row[name] = r = first_step(layers, backend, dict(options, memory_budget=budget) if backend == "lohan" else None)
            text = f"{name} {r['first_step_s']:.1f} s"
            if against in row:
                text += f" ({r['first_step_s'] / row[against]['first_step_s']:.2f}x {against}"
                text += f"; passes {r['lohan_passes_s']:.1f} s" if "lohan_passes_s" in r else ""
                looked = r.get("fxgraph_cache_hits", 0) + r.get("fxgraph_cache_misses", 0)
                text += f"; FX graph cache hits {r.get('fxgraph_cache_hits', 0)}/{looked})" if looked else ")"
            line.append(text)
        print(", ".join(line), flush=True)
        rows.append(row)
    result = {"rows": rows}
    if args.replan:
        result["replan"] = {"layers": args.replan, **replan(args.replan, args.fraction)}
        print(f"re-plan at {args.replan} layers: {result['replan']}", flush=True)
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        Path(args.json).write_text(json.dumps({"commit": commit, "command": "python " + " ".join(sys.argv),
                                               "torch": torch.__version__, "threads": 1, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
