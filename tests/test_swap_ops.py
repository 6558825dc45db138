"""The graph interface: lohan::swap_out / swap_in / wait_tensor."""

import gc
import os

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from lohan_compile import ops

ops.load()  # the extension, and its ops' fake kernels
from hosttier_helpers import allocation_events, make_tier, ssd_dir  # noqa: F401  (fixtures)
from lohan_compile.runtime import hosttier
from lohan_compile.runtime.step import TRACKER

L = torch.ops.lohan
MiB = 1 << 20


@pytest.fixture(autouse=True)
def no_leftover_copies():
    yield
    assert hosttier.drain() == 0, "a test left a swap without its wait"


def test_schemas():
    assert str(L.swap_out.default._schema) == "lohan::swap_out(Tensor src) -> Tensor"
    assert str(L.swap_in.default._schema) == "lohan::swap_in(Tensor host, Device? device=None) -> Tensor"
    assert str(L.wait_tensor.default._schema) == "lohan::wait_tensor(Tensor(a) t) -> Tensor(a)"


def test_declared_side_effecting():
    for op in (L.swap_out.default, L.swap_in.default, L.wait_tensor.default):
        assert op in torch.fx.node._side_effectful_functions
    for op in (L.swap_out, L.swap_out.default):  # as traced, or as a pass inserts it
        gm = torch.fx.symbolic_trace(lambda a: (op(a), a + 1)[1])
        gm.graph.eliminate_dead_code()
        assert any(n.target is op for n in gm.graph.nodes)
    hosttier.drain()


def test_cycle():
    x = torch.randn(300, 200)
    h = L.wait_tensor(L.swap_out(x))
    assert h.device.type == "cpu" and hosttier.current().location(h) == "host"
    assert torch.equal(h, x)
    d = L.swap_in(h)
    assert d is not h and d.data_ptr() != h.data_ptr()
    d = L.wait_tensor(d)
    assert torch.equal(d, x) and hosttier.current().location(d) == "device"


def same_tensor(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and (
        a.shape, a.stride(), a.storage_offset()) == (b.shape, b.stride(), b.storage_offset())


def test_wait_returns_its_argument_and_tolerates_repeats():
    x = torch.randn(10)
    h = L.swap_out(x)
    assert same_tensor(L.wait_tensor(h), h)  # an alias: Tensor(a) -> Tensor(a)
    assert same_tensor(L.wait_tensor(h), h)  # nothing pending any more: a no-op
    assert same_tensor(L.wait_tensor(x), x)  # never a copy target: a no-op


def test_fake_kernels_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [
        torch.randn(6, 5),
        torch.randn(6, 5, 4).permute(2, 0, 1),
        torch.randn(6, 10)[:, ::2],
        torch.randn(0, 3),
    ]
    for x in cases:
        h = L.wait_tensor(L.swap_out(x))
        d = L.wait_tensor(L.swap_in(h))
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(x)
            fh = L.swap_out(fx)
            fd = L.swap_in(L.wait_tensor(fh))
        for real, fake in ((h, fh), (d, fd)):
            assert (real.shape, real.stride(), real.dtype, real.device) == (
                fake.shape, fake.stride(), fake.dtype, fake.device)


def test_fake_kernel_of_swap_in_takes_the_device():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h = torch.empty(4, 4)
        assert L.swap_in(h, torch.device("meta")).device.type == "meta"


def test_meta_tensors_stay_on_meta():
    x = torch.empty(1 << 40, device="meta")  # a terabyte: nothing may be allocated
    h = L.wait_tensor(L.swap_out(x))
    d = L.wait_tensor(L.swap_in(h))
    assert h.device.type == d.device.type == "meta" and d.shape == x.shape


# A swap's output is not valid until its wait, so the checks that compare
# output values of eager and traced runs (test_aot_dispatch_*) would race the copy.
ASYNC_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("op", ["swap_out", "swap_in"])
def test_opcheck(op):
    x = torch.randn(8, 6)
    if op == "swap_out":
        args = (x,)
    else:
        args = (L.wait_tensor(L.swap_out(x)),)
    torch.library.opcheck(getattr(L, op).default, args, test_utils=ASYNC_CHECKS)
    hosttier.drain()  # opcheck ran the op without waits


def test_opcheck_wait_tensor():
    # Its output aliases its input (Tensor(a) -> Tensor(a)), like torch's own
    # ao::wait_tensor; functionalization refuses such custom ops, so these ops
    # go into graphs after AOTAutograd (in partition_fn), not before.
    h = L.swap_out(torch.randn(8, 6))
    torch.library.opcheck(L.wait_tensor.default, (h,), test_utils=("test_schema", "test_faketensor"))
    hosttier.drain()  # opcheck waited on copies of h


def test_under_dynamo_fullgraph():
    def f(a):
        b = a * 2
        h = L.wait_tensor(L.swap_out(b))
        c = b.sin()
        d = L.wait_tensor(L.swap_in(h))
        return d + c

    torch._dynamo.reset()
    x = torch.randn(64, 32)
    out = torch.compile(f, backend="eager", fullgraph=True)(x)
    assert torch.allclose(out, x * 2 + (x * 2).sin())


@pytest.mark.inductor
def test_inductor_keeps_them_in_a_post_autograd_graph():
    from torch._inductor.compile_fx import compile_fx_inner
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a):
        b = a * 2
        h = L.wait_tensor(L.swap_out(b))
        c = b.sin()
        d = L.wait_tensor(L.swap_in(h))
        return (d + c,)

    x = torch.randn(64, 32)
    gm = make_fx(f)(x)
    compiled = compile_fx_inner(gm, [x])
    (out,) = compiled([x])
    assert torch.allclose(out, x * 2 + (x * 2).sin())


