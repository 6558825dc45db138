"""What lohan's pipeline costs when it has nothing to move.

Side by side in one process, on the CPU: compile time and training-step time
of ``backend="lohan"`` (fx executor, full pass pipeline, step tracking)
against torch's ``aot_eager`` (same AOTAutograd, default partitioner, plain
fx) on a small Hugging Face LLaMA. Step times are medians over interleaved
rounds. Prints a table and ratios (lohan / aot_eager).

    python bench/overhead.py [--layers 4] [--seq 256] [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg)


def step(cm, ids):
    loss = cm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    base = build(args.layers)
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    backends = {"aot_eager": "aot_eager", "lohan": "lohan"}
    # One-time process warm-up (dynamo, AOTAutograd, transformers imports) is not either backend's cost.
    tiny = build(1)
    for backend in backends.values():
        step(torch.compile(copy.deepcopy(tiny), backend=backend), ids[:, :16])
    torch._dynamo.reset()
    compiled, compile_s = {}, {}
    for name, backend in backends.items():
        model = copy.deepcopy(base)
        cm = torch.compile(model, backend=backend)
        start = time.perf_counter()
        step(cm, ids)  # first call: dynamo + AOTAutograd + passes (+ lazy backward compile)
        compile_s[name] = time.perf_counter() - start
        compiled[name] = (cm, model)

    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(args.rounds):
        for name in backends:  # interleaved, so drift hits both alike
            cm, model = compiled[name]
            start = time.perf_counter()
            step(cm, ids)
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)

    med = {name: statistics.median(v) for name, v in times.items()}
    from tabulate import tabulate

    rows = [[name, f"{compile_s[name]:.2f}", f"{med[name] * 1e3:.1f}"] for name in backends]
    print(tabulate(rows, headers=["backend", "first call (s)", "step median (ms)"]))
    result = {
        "step_ratio_lohan_over_aot_eager": med["lohan"] / med["aot_eager"],
        "compile_ratio_lohan_over_aot_eager": compile_s["lohan"] / compile_s["aot_eager"],
        "step_median_s": med,
        "first_call_s": compile_s,
        "args": vars(args),
    }
    print(f"\nstep time lohan / aot_eager: {result['step_ratio_lohan_over_aot_eager']:.3f}")
    print(f"first call lohan / aot_eager: {result['compile_ratio_lohan_over_aot_eager']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    from lohan_compile import settings

    with settings.EXECUTOR.override("fx"):  # lohan's pipeline against aot_eager: both run plain fx
        main()
