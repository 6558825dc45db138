"""CPU optimizer step: lohan's fused CPUAdamW against torch, side by side in one run.

    python bench/optimizer.py [--params 40e6] [--rounds 15] [--threads N] [--json PATH]

Columns, all with the same thread count and the same tensor layout (a
transformer-like mix of large matrices and small vectors, ``--params``
elements in all):

  fp32   torch.optim.AdamW(fused=True)            vs  CPUAdamW, fp32 params and grads
  bf16   torch: bf16 grads copied into preallocated fp32 grads of fp32 masters,
         fused AdamW, masters copied out to the bf16 weights (per-tensor copy_
         and _foreach_copy_ are both timed; the faster is the baseline)
                                                  vs  CPUAdamW, bf16 params and grads,
                                                      fp32 master and moments in its state
  triad  in-place a += s*b over fp32 buffers of --params elements each: this
         machine's memory bandwidth, measured in the same run
  DeepSpeed's CPU Adam (``deepspeed.ops.adam.DeepSpeedCPUAdam``, fp32, AdamW mode): a
         third fp32 column where the ``deepspeed`` package is installed and its C++ op builds
         here (``pip install deepspeed``; the op compiles on first use); else skipped, saying why

Every round runs every column once, in an order that rotates from round to
round; the figures are medians over rounds (the fastest round of each column
is shown too: on a shared machine it is the least disturbed one). GB/s counts the bytes each step
must move (fp32: 16 read + 12 written per element; bf16 fused: 2+4+4+4 read,
4+4+4+2 written; the torch bf16 pipeline adds the copies: 40 per element),
not cache-line write-allocate traffic. Results go to stdout as a table and to
``--json``.

Gates (issue 27): fp32 at least 0.98x the faster of torch fused and DeepSpeed's CPU Adam
(torch fused alone where DeepSpeed is not there); bf16 at least 1.55x the fastest torch
pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lohan_compile as lohan  # noqa: E402
from lohan_compile import adam_ops  # noqa: E402

FP32_GATE = 0.98
BF16_GATE = 1.55

BYTES_FP32 = 28  # p, g, m, v read (16), p, m, v written (12)
BYTES_BF16_FUSED = 28  # bf16 g, fp32 master, m, v read (14); master, m, v, bf16 w written (14)
BYTES_BF16_TORCH = 40  # copy-in 2r+4w, fused AdamW 28, copy-out 4r+2w
BYTES_TRIAD = 12  # a, b read, a written


def layout(total: int) -> list[tuple[int, ...]]:
    """Shapes of a transformer-like model with about ``total`` elements.

    Blocks of hidden size h: QKV (3h x h), out proj (h x h), MLP up/down
    (4h x h, h x 4h), two norms and biases; plus an embedding. h=1024 gives
    about 12.6M per block.
    """
    h = 1024
    block = [(3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (4 * h, h), (4 * h,), (h, 4 * h),
             (h,), (h,), (h,)]
    per_block = sum(_numel(s) for s in block)
    blocks = total // per_block
    shapes: list[tuple[int, ...]] = [(max(1, (total - blocks * per_block) // h), h)]
    for _ in range(blocks):
        shapes.extend(block)
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def make_params(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.02).to(dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3).to(dtype)
    return ps


def deepspeed_cpu_adam():
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore
    except Exception as e:  # noqa: BLE001 (any import failure means: not usable here)
        return None, f"not installed ({type(e).__name__}: {e})"
    return DeepSpeedCPUAdam, "installed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=40e6, help="elements in all (default 40e6)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "optimizer.json"))
    ap.add_argument("--png", default=None, help="also plot GB/s per column (needs matplotlib)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    shapes = layout(int(args.params))
    n = sum(_numel(s) for s in shapes)
    lr, wd = 1e-4, 0.01

    # fp32 columns
    t32 = make_params(shapes, torch.float32, 0)
    l32 = make_params(shapes, torch.float32, 0)
    torch_fused = torch.optim.AdamW(t32, lr=lr, weight_decay=wd, fused=True)
    ours32 = lohan.CPUAdamW(l32, lr=lr, weight_decay=wd, num_threads=args.threads)

    # bf16 columns: the model's weights and gradients are bf16 in both.
    tb_weights = make_params(shapes, torch.bfloat16, 1)
    masters = [torch.nn.Parameter(w.detach().float()) for w in tb_weights]
    for m in masters:
        m.grad = torch.empty_like(m)  # preallocated fp32 gradients
    tb_grads = [w.grad for w in tb_weights]
    torch_bf16_opt = torch.optim.AdamW(masters, lr=lr, weight_decay=wd, fused=True)
    lb = make_params(shapes, torch.bfloat16, 1)
    ours_bf16 = lohan.CPUAdamW(lb, lr=lr, weight_decay=wd, num_threads=args.threads)

    master_grads = [m.grad for m in masters]
    masters_data = [m.detach() for m in masters]
    weights_data = [w.detach() for w in tb_weights]

    def torch_bf16_foreach():
        torch._foreach_copy_(master_grads, tb_grads)
        torch_bf16_opt.step()
        torch._foreach_copy_(weights_data, masters_data)

    def torch_bf16_loop():
        for mg, g in zip(master_grads, tb_grads):
            mg.copy_(g)
        torch_bf16_opt.step()
        for w, m in zip(weights_data, masters_data):
            w.copy_(m)

    ta = torch.randn(n)
    tb = torch.randn(n)

    def triad():
        ta.add_(tb, alpha=1e-3)

    ds_cls, ds_status = deepspeed_cpu_adam()
    columns = {
        "torch_fused_fp32": torch_fused.step,
        "lohan_fp32": ours32.step,
        "torch_bf16_foreach_copy": torch_bf16_foreach,
        "torch_bf16_loop_copy": torch_bf16_loop,
        "lohan_bf16": ours_bf16.step,
        "triad": triad,
    }
    if ds_cls is not None:
        d32 = make_params(shapes, torch.float32, 0)
        ds = ds_cls(d32, lr=lr, weight_decay=wd, adamw_mode=True)
        columns["deepspeed_fp32"] = ds.step

    for f in columns.values():  # warm up: state allocation, page faults
        f()
    # Other processes on the machine skew every column (torch's OpenMP
    # barriers most of all): measure how busy they kept the cores.
    busy0, own0, wall0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
    names = list(columns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            columns[k]()
            times[k].append(time.perf_counter() - t0)

    other_cores = ((_machine_busy_s() - busy0) - (_own_cpu_s() - own0)) / (time.perf_counter() - wall0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    torch_bf16_best = min(("torch_bf16_foreach_copy", "torch_bf16_loop_copy"), key=med.__getitem__)
    triad_gbs = BYTES_TRIAD * n / med["triad"] / 1e9

    def gbs(k, per_elem):
        return per_elem * n / med[k] / 1e9

    rows = [
        ("torch_fused_fp32", BYTES_FP32),
        ("lohan_fp32", BYTES_FP32),
        ("torch_bf16_foreach_copy", BYTES_BF16_TORCH),
        ("torch_bf16_loop_copy", BYTES_BF16_TORCH),
        ("lohan_bf16", BYTES_BF16_FUSED),
        ("triad", BYTES_TRIAD),
    ]
    if "deepspeed_fp32" in med:
        rows.insert(2, ("deepspeed_fp32", BYTES_FP32))
    fp32_rival = min((k for k in ("torch_fused_fp32", "deepspeed_fp32") if k in med), key=med.__getitem__)
    speed_fp32 = med[fp32_rival] / med["lohan_fp32"]
    speed_bf16 = med[torch_bf16_best] / med["lohan_bf16"]
    result = {
        "machine": {
            "cpu": _cpu_name(),
            "isa": adam_ops.resolve_isa(),
            "supported_isas": adam_ops.supported_isas(),
            "threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "params": n,
        "tensors": len(shapes),
        "rounds": args.rounds,
        "median_s": med,
        "best_s": best,
        "round_s": times,
        "bytes_per_element": dict(rows),
        "gb_per_s": {k: gbs(k, b) for k, b in rows},
        "bandwidth_share": {k: gbs(k, b) / triad_gbs for k, b in rows if k != "triad"},
        "torch_bf16_baseline": torch_bf16_best,
        "fp32_baseline": fp32_rival,
        "speedup": {"fp32_vs_torch_fused": med["torch_fused_fp32"] / med["lohan_fp32"],
                    **({"fp32_vs_deepspeed": med["deepspeed_fp32"] / med["lohan_fp32"]} if "deepspeed_fp32" in med else {}),
                    "fp32_vs_faster": speed_fp32, "bf16_vs_torch_pipeline": speed_bf16},
        "gates": {
            "fp32": {"need": FP32_GATE, "got": speed_fp32, "pass": speed_fp32 >= FP32_GATE},
            "bf16": {"need": BF16_GATE, "got": speed_bf16, "pass": speed_bf16 >= BF16_GATE},
        },
        "deepspeed": ds_status,
        "other_processes_cores_busy": other_cores,
        "cores": os.cpu_count(),
        "command": " ".join(["python", "bench/" + Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "commit": _commit(),
    }

    print(f"{n / 1e6:.1f}M parameters in {len(shapes)} tensors, {args.threads} threads, "
          f"{args.rounds} interleaved rounds, medians; kernel ISA {result['machine']['isa']}")
    print(f"{'column':26s} {'ms':>8s} {'best ms':>8s} {'B/elem':>7s} {'GB/s':>7s} {'of triad':>9s}")
    for k, b in rows:
        share = "" if k == "triad" else f"{100 * gbs(k, b) / triad_gbs:8.0f}%"
        print(f"{k:26s} {med[k] * 1e3:8.1f} {best[k] * 1e3:8.1f} {b:7d} {gbs(k, b):7.1f} {share:>9s}")
    print(f"DeepSpeed CPU Adam: {ds_status}")
    print(f"other processes kept {other_cores:.2f} of {os.cpu_count()} cores busy during the rounds"
          + (" (figures are noisy)" if other_cores > 0.1 else ""))
    best_bf16 = min(best["torch_bf16_foreach_copy"], best["torch_bf16_loop_copy"])
    print(f"best rounds (least disturbed): fp32 {best[fp32_rival] / best['lohan_fp32']:.2f}x, "
          f"bf16 {best_bf16 / best['lohan_bf16']:.2f}x")
    print(f"fp32: lohan {speed_fp32:.2f}x the faster of the others ({fp32_rival}) (gate {FP32_GATE}x: "
          f"{'pass' if speed_fp32 >= FP32_GATE else 'FAIL'})")
    print(f"bf16: lohan {speed_bf16:.2f}x the fastest torch pipeline ({torch_bf16_best}) "
          f"(gate {BF16_GATE}x: {'pass' if speed_bf16 >= BF16_GATE else 'FAIL'})")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if args.png:
        _plot(result, args.png)
    return 0


def _plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lohan_compile[plot]'): no PNG")
        return
    names = list(result["gb_per_s"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names, [result["gb_per_s"][k] for k in names],
            color=["tab:orange" if k.startswith("lohan") else "tab:gray" for k in names])
    ax.set_xlabel("GB/s of memory traffic (median)")
    ax.set_title(f"AdamW step, {result['params'] / 1e6:.0f}M parameters, {result['machine']['threads']} threads")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _commit() -> str:
    """The checkout's commit, or "unknown" where git or the checkout is not there."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _machine_busy_s() -> float:
    """CPU seconds all processes have spent busy (user, system, irq, steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