def test_source_kept_alive_until_the_wait():
    x = torch.randn(1000, 1000)
    ref = StorageWeakRef(x.untyped_storage())
    h = L.swap_out(x)
    del x
    gc.collect()
    assert not ref.expired()  # the copy may still read it
    L.wait_tensor(h)
    assert ref.expired()  # released by the wait


def test_swap_in_of_an_unwaited_swap_out_waits_for_it():
    x = torch.randn(2000, 500)
    h = L.swap_out(x)
    d = L.wait_tensor(L.swap_in(h))  # h's copy must have landed first
    assert torch.equal(d, x)
    assert hosttier.pending() == 0


def test_device_memory_is_allocated_and_freed_on_the_calling_thread():
    """The profiler sees the step thread only: swap_in's allocation and the
    release of swap_out's source happen there, never on a copy thread."""
    from torch.profiler import ProfilerActivity, profile

    nbytes = 1_234_432
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        x = torch.randn(nbytes // 4)
        h = L.swap_out(x)
        del x  # the pending copy holds the last reference now
        h = L.wait_tensor(h)  # ... and drops it here
        d = L.wait_tensor(L.swap_in(h))
        del d
    events = [(size, tid) for size, tid in allocation_events(prof) if abs(size) == nbytes]
    # x and d allocated and freed; the host tier's block is not c10 memory
    assert sorted(size for size, _ in events) == [-nbytes, -nbytes, nbytes, nbytes]
    step_tid = {ev.start_tid for ev in prof.profiler.kineto_results.experimental_event_tree()
                if ev.name == "aten::randn"}  # the profiler's id of this (the step) thread
    assert len(step_tid) == 1
    assert {tid for _, tid in events} == step_tid


def test_bytes_reach_the_step_report(make_tier):
    """d2h/h2d in a step's report are the bytes the copy threads moved during it."""
    from lohan_compile.report import GraphRecord

    tier = make_tier(None, arena_bytes="4MiB")
    graph = GraphRecord(graph_id=0, training=True, executor="fx", budget_bytes=None)
    x = torch.randn(250, 1000)  # 1,000,000 bytes
    with hosttier.use(tier):
        TRACKER.reset()
        L.wait_tensor(L.swap_out(x))  # before the step: not counted
        run = TRACKER.forward_begin(graph, [])
        h = L.wait_tensor(L.swap_out(x))
        TRACKER.end(run, 0.0)
        run = TRACKER.backward_begin(graph)
        d = L.wait_tensor(L.swap_in(h))
        del h
        TRACKER.end(run, 0.0)
    summary = TRACKER.last_report().summary()
    assert (summary["d2h_bytes"], summary["h2d_bytes"]) == (1_000_000, 1_000_000)
    assert summary["host_peak_bytes"] == 1_003_520  # one block, rounded to 4096
    assert torch.equal(d, x)


def test_spilled_swap(make_tier, ssd_dir):
    tier = make_tier("256KiB", arena_bytes="256KiB", ssd_dir=ssd_dir)
    with hosttier.use(tier):
        xs = [torch.randn(50_000) for _ in range(4)]  # 200 KB each
        hs = [L.wait_tensor(L.swap_out(x)) for x in xs]
        assert [tier.location(h) for h in hs] == ["host", "ssd", "ssd", "ssd"]
        for x, h in reversed(list(zip(xs, hs))):
            assert torch.equal(L.wait_tensor(L.swap_in(h)), x)


def test_errors_keep_their_types_in_graph_ops(make_tier):
    tier = make_tier("64KiB", arena_bytes="64KiB")
    with hosttier.use(tier):
        with pytest.raises(torch.OutOfMemoryError, match="host_memory_budget"):
            L.swap_out(torch.randn(100_000))
        with pytest.raises(Exception) as info, hosttier.translate_errors():
            L.swap_out(torch.randn(100_000))
        from lohan_compile import HostMemoryError

        assert isinstance(info.value, HostMemoryError)


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("spill", [False, True])
def test_resident_memory_stays_flat(make_tier, ssd_dir, spill):
    """Many training-step-like cycles (forward: swap out a layer's activations;
    backward: bring them back in reverse) leave the resident set where it was."""
    tier = make_tier("3MiB" if spill else "64MiB", arena_bytes="1MiB", ssd_dir=ssd_dir if spill else None)
    acts = [torch.randn(256 * 1024) for _ in range(6)]  # 6 x 1 MiB

    def step():
        hs = [L.wait_tensor(L.swap_out(a)) for a in acts]
        for a, h in zip(reversed(acts), reversed(hs)):
            d = L.wait_tensor(L.swap_in(h))
            assert d[-1] == a[-1]

    with hosttier.use(tier):
        for _ in range(30):  # warm up: arenas mapped, staging and malloc caches filled
            step()
        gc.collect()
        before = rss_bytes()
        for _ in range(300):  # 3.6 GB through the tier
            step()
        gc.collect()
        grown = rss_bytes() - before
    s = tier.stats()
    assert s.in_use_bytes == 0 and s.ssd_in_use_bytes == 0
    if spill:
        assert s.ssd_writes >= 300
    # a leak of one 64 KiB buffer per step would add 19 MiB; malloc's own
    # caching of the device tier's 1 MiB buffers moves RSS by a few MiB at most
    assert grown < 12 * MiB, f"resident memory grew by {grown / MiB:.1f} MiB over 300 steps"
