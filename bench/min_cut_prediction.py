"""The ``torch-min-cut`` policy: its predicted device peak against the measured one (issue 25).

lohan's ``policy="torch-min-cut"`` partitions with torch's min-cut partitioner, its activation
budget searched from 1.0 down until lohan's simulator predicts the step within
``memory_budget``, and keeps every value that partition saves. Here each case is run for 3
steps (no optimizer, the user keeps only the loss, gradients set to None between steps) and
its device peak measured with the profiler (DESIGN.md's method, last step), beside the
report's ``predicted_peak_bytes``. Models (Hugging Face, from configs, random weights): GPT-2
(hidden 256, 4 layers, 4 heads, vocabulary 1000) and LLaMA (hidden 256, intermediate 688, 4
layers, 4 heads, vocabulary 1000), both batch 8 x 256; each under both executors and three
budgets (none binding, then two that make the search go below 1.0).

    python bench/min_cut_prediction.py [--json bench/results/min_cut_prediction.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch

import lohan_compile as lohan
from lohan_compile.measure import measure_device_peak

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loss_chunks  # noqa: E402  (its GPT-2 and the way it builds a model and its batch)

MiB = 2**20
BUDGETS_MIB = {"gpt2": (4000, 150, 125), "llama": (4000, 150, 120)}


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, use_cache=False)
    return LlamaForCausalLM(cfg).train(), (8, 256), 1000


loss_chunks.MODELS["llama"] = llama


def case(name: str, executor: str, budget_mib: float) -> dict:
    options = {"executor": executor, "policy": "torch-min-cut", "memory_budget": int(budget_mib * MiB),
               "tune_plans": False}

    def build():
        torch._dynamo.reset()
        gc.collect()
        model, ids = loss_chunks.make(name)
        return model, torch.compile(model, backend="lohan", options=options), ids

    def run(state):
        model, cm, ids = state
        for p in model.parameters():
            p.grad = None
        out = cm(input_ids=ids, labels=ids)
        loss = out.loss
        del out
        loss.backward()

    try:
        measured = measure_device_peak(build, run, steps=3).peak_bytes
    except Exception as e:  # noqa: BLE001 - reported
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    report = lohan.last_report()
    predicted = report.summary()["predicted_peak_bytes"]
    return {"measured_mib": measured / MiB, "predicted_mib": predicted / MiB, "predicted_over_measured": predicted / measured,
            "activation_memory_budgets": [(g.pass_report("partition_graph") or {}).get("activation_memory_budget")
                                          for g in report.graphs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = {}
    for name, budgets in BUDGETS_MIB.items():
        for executor in ("fx", "inductor"):
            for budget in budgets:
                key = f"{name} {executor} {budget} MiB"
                results[key] = case(name, executor, budget)
                print(key, json.dumps(results[key]), flush=True)
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        out = {"commit": commit, "command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
               "results": results}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
