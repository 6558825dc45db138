"""The CUDA back end of the host tier: pinned arenas, side streams, events.

These run only on a machine with a CUDA device (the development machines have
none): they passed on an H200 (torch 2.11, 2026-11-26) once HostTier initialised
torch's CUDA before registering its arenas (torch's is_pinned() answered False
for memory registered before that)."""

import pytest
import torch

from lohan_compile import ops

ops.load()  # the extension, and its ops' fake kernels
from hosttier_helpers import make_tier  # noqa: F401  (fixture)
from lohan_compile.runtime import hosttier

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
L = torch.ops.lohan


def test_arenas_are_pinned(make_tier):
    tier = make_tier("256MiB", arena_bytes="64MiB")
    assert tier.pinned
    h = tier.empty((1024, 1024))
    assert h.is_pinned()
    assert tier.stats().pinned_bytes == 64 << 20


def test_swap_cycle_on_side_streams(make_tier):
    tier = make_tier("256MiB", arena_bytes="64MiB")
    with hosttier.use(tier):
        x = torch.randn(2048, 1024, device="cuda")
        y = x * 3  # queued on the current stream: the swap must wait for it
        h = L.wait_tensor(L.swap_out(y))
        assert h.device.type == "cpu" and tier.location(h) == "host"
        assert torch.equal(h, (x * 3).cpu())
        d = L.wait_tensor(L.swap_in(h, torch.device("cuda")))
        assert d.device.type == "cuda"
        assert torch.equal(d, x * 3)
    assert hosttier.drain() == 0


def test_source_freed_only_after_the_wait(make_tier):
    tier = make_tier("256MiB", arena_bytes="64MiB")
    with hosttier.use(tier):
        before = torch.cuda.memory_allocated()
        x = torch.randn(4 << 20, device="cuda")
        h = L.swap_out(x)
        del x
        assert torch.cuda.memory_allocated() > before  # the pending copy holds it
        L.wait_tensor(h)
        assert torch.cuda.memory_allocated() == before


def test_bytes_counted(make_tier):
    tier = make_tier("256MiB", arena_bytes="64MiB")
    with hosttier.use(tier):
        b0 = hosttier.bytes_moved()
        x = torch.randn(250_000, device="cuda")
        d = L.wait_tensor(L.swap_in(L.wait_tensor(L.swap_out(x)), torch.device("cuda")))
        torch.cuda.synchronize()
        b1 = hosttier.bytes_moved()
        assert b1["d2h_bytes"] - b0["d2h_bytes"] == 1_000_000
        assert b1["h2d_bytes"] - b0["h2d_bytes"] == 1_000_000
        assert torch.equal(d, x)


def test_no_ssd_spill_for_cuda_yet(make_tier, tmp_path):
    tier = make_tier("1MiB", arena_bytes="1MiB", ssd_dir=tmp_path)
    with hosttier.use(tier), pytest.raises(torch.OutOfMemoryError, match="host_memory_budget"):
        L.swap_out(torch.randn(1 << 20, device="cuda"))
