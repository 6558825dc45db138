"""Many threads on one tier at once: allocations, copies and SSD traffic under a
budget, every byte checked, the books balanced at the end. (The same kind of
load runs under ASan and TSan in scripts/sanitize.sh, without Python.)"""

import random
import threading

import torch

from hosttier_helpers import make_tier, ssd_dir  # noqa: F401  (fixtures)
from lohan_compile import HostMemoryError

KiB = 1 << 10


def worker(tier, seed, rounds, errors):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    try:
        live = []
        for _ in range(rounds):
            op = rng.random()
            if op < 0.45 or not live:
                n = rng.choice([1, 100, 4096 // 4, 10_000, 60_000])
                x = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, generator=gen)
                try:
                    h, ev = tier.to_host(x)  # host block, or SSD when the budget is full
                except HostMemoryError:
                    continue
                live.append((x, h, ev))
            elif op < 0.8:
                x, h, ev = live.pop(rng.randrange(len(live)))
                ev.wait()
                d, ev2 = tier.to_device(h)
                ev2.wait()
                if not torch.equal(d, x):
                    errors.append(f"seed {seed}: data corrupted ({tier.location(h)})")
            else:
                x, h, ev = live.pop(rng.randrange(len(live)))
                ev.wait()
                if tier.location(h) == "host" and not torch.equal(h, x):
                    errors.append(f"seed {seed}: host copy corrupted")
        for _, _, ev in live:
            ev.wait()
    except Exception as e:  # noqa: BLE001  (reported by the test)
        errors.append(f"seed {seed}: {type(e).__name__}: {e}")


def test_threads_share_a_tier(make_tier, ssd_dir):
    tier = make_tier("2MiB", arena_bytes="512KiB", ssd_dir=ssd_dir, ssd_chunk_bytes="64KiB",
                     copy_threads=2, copy_chunk_bytes="16KiB", ssd_threads=3)
    errors: list[str] = []
    threads = [threading.Thread(target=worker, args=(tier, seed, 500, errors)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    tier.check()
    s = tier.stats()
    assert s.in_use_bytes == 0 and s.live_blocks == 0
    assert s.ssd_in_use_bytes == 0 and s.ssd_live_blocks == 0 and s.ssd_failed_ios == 0
    assert s.ssd_writes > 0, "the budget never forced a spill: the test did not stress the SSD tier"
    assert s.reserved_bytes <= 2 * 1024 * KiB
