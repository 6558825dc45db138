"""Host tier benchmark, each number beside its alternative, measured in one run.

    python bench/host_tier.py [--dir FOLDER] [--ssd-bytes 2GiB] [--copy-bytes 256MiB] [--reps 3]

1. Allocation rate: HostTier (arena blocks as tensors) against torch.empty
   (the c10 allocator), allocate-and-free, for small to large sizes.
2. Copy engine GB/s against a plain ``copy_`` into the same host block, both
   directions (device tier = ordinary CPU memory on this machine).
3. SSD tier read and write GB/s against ``dd`` with direct I/O on the same
   disk (``oflag=direct`` / ``iflag=direct``): both sides bypass the page
   cache; the report says so, or says that the tier fell back to buffered
   I/O. Gate: the SSD tier reaches at least 80% of dd each way.

Every measurement is the best of --reps repetitions (the machine may be
shared: the load average is printed). Exit status 1 if the SSD gate fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lohan_compile.units import format_bytes, parse_bytes  # noqa: E402
from lohan_compile.runtime.hosttier import HostTier  # noqa: E402

GATE = 0.80


def best_of(reps: int, fn) -> float:
    """Shortest wall time of fn() over reps runs."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_alloc(tier: HostTier, reps: int) -> list[tuple[str, float, float, float, float]]:
    """Allocate-and-free rates: in C++ (the allocator itself, as ops see it) and from Python."""
    rows = []
    for nbytes, count in ((4096, 20000), (1 << 20, 20000), (64 << 20, 2000)):
        tier._obj.bench_alloc(nbytes, 10, False)  # map the arenas once
        cpp_ours = min(tier._obj.bench_alloc(nbytes, count, False) for _ in range(reps))
        cpp_torch = min(tier._obj.bench_alloc(nbytes, count, True) for _ in range(reps))

        def py_ours():
            for _ in range(count):
                tier.empty((nbytes,), torch.uint8)

        def py_torch():
            for _ in range(count):
                torch.empty(nbytes, dtype=torch.uint8)

        rows.append((format_bytes(nbytes), count / cpp_ours, count / cpp_torch,
                     count / best_of(reps, py_ours), count / best_of(reps, py_torch)))
    return rows


