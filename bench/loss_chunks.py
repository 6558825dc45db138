"""How low the step's device peak goes: torch's min-cut partitioner against lohan, with and without
the chunked LM head and loss (``passes/chunk_loss.py``), side by side in one run.

Models (Hugging Face, built from configs, random weights, no optimizer, gradients set to None
before each step; the user keeps only the loss):

- ``qwen32k``: Qwen2-style, hidden 128, 2 layers, vocabulary 32000, batch 4 x 512;
- ``gpt2``: GPT-2, hidden 256, 4 layers, 4 heads, vocabulary 1000, batch 8 x 256, its
  ``loss_type`` set (so its loss is in the model's graph, not in a second one).

For each: the device peak measured with the profiler (DESIGN.md's method, last of 3 steps) of
eager; of ``torch.compile`` (Inductor) with torch's min-cut partitioner at
``activation_memory_budget`` 0.0, 0.05, 0.1 and 0.3 (its lowest is "torch's lowest"); of lohan
at the smallest budget its planner names (``BudgetError.smallest_feasible_bytes``, times
1.002), chunked (``loss_chunks="auto"``) and not (``loss_chunks=1``); and of lohan at the
budget of torch's lowest peak. Step times (after lohan's trial of its plans has ended): medians
of interleaved rounds of unprofiled steps of torch at its lowest, lohan at torch's lowest peak, and (qwen32k) lohan chunked and not at
the unchunked plan's smallest budget.

The loss region alone (qwen32k's shapes: 2048 tokens, hidden 128, vocabulary 32000): a module
of the head and the loss that returns only the loss, its hidden states requiring grad, measured
in 32 chunks and whole.

    python bench/loss_chunks.py [--models qwen32k,gpt2] [--executor inductor] [--rounds 5]
                                [--json bench/results/loss_chunks.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
import torch.nn.functional as F

import lohan_compile as lohan
from lohan_compile.backend.replan import Replanning
from lohan_compile.errors import BudgetError
from lohan_compile.measure import measure_device_peak
from lohan_compile.runtime import device as device_memory

MiB = 2**20
TORCH_FRACTIONS = (0.0, 0.05, 0.1, 0.3)
# steps a trial of auto's plans takes at most (backend/replan.py), and a step to spare
TRIAL_STEPS = Replanning.TRIAL_PLANS * (Replanning.TRIAL_WARMUP + Replanning.TRIAL_STEPS) + 1


def qwen32k():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=32000, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, use_cache=False)
    return Qwen2ForCausalLM(cfg).train(), (4, 512), 32000


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=1000, n_embd=256, n_layer=4, n_head=4, n_positions=256, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    model = GPT2LMHeadModel(cfg).train()
    # (transformers' ``loss_function`` warns, once, that GPT-2 has no ``loss_type``: dynamo breaks
    # the graph there, and the loss becomes a second graph; naming the loss keeps one graph)
    model.loss_type = "ForCausalLM"
    return model, (8, 256), 1000


MODELS = {"qwen32k": qwen32k, "gpt2": gpt2}


class Head(torch.nn.Module):
    """The loss region alone: the LM head and the cross-entropy."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, h, labels):
        return F.cross_entropy(self.lm_head(h).float().view(-1, self.lm_head.out_features), labels.view(-1))


def make(name: str):
    torch.manual_seed(0)
    model, shape, vocab = MODELS[name]()
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    return model, ids


def compiled(model, how: dict, reset: bool = True):
    if reset:  # (not between runners alive side by side: their compiled code would go too)
        torch._dynamo.reset()
    if how["kind"] == "eager":
        return model
    if how["kind"] == "torch":
        functorch_config.activation_memory_budget = how["fraction"]
        return torch.compile(model)
    # (lohan sets torch's activation budget itself where it uses min-cut; the global one is left
    # alone: dynamo guards on it, and a change would compile every model again)
    return torch.compile(model, backend="lohan", options=how["options"])


def step(model, call, ids) -> None:
    for p in model.parameters():
        p.grad = None
    loss = call(input_ids=ids, labels=ids).loss
    loss.backward()


def peak(name: str, how: dict, steps: int = 3) -> int:
    def build():
        model, ids = make(name)
        return model, compiled(model, how), ids

    return measure_device_peak(build, lambda s: step(*s), steps=steps).peak_bytes


def smallest(name: str, options: dict) -> int:
    try:
        peak(name, {"kind": "lohan", "options": {**options, "memory_budget": 1 << 20}}, steps=1)
    except Exception as e:  # noqa: BLE001 - the BudgetError, wrapped by torch
        err = BudgetError.within(e)
        if err is None:
            raise
        return err.smallest_feasible_bytes
    raise AssertionError("1 MiB was enough")


def lowest(name: str, options: dict, named: int, tries: int = 8) -> tuple[int, int]:
    """The step measured at the smallest budget the planner names (times 1.002); where the plan
    made at that budget names a larger one (the Inductor executor plans again once it has
    measured its segments), at that one: (budget, measured peak)."""
    for _ in range(tries):
        budget = int(named * 1.002)
        try:
            return budget, peak(name, {"kind": "lohan", "options": {**options, "memory_budget": budget}})
        except Exception as e:  # noqa: BLE001 - the BudgetError, wrapped by torch
            err = BudgetError.within(e)
            if err is None or not err.smallest_feasible_bytes or err.smallest_feasible_bytes <= named:
                raise
            named = err.smallest_feasible_bytes
    raise AssertionError(f"no budget found in {tries} tries")


