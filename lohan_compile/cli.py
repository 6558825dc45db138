"""The ``lohan`` command line.

``lohan demo`` fine-tunes a small LLaMA-architecture model on a small corpus
under a memory budget of half its unplanned peak, with gradients offloaded to
the CPU optimizer, and shows what the compiler decided.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

from . import __version__


def corpus() -> bytes:
    """The small English corpus shipped with the package (byte-level tokens)."""
    from importlib.resources import files

    return files("lohan_compile").joinpath("data/corpus.txt").read_bytes()


def _demo_model(name: str, layers: int, hidden: int):
    """A LLaMA-architecture model over bytes: Hugging Face's when installed, else the built-in one."""
    if name in ("auto", "hf"):
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            if name == "hf":
                sys.exit("lohan demo --model hf needs transformers: pip install 'lohan_compile[hf]'")
        else:
            cfg = LlamaConfig(
                vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=1024, tie_word_embeddings=False,
            )
            return LlamaForCausalLM(cfg), "Hugging Face LlamaForCausalLM"
    from .tinyllama import TinyLlama

    return TinyLlama(vocab=256, d=hidden, layers=layers, hidden=int(hidden * 2.6875)), "built-in TinyLlama"


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _progress(step: int, total: int, loss: float, width: int = 30) -> None:
    done = int(width * step / total)
    end = "\n" if step == total or not sys.stdout.isatty() else ""
    if sys.stdout.isatty() or step == total or step % max(1, total // 10) == 0:
        print(f"\r  [{'#' * done}{'.' * (width - done)}] step {step}/{total}  loss {loss:.4f}", end=end, flush=True)


def demo(args: argparse.Namespace) -> int:
    import torch

    import lohan_compile as lohan
    from .options import format_bytes

    if not 0.0 < args.budget <= 1.0:
        sys.exit(f"--budget {args.budget}: give a fraction of the unplanned peak in (0, 1]")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.manual_seed(args.seed)
    model, source = _demo_model(args.model, args.layers, args.hidden)
    model.to(device)
    text = torch.tensor(list(corpus()), dtype=torch.long)
    g = torch.Generator().manual_seed(args.seed)

    def batch():
        starts = torch.randint(0, len(text) - args.seq - 1, (args.batch,), generator=g)
        return torch.stack([text[s : s + args.seq] for s in starts.tolist()]).to(device)

    n_params = sum(p.numel() for p in model.parameters())
    where = "GPU" if device == "cuda" else "CPU standing in for the GPU"
    print(f"lohan demo: {source}, {args.layers} layers, {n_params / 1e6:.2f}M parameters, on the {where}")
    print(f"  {len(text)} bytes of English, batch {args.batch} x {args.seq} tokens, {args.steps} steps")

    # 1. the unplanned peak: the same step with every saved activation kept, gradients on the device
    t0 = time.perf_counter()
    probe = copy.deepcopy(model)
    # (plain fx: only its peak is wanted, and Inductor would compile it for tens of seconds)
    _loss(torch.compile(probe, backend="lohan", options={"policy": "keep-all", "executor": "fx"}),
          batch()).backward()
    unplanned = lohan.last_report().summary()["measured_peak_bytes"]
    del probe
    budget = int(args.budget * unplanned)
    print(f"  unplanned peak {format_bytes(unplanned)} (keep-all, gradients on the device); "
          f"budget {args.budget:.0%} of it: {format_bytes(budget)}")

    # 2. the same model under the budget, gradients offloaded to CPUAdamW, clipping on
    opt = lohan.CPUAdamW(model.parameters(), lr=args.lr, weight_decay=0.01, max_grad_norm=1.0)
    options = {"memory_budget": budget, "optimizer": opt}
    if args.executor is not None:
        options["executor"] = args.executor
    cm = torch.compile(model, backend="lohan", options=options)
    losses, peaks, tokens, train_s = [], [], 0, 0.0
    print("training:")
    for step in range(1, args.steps + 1):
        ids = batch()
        start = time.perf_counter()
        try:
            loss = _loss(cm, ids)
            loss.backward()
        except Exception as e:  # torch wraps errors raised while compiling
            inner = e
            while inner is not None and not isinstance(inner, lohan.BudgetError):
                inner = inner.__cause__ or inner.__context__
            if inner is None:
                raise
            print(f"\n{inner}\nTry a larger --budget.")
            return 1
        opt.step()
        opt.zero_grad()
        if step > 1:  # the first step compiles
            train_s += time.perf_counter() - start
            tokens += ids.numel()
        losses.append(loss.item())
        peaks.append(lohan.last_report().summary()["measured_peak_bytes"])
        _progress(step, args.steps, losses[-1])
    opt.synchronize()
    report = lohan.last_report()
    s = report.summary()
    print("\nthe plan (lohan.last_report().plan_table()):\n")
    print(report.plan_table(limit=10))
    print("\nthe last step (lohan.last_report().to_table()):\n")
    print(report.to_table())
    from tabulate import tabulate

    k = max(1, args.steps // 6)
    print("\nloss:", "  ".join(f"step {i + 1}: {x:.3f}" for i, x in list(enumerate(losses))[::k]),
          f"  step {len(losses)}: {losses[-1]:.3f}")
    peak = max(peaks)
    print()
    print(tabulate([
        ["device peak (unplanned: keep-all, gradients on the device)", format_bytes(unplanned), "100%"],
        ["memory budget", format_bytes(budget), f"{budget / unplanned:.0%}"],
        ["device peak under lohan (largest of all steps)", format_bytes(peak), f"{peak / unplanned:.0%}"],
        ["activations swapped to the host per step", format_bytes(s["swapped_bytes"]), ""],
        ["activations recomputed per step", format_bytes(s["recomputed_bytes"]), ""],
        ["device -> host / host -> device per step", f"{format_bytes(s['d2h_bytes'])} / {format_bytes(s['h2d_bytes'])}", ""],
    ], tablefmt="simple"))
    rate = tokens / train_s if train_s else float("nan")
    print(f"\n{rate:,.0f} tokens/s over steps 2-{args.steps}; whole demo {time.perf_counter() - t0:.0f} s "
          "(compiles included)")
    ok = peak <= 1.05 * budget and losses[-1] < losses[0]
    if not ok:
        print("unexpected: the peak exceeded the budget or the loss did not go down")
    return 0 if ok else 1


def _profile_rows(profile) -> list[list[str]]:
    from .options import format_bytes

    def rate(v: float) -> str:
        return f"{v / 1e9:.2f} GB/s" if v else "-"

    rows = [
        ["matmul throughput", f"{profile.matmul_flops / 1e12:.3f} TFLOP/s"],
        ["device memory bandwidth", rate(profile.memory_bandwidth)],
        ["device -> host", rate(profile.d2h_bandwidth)],
        ["host -> device", rate(profile.h2d_bandwidth)],
        ["full duplex", str(profile.full_duplex)],
        ["device memory", format_bytes(profile.device_memory)],
        ["host memory bandwidth", rate(profile.host_memory_bandwidth)],
        ["host memory", format_bytes(profile.host_memory) if profile.host_memory else "-"],
        ["CPU AdamW", f"{profile.cpu_adam_params_per_s / 1e9:.3f} G parameters/s"],
        ["SSDs", f"{profile.ssd_count} x read {rate(profile.ssd_read_bandwidth)}, write "
                 f"{rate(profile.ssd_write_bandwidth)}" if profile.ssd_count else "-"],
        ["fixed cost per op", f"{profile.op_overhead_s * 1e6:.1f} us"],
    ]
    for name, slow in sorted(profile.compute_slowdown.items()):
        rows.append([f"compute while {name} copies run", f"{1 + slow:.2f}x as long"])
    for name, slow in sorted(profile.queue_slowdown.items()):
        rows.append([f"{name} copies while compute runs", f"{1 + slow:.2f}x as long"])
    return rows


def hw(args: argparse.Namespace) -> int:
    """Measure this machine (or show a preset) and print its HardwareProfile."""
    import json

    from tabulate import tabulate

    from . import hardware

    if args.preset:
        profile = hardware.preset(args.preset)
        where = f"preset {profile.name}: {profile.source}"
    else:
        profile = hardware.auto(refresh=not args.cached)
        where = f"measured on this machine, saved to {hardware.cache_path()} (used by hardware='auto')"
    if args.json:
        print(json.dumps(profile.to_json(), indent=2))
        return 0
    print(f"HardwareProfile {profile.name!r}, {where}\n")
    print(tabulate(_profile_rows(profile), headers=["", "value"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lohan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"lohan_compile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fine-tune a small model through lohan and show what it decided")
    p.add_argument("--model", choices=["auto", "hf", "builtin"], default="auto",
                   help="Hugging Face LLaMA when transformers is installed (auto), or the built-in one")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--budget", type=float, default=0.5, help="memory budget as a fraction of the unplanned peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    p.add_argument("--executor", choices=["inductor", "fx"], default=None,
                   help="how lohan runs the compute (default: Inductor, or LOHAN_EXECUTOR)")
    p.set_defaults(func=demo)
    p = sub.add_parser("hw", help="measure this machine's HardwareProfile, print it and save it")
    p.add_argument("--preset", help="print a preset instead (rtx4090, a100, h100, lohan-testbed)")
    p.add_argument("--cached", action="store_true", help="print the saved profile when there is one")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.set_defaults(func=hw)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