def bench_copy(nbytes: int, reps: int) -> list[tuple[str, float, float, float, float]]:
    """GB/s of the copy engine with 1 and 2 threads, and of copy_ with torch's threads and with 1."""
    one = HostTier(None, arena_bytes=nbytes, copy_threads=1)
    two = HostTier(None, arena_bytes=nbytes, copy_threads=2)
    try:
        x = torch.randn(nbytes // 4)
        h = one.empty((nbytes // 4,), torch.float32)
        d = torch.empty_like(x)
        h.copy_(x)
        d.copy_(h)  # touch every page first
        rows = []
        for name, dst, src in (("device -> host", h, x), ("host -> device", d, h)):
            t_one = best_of(reps, lambda: one.copy_(dst, src).wait())
            t_two = best_of(reps, lambda: two.copy_(dst, src).wait())
            t_copy = best_of(reps, lambda: dst.copy_(src))  # torch's default intra-op threads
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                t_copy1 = best_of(reps, lambda: dst.copy_(src))
            finally:
                torch.set_num_threads(threads)
            rows.append((name, *(nbytes / t / 1e9 for t in (t_one, t_two, t_copy, t_copy1))))
        return rows
    finally:
        one.close()
        two.close()


def run_dd(args: list[str]) -> float:
    """dd's own GB/s figure (it times the transfer itself)."""
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    m = re.search(r"copied, ([0-9.]+) s, ", out)
    if not m:
        raise RuntimeError(f"cannot read dd's output: {out}")
    nbytes = int(out.split(" bytes")[0].split("\n")[-1].strip())
    return nbytes / float(m.group(1)) / 1e9


def tier_pass(tier, bufs: list, tokens: list, pattern: torch.Tensor, total: int, write: bool) -> float:
    """GB/s of one pass of the SSD tier: host blocks ``bufs`` written to the SSD blocks
    ``tokens``, or read back from them over zeros and checked (block i holds i in its first
    byte, ``pattern`` after its eighth)."""
    if not write:
        for b in bufs:
            b.zero_()
    t0 = time.perf_counter()
    pairs = zip(tokens, bufs) if write else zip(bufs, tokens)
    for ev in [tier.copy_(dst, src) for dst, src in pairs]:
        ev.wait()
    seconds = time.perf_counter() - t0
    if not write:
        for i, b in enumerate(bufs):
            assert int(b[0]) == i and torch.equal(b[8:], pattern[8:]), "SSD round trip corrupted data"
    return total / seconds / 1e9


def bench_ssd(folder: Path, total: int, reps: int) -> dict:
    """SSD tier and dd, interleaved rep by rep (the disk's speed drifts over
    time on a shared machine; interleaving gives both sides the same moments)."""
    block = 256 << 20
    n = max(1, total // block)
    total = n * block
    tier = HostTier(None, ssd_dir=folder, arena_bytes=block)
    try:
        info = tier.ssd
        pattern = torch.randint(0, 255, (block,), dtype=torch.uint8)
        # c10 tensors are not 4096-aligned: direct I/O goes through the I/O threads'
        # staging buffers; host blocks are aligned and padded: read and written in place
        kinds = {
            "device tensors (staged)": [torch.empty(block, dtype=torch.uint8) for _ in range(n)],
            "host blocks (in place)": [tier.empty((block,), torch.uint8) for _ in range(n)],
        }
        tokens = {k: [tier.empty((block,), torch.uint8, where="ssd") for _ in range(n)] for k in kinds}

        def fill(bufs):
            for i, b in enumerate(bufs):
                b.copy_(pattern)
                b[:8] = i  # every block differs

        def ours(kind, write):
            return tier_pass(tier, kinds[kind], tokens[kind], pattern, total, write)

        for bufs in kinds.values():
            fill(bufs)
        dd_file = folder / "dd-bench.bin"
        best: dict[str, float] = {}

        def record(key, value):
            best[key] = max(best.get(key, 0.0), value)

        for _ in range(reps):
            for bs in (4, 64):  # MiB: dd's usual size, and a large one that gives it its best
                record(f"dd{bs} write", run_dd(["if=/dev/zero", f"of={dd_file}", f"bs={bs}M",
                                                 f"count={total // (bs << 20)}", "oflag=direct"]))
            for kind in kinds:
                record(f"{kind} write", ours(kind, True))
            for bs in (4, 64):
                record(f"dd{bs} read", run_dd([f"if={dd_file}", "of=/dev/null", f"bs={bs}M", "iflag=direct"]))
            for kind in kinds:
                record(f"{kind} read", ours(kind, False))
        dd_file.unlink()
        return {"info": info, "total": total, "best": best, "kinds": list(kinds)}
    finally:
        tier.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="folder on the disk to test (default: a temp folder under .)")
    p.add_argument("--ssd-bytes", default="2GiB", help="bytes written and read per SSD pass")
    p.add_argument("--copy-bytes", default="256MiB", help="bytes per copy")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None, help="write the figures as JSON")
    p.add_argument("--png", default=None, help="plot them (needs matplotlib)")
    a = p.parse_args()
    result: dict = {"command": " ".join(sys.argv), "alloc": [], "copy": [], "ssd": {}}
    print(f"command: python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tier = HostTier(None, arena_bytes="512MiB")
    print()

    print("1. allocation rate (allocate + free of a tensor), allocations per second")
    print(f"   {'':>10} {'in C++ (what the ops pay)':>38}   {'from Python':>34}")
    print(f"   {'size':>10} {'host tier':>12} {'at::empty':>12} {'ratio':>7}   "
          f"{'HostTier.empty':>14} {'torch.empty':>12} {'ratio':>6}")
    for size, c_ours, c_torch, p_ours, p_torch in bench_alloc(tier, a.reps):
        result["alloc"].append({"size": size, "cpp_host_tier": c_ours, "cpp_at_empty": c_torch,
                                "py_host_tier": p_ours, "py_torch_empty": p_torch})
        print(f"   {size:>10} {c_ours:>12,.0f} {c_torch:>12,.0f} {c_ours / c_torch:>6.2f}x   "
              f"{p_ours:>14,.0f} {p_torch:>12,.0f} {p_ours / p_torch:>5.2f}x")

    default_threads = tier.copy_threads
    tier.close()
    nbytes = parse_bytes(a.copy_bytes)
    print(f"\n2. copies of {format_bytes(nbytes)}, GB/s (the engine's default here: {default_threads} thread(s))")
    print(f"   {'direction':>15} {'engine 1 thr':>13} {'engine 2 thr':>13} {'copy_':>7} {'copy_ 1 thr':>12}"
          f" {'ratio (same threads)':>21}")
    for name, e1, e2, cp, cp1 in bench_copy(nbytes, a.reps):
        result["copy"].append({"direction": name, "engine_1_thread": e1, "engine_2_threads": e2,
                               "copy_": cp, "copy_1_thread": cp1})
        print(f"   {name:>15} {e1:>13.2f} {e2:>13.2f} {cp:>7.2f} {cp1:>12.2f}"
              f" {e1 / cp1:>9.2f}x / {e2 / cp:>5.2f}x")
    # preparing SSD test data needs no intra-op parallelism (and a shared 2-core
    # machine makes OpenMP barriers slow); the SSD numbers do not depend on it
    torch.set_num_threads(1)

    base = Path(a.dir) if a.dir else Path.cwd()
    folder = Path(tempfile.mkdtemp(prefix="lohan-bench-", dir=base))
    try:
        r = bench_ssd(folder, parse_bytes(a.ssd_bytes), a.reps)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    info, best = r["info"], r["best"]
    dd_w = max(best["dd4 write"], best["dd64 write"])  # the better dd, for the ratios and the gate
    dd_r = max(best["dd4 read"], best["dd64 read"])
    print(f"\n3. SSD tier on {base} ({format_bytes(r['total'])} per pass, best of {a.reps} interleaved reps), GB/s")
    print(f"   SSD tier I/O: {info.io_mode}; {info.threads} I/O threads, {format_bytes(info.chunk_bytes)} chunks")
    print("   dd: oflag=direct / iflag=direct (bypasses the page cache); "
          f"bs=4M write {best['dd4 write']:.2f} read {best['dd4 read']:.2f}, "
          f"bs=64M write {best['dd64 write']:.2f} read {best['dd64 read']:.2f}; ratios use the better dd")
    if not info.direct_io:
        print("   NOTE: the SSD tier used BUFFERED I/O (non-direct fallback): its reads may come from the page cache")
    print(f"   {'source':>24} {'write':>7} {'dd write':>9} {'ratio':>6} {'read':>7} {'dd read':>8} {'ratio':>6}")
    ok = True
    for kind in r["kinds"]:
        w, rd = best[f"{kind} write"], best[f"{kind} read"]
        ok &= w >= GATE * dd_w and rd >= GATE * dd_r
        print(f"   {kind:>24} {w:>7.2f} {dd_w:>9.2f} {w / dd_w:>5.0%} {rd:>7.2f} {dd_r:>8.2f} {rd / dd_r:>5.0%}")
    print(f"\n   gate (SSD tier >= {GATE:.0%} of dd, both ways, every source): {'PASS' if ok else 'FAIL'}")
    result["ssd"] = {"io_mode": info.io_mode, "best_gb_per_s": best, "gate_pass": ok}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {a.json}")
    if a.png:
        _plot(result, a.png)
    return 0 if ok else 1


def _plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'lohan_compile[plot]'): no PNG")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    copies = result["copy"]
    x = range(len(copies))
    for i, (key, label) in enumerate((("engine_2_threads", "copy engine"), ("copy_", "tensor.copy_"))):
        axes[0].bar([j + 0.4 * i for j in x], [c[key] for c in copies], 0.4, label=label)
    axes[0].set_xticks([j + 0.2 for j in x], [c["direction"] for c in copies], fontsize=7)
    axes[0].set_ylabel("GB/s")
    axes[0].set_title("copies")
    axes[0].legend()
    best = result["ssd"]["best_gb_per_s"]
    names = list(best)
    axes[1].barh(names, [best[k] for k in names])
    axes[1].set_xlabel("GB/s (best of reps)")
    axes[1].set_title(f"SSD tier ({result['ssd']['io_mode']}) against dd")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