def timed(name: str, variants: dict[str, dict], rounds: int, per_round: int = 3) -> dict[str, float]:
    """Median seconds per step of each variant, in interleaved rounds. Every model is built
    before any compiles, and each step leaves no gradient behind, so what the device holds
    beside a runner is the same when it is planned and when it runs; a lohan runner's budget is
    its own above that (the budget counts the whole device)."""
    device_memory.install()  # (counts what is built below)
    built = {label: make(name) for label in variants}
    gc.collect()
    everything = device_memory.allocated()
    runners = {}
    for label, how in variants.items():
        model, ids = built[label]
        if how["kind"] == "lohan":
            own = sum(p.numel() * p.element_size() for p in model.parameters())
            how = {**how, "options": {**how["options"],
                                      "memory_budget": how["options"]["memory_budget"] + everything - own}}
        call = compiled(model, how, reset=not runners)
        # compile; a re-plan after the first step; lohan's trial of its close plans, to its end
        for _ in range(2 + (TRIAL_STEPS if how["kind"] == "lohan" else 0)):
            step(model, call, ids)
            free_grads(model)
        runners[label] = (model, call, ids)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(rounds):
        for label, (model, call, ids) in runners.items():
            start = time.perf_counter()
            for _ in range(per_round):
                step(model, call, ids)
            times[label].append((time.perf_counter() - start) / per_round)
            free_grads(model)
    return {label: statistics.median(v) for label, v in times.items()}


def free_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def head_region(executor: str) -> dict:
    tokens, hidden, vocab = 2048, 128, 32000
    out = {}
    for label, chunks in (("whole", 1), ("chunked", 32)):  # (32: "auto"'s count, which the budget here would coarsen)
        def build(chunks=chunks):
            torch.manual_seed(0)
            head = Head(hidden, vocab)
            h = torch.randn(tokens, hidden, requires_grad=True)
            labels = torch.randint(0, vocab, (tokens,))
            torch._dynamo.reset()
            cm = torch.compile(head, backend="lohan", options={"executor": executor, "loss_chunks": chunks,
                                                                 "memory_budget": "64GiB"})
            return head, cm, h, labels

        def run(state):
            head, cm, h, labels = state
            head.lm_head.weight.grad = None
            h.grad = None
            cm(h, labels).backward()

        out[label] = measure_device_peak(build, run, steps=3).peak_bytes
    # what the region holds beyond its inputs and the weight's gradient
    floor = (tokens * hidden * 4) * 2 + vocab * hidden * 4 * 2
    out["floor_bytes"] = floor
    out["reduction"] = (out["whole"] - floor) / max(out["chunked"] - floor, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen32k,gpt2")
    ap.add_argument("--executor", default="inductor", choices=["inductor", "fx"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = {}
    for name in args.models.split(","):
        r: dict = {"peaks_mib": {}}
        r["peaks_mib"]["eager"] = peak(name, {"kind": "eager"}) / MiB
        torch_peaks = {f: peak(name, {"kind": "torch", "fraction": f}) for f in TORCH_FRACTIONS}
        for f, v in torch_peaks.items():
            r["peaks_mib"][f"torch min-cut {f}"] = v / MiB
        best_fraction = min(torch_peaks, key=torch_peaks.get)
        torch_lowest = torch_peaks[best_fraction]
        r["torch_lowest_mib"], r["torch_lowest_fraction"] = torch_lowest / MiB, best_fraction
        base = {"executor": args.executor}
        for label, chunks in (("lohan whole", 1), ("lohan chunked", "auto")):
            s = smallest(name, {**base, "loss_chunks": chunks})
            r[f"{label} smallest named_mib"] = s / MiB
            s, measured = lowest(name, {**base, "loss_chunks": chunks}, s)
            r[f"{label} smallest_mib"] = s / MiB
            r["peaks_mib"][f"{label} at its smallest"] = measured / MiB
            r[f"{label} chunked"] = lohan.last_report().graphs[0].pass_report("chunk_loss")["chunked"]
        r["lohan_lowest_over_torch_lowest"] = r["peaks_mib"]["lohan chunked at its smallest"] / r["torch_lowest_mib"]
        at_torch = {**base, "memory_budget": torch_lowest}
        try:
            r["peaks_mib"]["lohan at torch's lowest"] = peak(name, {"kind": "lohan", "options": at_torch}) / MiB
            variants = {"torch": {"kind": "torch", "fraction": best_fraction},
                        "lohan at torch's lowest": {"kind": "lohan", "options": at_torch}}
        except Exception as e:  # noqa: BLE001 - reported
            r["lohan at torch's lowest"] = f"{type(e).__name__}: {e}"
            variants = {"torch": {"kind": "torch", "fraction": best_fraction}}
        if r["lohan whole chunked"] == 0 and r["lohan chunked chunked"]:
            same = int(r["lohan whole smallest_mib"] * MiB)
            for label, chunks in (("whole", 1), ("chunked", "auto")):
                how = {"kind": "lohan", "options": {**base, "loss_chunks": chunks, "memory_budget": same}}
                r["peaks_mib"][f"lohan {label} at the whole plan's smallest"] = peak(name, how) / MiB
                variants[f"lohan {label} at the whole plan's smallest"] = how
        r["step_s"] = timed(name, variants, args.rounds)
        results[name] = r
        print(json.dumps({name: r}, indent=1, default=str), flush=True)
    results["head_region"] = head_region(args.executor)
    print(json.dumps({"head_region": results["head_region"]}, indent=1), flush=True)
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        out = {"commit": commit, "command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "results": results}
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
