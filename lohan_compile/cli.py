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


def byte_tokenizer():
    """A Hugging Face tokenizer with one token per byte (256) and a pad and an end-of-text token,
    for the shipped corpus where nothing can be downloaded (TRL's trainers want a tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<|pad|>": 256, "<|endoftext|>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: each byte its own token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>")


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


_CPU_SIZES = {"layers": 4, "hidden": 128, "batch": 8, "seq": 256}
_GPU_SIZES = {"layers": 8, "hidden": 512, "batch": 16, "seq": 512}


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
    from .units import format_bytes

    if not 0.0 < args.budget <= 1.0:
        sys.exit(f"--budget {args.budget}: give a fraction of the unplanned peak in (0, 1]")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    # a GPU gets a wider model: at the CPU's size its fixed memory (cuBLAS workspaces, tens of
    # MiB that no plan can move) would be a third of the peak, and its step a few launches
    sizes = _GPU_SIZES if device == "cuda" else _CPU_SIZES
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
            inner = lohan.BudgetError.within(e)
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
    from .units import format_bytes

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
        import torch

        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda" and not torch.cuda.is_available():
            sys.exit("lohan hw --device cuda: torch sees no CUDA device here")
        profile = hardware.auto(refresh=not args.cached, device=dev)
        what = "this machine's GPU" if dev == "cuda" else "this machine's CPU standing in for a GPU"
        where = (f"measured on {what}, saved to {hardware.cache_path(dev)} "
                 f"(used by hardware='auto' for graphs on the {'GPU' if dev == 'cuda' else 'CPU'})")
    if args.json:
        print(json.dumps(profile.to_json(), indent=2))
        return 0
    print(f"HardwareProfile {profile.name!r}, {where}\n")
    print(tabulate(_profile_rows(profile), headers=["", "value"]))
    return 0


def plan(args: argparse.Namespace) -> int:
    """Plan a model's training step for described hardware, without that hardware."""
    import json

    from tabulate import tabulate

    from . import wholestep, zoo
    from .hardware import preset
    from .units import format_bytes, parse_bytes

    try:
        spec = zoo.model_spec(args.model)
        hw = preset(args.hardware or args.gpu or "rtx4090")
        if args.hardware and args.gpu:
            g = preset(args.gpu)
            hw = hw.with_(matmul_flops=g.matmul_flops, memory_bandwidth=g.memory_bandwidth,
                          d2h_bandwidth=g.d2h_bandwidth, h2d_bandwidth=g.h2d_bandwidth,
                          device_memory=g.device_memory, name=f"{hw.name}+{g.name}")
        if args.host_memory:
            hw = hw.with_(host_memory=parse_bytes(args.host_memory, name="--host-memory"))
        if args.ssd_count is not None:
            hw = hw.with_(ssd_count=args.ssd_count)
        if args.ssd_bandwidth:
            read = parse_bytes(args.ssd_bandwidth, name="--ssd-bandwidth")
            ratio = hw.ssd_write_bandwidth / hw.ssd_read_bandwidth if hw.ssd_read_bandwidth else 0.5
            hw = hw.with_(ssd_read_bandwidth=float(read), ssd_write_bandwidth=read * ratio)
        if hw.host_memory is None:
            raise ValueError(f"--gpu {hw.name} says nothing of the host: give --host-memory (e.g. 256GB), or "
                             "--hardware lohan-testbed for a whole machine")
        if hw.ssd_count and not hw.ssd_read_bandwidth:
            raise ValueError("--ssd-count needs --ssd-bandwidth (read bandwidth of one SSD, e.g. 6.5GB)")
        zoo.check_seq(spec, args.seq)
        budget = parse_bytes(args.budget, name="--budget") if args.budget else hw.device_memory
        if args.gpus < 1:
            raise ValueError(f"--gpus must be at least 1, got {args.gpus}")
        if args.gpus > 1 and args.policy in wholestep.BASELINES:
            raise ValueError(f"the {args.policy} baseline is modeled on one GPU only: drop --gpus, or plan "
                             f"lohan's policies ({', '.join(wholestep.POLICIES)}, all)")
    except ValueError as e:
        print(f"lohan plan: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    traced = wholestep.trace(spec, args.batch, args.seq, hw)
    step = wholestep.WholeStep(traced, hw, budget, gpus=args.gpus)
    baselines = wholestep.BASELINES if args.gpus == 1 else ()
    policies = list(wholestep.POLICIES + baselines) if args.policy == "all" else [args.policy]
    offload = {"auto": "auto", "on": True, "off": False}[args.offload_params]
    plans = [step.plan(p, offload) for p in policies]
    plan_s = time.perf_counter() - start
    result = plans[0]
    if args.json:
        out = {
            "model": spec.name, "parameters": spec.parameters(), "hardware": hw.name, "gpus": args.gpus,
            "batch": args.batch, "global_batch": args.batch * args.gpus,
            "seq": args.seq, "budget_bytes": budget, "planning_s": plan_s,
            "tflops_convention": "6 x parameters x tokens per step / step time; recomputation not counted",
            "feasible": result.feasible, "predicted_step_s": result.step_s, "predicted_tflops": result.tflops,
            "peak_device_bytes": result.peaks.get("device"), "peak_host_bytes": result.peaks.get("host"),
            "peak_ssd_bytes": result.peaks.get("ssd"), "policy": result.policy, "why": result.why,
            "traffic_bytes": result.traffic, "offload_params": result.offload_params,
            "policies": [q.to_json() for q in plans],
        }
        print(json.dumps(out, indent=2))
        return 0 if result.feasible else 1
    per_gpu = f" per GPU (global batch {args.batch * args.gpus})" if args.gpus > 1 else ""
    print(f"{spec.name}: {spec.parameters() / 1e9:.2f}B parameters ({spec.source}); batch {args.batch} x {args.seq} "
          f"tokens{per_gpu}, {str(traced.dtype).replace('torch.', '')}")
    if args.gpus > 1:
        link = (f"an interconnect of {hw.interconnect_bandwidth / 1e9:.0f} GB/s" if hw.interconnect_bandwidth
                else "host memory over each GPU's PCIe link")
        print(f"{args.gpus} GPUs, data parallel: each rank updates 1/{args.gpus} of the optimizer state with "
              f"1/{args.gpus} of the CPU, host memory and SSD bandwidth; gradients all-reduced through {link}; "
              "peaks and traffic below are one rank's, TFLOPS the server's")
    print(f"hardware {hw.name}: device {format_bytes(hw.device_memory)} (budget {format_bytes(budget)}, of which "
          f"{format_bytes(wholestep.CONTEXT_BYTES)} CUDA context and workspaces), host "
          f"{format_bytes(hw.host_memory)}, {hw.ssd_count} SSD(s), CPU AdamW {hw.cpu_adam_params_per_s / 1e9:.1f}G "
          f"parameters/s; planned in {plan_s:.1f} s\n")
    rows = []
    for q in plans:
        if q.step_s is None:
            rows.append([q.policy, "no", "", "", "", "", "", q.why])
            continue
        rows.append([q.policy, "yes" if q.feasible else "no", f"{q.step_s:.2f}", f"{q.tflops:.1f}",
                     format_bytes(q.peaks["device"]), format_bytes(q.peaks["host"]), format_bytes(q.peaks["ssd"]),
                     q.why])
    print(tabulate(rows, headers=["policy", "feasible", "step s", "TFLOPS", "device peak", "host peak", "SSD", "why / bottleneck"]))
    if result.step_s is not None:
        print("\ntraffic per step (" + result.policy + "): " + ", ".join(
            f"{k} {format_bytes(v)}" for k, v in result.traffic.items()))
        moved = {k: v for k, v in result.actions.items() if v != "keep"}
        print(f"weights streamed: {'yes' if result.offload_params else 'no'}; block values moved: "
              + (", ".join(f"{k} {v}" for k, v in sorted(moved.items())) or "none"))
    print("TFLOPS: 6 x parameters (of a mixture of experts: active) x tokens / predicted step time "
          "(recomputation not counted)")
    return 0 if result.feasible else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lohan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"lohan_compile {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fine-tune a small model through lohan and show what it decided")
    p.add_argument("--model", choices=["auto", "hf", "builtin"], default="auto",
                   help="Hugging Face LLaMA when transformers is installed (auto), or the built-in one")
    p.add_argument("--layers", type=int, default=None, help="default 4 on the CPU, 8 on a GPU")
    p.add_argument("--hidden", type=int, default=None, help="default 128 on the CPU, 512 on a GPU")
    p.add_argument("--batch", type=int, default=None, help="default 8 on the CPU, 16 on a GPU")
    p.add_argument("--seq", type=int, default=None, help="default 256 on the CPU, 512 on a GPU")
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
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="measure the GPU (default when there is one) or the CPU stand-in")
    p.set_defaults(func=hw)
    p = sub.add_parser("plan", help="plan a model's training step on described hardware (no GPU needed)")
    p.add_argument("--model", required=True,
                   help="a preset (gpt3-1.3b ... gpt3-13b, gpt3-175b, llama2-7b/13b/70b, opt-13b/30b) or a config.json")
    p.add_argument("--gpu", help="GPU preset: rtx4090 (default), a100, h100")
    p.add_argument("--hardware", help="whole-machine preset (lohan-testbed); --gpu and the flags below override it")
    p.add_argument("--host-memory", help="host memory for the host tier, e.g. 256GB")
    p.add_argument("--ssd-count", type=int)
    p.add_argument("--ssd-bandwidth", help="read bandwidth of one SSD, e.g. 6.5GB (per second)")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--budget", help="device memory budget per GPU (default: the GPU's memory)")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs in the server, data parallel (--batch is per GPU); they share its host memory, CPU and SSDs")
    p.add_argument("--policy", default="auto",
                   choices=["auto", "keep-all", "swap-all", "recompute-all", "zero-infinity", "zero-offload", "all"])
    p.add_argument("--offload-params", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=plan)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
