"""The fused Adam kernel (csrc/adam_*.cpp) through its ops: every SIMD path, rounding, stats, threads, GIL."""

import threading
import time

import pytest
import torch

from lohan_compile import adam_ops

SUPPORTED = adam_ops.supported_isas()
ALL_ISAS = ["scalar", "avx2", "avx512", "avx512_bf16"]
VECTOR_ISAS = [i for i in SUPPORTED if i != "scalar"]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_DTYPES = [None, torch.float32, torch.bfloat16, torch.float16]
# Sizes with and without SIMD tails, and across the 65536-element task boundary.
SIZES = [1, 7, 16, 33, 65536 + 37, 3 * 65536]

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def make_case(n, grad_dtype, out_dtype, seed=0, step=3.0):
    g = torch.Generator().manual_seed(seed)
    master = torch.randn(n, generator=g)
    exp_avg = torch.randn(n, generator=g) * 0.1
    exp_avg_sq = torch.rand(n, generator=g) * 0.01
    grad = torch.randn(n, generator=g).to(grad_dtype)
    out = [] if out_dtype is None else [torch.empty(n, dtype=out_dtype)]
    return [master], [exp_avg], [exp_avg_sq], [grad], out, [step]


def run(case, isa="auto", num_threads=1, **over):
    kw = dict(HYPER, **over)
    return adam_ops.adam_update(*case, isa=isa, num_threads=num_threads, **kw)


def clone_case(case):
    return tuple([t.clone() for t in x] if x and isinstance(x[0], torch.Tensor) else list(x) for x in case)


def reference(case, lr, beta1, beta2, eps, weight_decay, decoupled=True, grad_scale=1.0):
    """The update in float64 (the kernel must be within fp32 rounding of it)."""
    (p,), (m,), (v,), (g,), _, (step,) = case
    p, m, v, g = (t.double() for t in (p, m, v, g))
    g = g * grad_scale
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / (1 - beta2 ** step) ** 0.5 + eps
    p = p - lr / (1 - beta1 ** step) * m / denom
    return p, m, v


def test_supported_isas_and_auto():
    assert SUPPORTED[0] == "scalar"
    assert set(SUPPORTED) <= set(ALL_ISAS)
    assert adam_ops.resolve_isa("auto") == SUPPORTED[-1]
    for isa in SUPPORTED:
        assert adam_ops.resolve_isa(isa) == isa


@pytest.mark.parametrize("isa", [i for i in ALL_ISAS if i not in SUPPORTED] or ["no-such-isa"])
def test_forcing_a_path_this_cpu_lacks_raises(isa):
    case = make_case(8, torch.float32, None)
    with pytest.raises(RuntimeError, match="does not support|unknown instruction set"):
        run(case, isa=isa)
    with pytest.raises(RuntimeError, match="does not support|unknown instruction set"):
        adam_ops.resolve_isa(isa)


def test_unknown_isa_name_raises():
    with pytest.raises(RuntimeError, match="unknown instruction set 'sse9'"):
        run(make_case(8, torch.float32, None), isa="sse9")


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("decoupled", [True, False])
def test_every_path_is_bitwise_equal_to_scalar(grad_dtype, out_dtype, decoupled):
    """One body at every width: AVX2/AVX-512 results and grad norms equal the scalar path's bit for bit."""
    assert VECTOR_ISAS, "this CPU runs no SIMD path: the scalar path is all there is to test"
    for n in SIZES:
        base = make_case(n, grad_dtype, out_dtype, seed=n)
        want = clone_case(base)
        want_stats = run(want, isa="scalar", decoupled_weight_decay=decoupled, grad_scale=0.5)
        for isa in VECTOR_ISAS:
            got = clone_case(base)
            stats = run(got, isa=isa, decoupled_weight_decay=decoupled, grad_scale=0.5)
            for k in range(3):  # master, exp_avg, exp_avg_sq
                assert torch.equal(got[k][0], want[k][0]), (isa, n, k)
            if out_dtype is not None:
                assert torch.equal(got[4][0], want[4][0]), (isa, n)
            assert stats == want_stats  # same summation order on every path
            assert not stats.nonfinite


@pytest.mark.parametrize("isa", SUPPORTED)
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_update_matches_float64_reference(isa, decoupled, grad_dtype):
    n = 65536 + 101
    case = make_case(n, grad_dtype, None, seed=1, step=5.0)
    want_p, want_m, want_v = reference(case, **HYPER, decoupled=decoupled, grad_scale=0.25)
    run(case, isa=isa, decoupled_weight_decay=decoupled, grad_scale=0.25)
    (p,), (m,), (v,) = case[0], case[1], case[2]
    # a few fp32 roundings per element (m cancels: measure against the tensor's largest value)
    for got, want in ((m, want_m), (v, want_v), (p, want_p)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("isa", SUPPORTED)
def test_one_step_matches_torch_adamw(isa):
    n = 1000
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g)
    ref = torch.nn.Parameter(p0.clone())
    ref.grad = grad.clone()
    torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1).step()
    case = ([p0.clone()], [torch.zeros(n)], [torch.zeros(n)], [grad.clone()], [], [1.0])
    run(case, isa=isa)
    # torch's CPU sqrt is not correctly rounded; everything else is the same op sequence
    torch.testing.assert_close(case[0][0], ref.detach(), rtol=0, atol=2e-7)


SPECIAL = [0.0, -0.0, 1.0, -1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9, 1.0 + 2**-9 + 2**-20,
           65504.0, 65520.0, 70000.0, 6e-5, 6e-8, 3e-8, 1e-40, -1e-40, 1.17e-38, 3.4e38,
           float("inf"), float("-inf"), float("nan"), 1e-45]


@pytest.mark.parametrize("isa", SUPPORTED)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_copy_rounds_like_torch(isa, out_dtype):
    """With lr=0 the update keeps the master; the copy must equal torch's cast, ties and specials included."""
    g = torch.Generator().manual_seed(3)
    random = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-30, 30, (4096,), generator=g).float())
    master = torch.cat([torch.tensor(SPECIAL * 3), random])
    n = master.numel()
    out = torch.empty(n, dtype=out_dtype)
    case = ([master.clone()], [torch.zeros(n)], [torch.zeros(n)], [torch.zeros(n)], [out], [1.0])
    adam_ops.adam_update(*case, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, isa=isa)
    assert torch.equal(case[0][0].view(torch.int32), master.view(torch.int32))
    want = master.to(out_dtype)
    int_view = torch.int32 if out_dtype == torch.float32 else torch.int16
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(int_view), want[~nan].view(int_view))


@pytest.mark.parametrize("isa", SUPPORTED)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_grads_convert_exactly(isa, grad_dtype):
    """bf16/fp16 gradients are widened exactly: same result as passing their fp32 value."""
    n = 65536 + 5
    a = make_case(n, grad_dtype, None, seed=4)
    b = clone_case(a)
    b[3][0] = a[3][0].float()
    run(a, isa=isa)
    run(b, isa=isa)
    for k in range(3):
        assert torch.equal(a[k][0], b[k][0])


@pytest.mark.parametrize("isa", SUPPORTED)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_stats_norm_and_nonfinite(isa, grad_dtype):
    n = 2 * 65536 + 9
    case = make_case(n, grad_dtype, None, seed=5)
    grad = case[3][0]
    want = (grad.double() * 0.5).square().sum().item()
    stats = run(clone_case(case), isa=isa, grad_scale=0.5)
    assert stats.sumsq == pytest.approx(want, rel=1e-5)
    assert not stats.nonfinite
    only = adam_ops.grad_stats([grad], 0.5, isa=isa)
    assert only.sumsq == pytest.approx(want, rel=1e-5) and not only.nonfinite
    # vector body, a later block of 4096 in the first task (the update rescans one block),
    # second task, scalar tail
    for pos in (0, 3 * 4096 + 5, 65536 + 3, 65536 + 2 * 4096 + 1, n - 1):
        for bad in (float("inf"), float("-inf"), float("nan")):
            g = grad.clone()
            g[pos] = bad
            c = clone_case(case)
            c[3][0] = g
            assert run(c, isa=isa).nonfinite, (pos, bad)
            assert adam_ops.grad_stats([g], isa=isa).nonfinite, (pos, bad)


@pytest.mark.parametrize("isa", SUPPORTED)
def test_huge_finite_grad_is_not_nonfinite(isa):
    """Overflowing the squared norm (3e38^2) is not a non-finite gradient, in the update too
    (which finds non-finite elements by rescanning a block whose sum is not finite); a NaN
    in a later block after such a block still is."""
    g = torch.full((64,), 3e38)
    assert not adam_ops.grad_stats([g], isa=isa).nonfinite
    n = 3 * 4096 + 21  # three blocks of 4096 and a scalar tail
    for huge in (5, n - 2):  # the first block, the tail
        case = make_case(n, torch.float32, None, seed=9)
        case[3][0][huge] = 3e38
        stats = run(case, isa=isa)
        assert stats.sumsq == float("inf") and not stats.nonfinite, huge
    case = make_case(n, torch.float32, None, seed=9)
    case[3][0][5] = 3e38
    case[3][0][2 * 4096 + 7] = float("nan")
    assert run(case, isa=isa).nonfinite


def test_every_path_is_bitwise_equal_to_scalar_when_lerp_starts_from_the_gradient():
    """beta1 < 0.5: ATen's lerp starts from the gradient (the other instantiation of the loop)."""
    assert VECTOR_ISAS
    for n in (33, 65536 + 37):
        base = make_case(n, torch.bfloat16, torch.bfloat16, seed=n)
        want = clone_case(base)
        want_stats = run(want, isa="scalar", beta1=0.3)
        for isa in VECTOR_ISAS:
            got = clone_case(base)
            assert run(got, isa=isa, beta1=0.3) == want_stats
            for k in (0, 1, 2, 4):
                assert torch.equal(got[k][0], want[k][0]), (isa, n, k)


def on_background_thread(fn):
    """fn() on a thread marked as lohan's background thread (the kernel runs on lohan's pool)."""
    out = []

    def body():
        adam_ops.background_thread()
        out.append(fn())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out[0]


@pytest.mark.parametrize("isa", SUPPORTED)
def test_results_do_not_depend_on_thread_count(isa):
    base = [make_case(n, torch.bfloat16, torch.bfloat16, seed=n) for n in (5 * 65536 + 3, 100, 65536)]
    merged = tuple(sum((list(c[k]) for c in base), []) for k in range(6))
    results = []
    for threads in (1, 2, 3, 7):
        # on this thread torch's OpenMP team runs the tasks; on a background thread, lohan's pool
        for background in (False, True):
            c = clone_case(merged)
            if background:
                stats = on_background_thread(lambda: run(c, isa=isa, num_threads=threads))
            else:
                stats = run(c, isa=isa, num_threads=threads)
            results.append((c, stats))
    c0, s0 = results[0]
    for c, s in results[1:]:
        assert s == s0  # stats added in task order, whatever thread ran a task
        for k in (0, 1, 2, 4):
            for a, b in zip(c[k], c0[k]):
                assert torch.equal(a, b)


def test_background_mark_belongs_to_its_thread():
    assert adam_ops.on_background_thread() is False
    assert on_background_thread(adam_ops.on_background_thread) is True
    assert adam_ops.on_background_thread() is False  # this thread is not marked by another's mark


def test_the_offload_worker_runs_updates_on_lohans_pool():
    """The update thread of gradient offloading marks itself: its kernels never start an OpenMP team."""
    import queue
    import weakref

    from lohan_compile.runtime import offload

    seen = []
    tasks = queue.Queue()
    tasks.put((lambda: seen.append(adam_ops.on_background_thread()), ()))
    tasks.put((None, ()))
    t = threading.Thread(target=offload._work, args=(tasks, weakref.ref(offload)))
    t.start()
    t.join(timeout=60)
    assert seen == [True]


def test_bucket_equals_per_tensor_calls():
    cases = [make_case(n, torch.float16, None, seed=n, step=float(n % 7 + 1)) for n in (3, 65536 + 1, 999)]
    per_tensor = [clone_case(c) for c in cases]
    for c in per_tensor:
        run(c)
    bucket = tuple(sum((list(c[k]) for c in cases), []) for k in range(6))
    bucket = clone_case(bucket)
    run(bucket, num_threads=2)
    for i, c in enumerate(per_tensor):
        for k in range(3):
            assert torch.equal(bucket[k][i], c[k][0])


def test_op_errors_are_clear():
    ok = make_case(8, torch.float32, None)
    with pytest.raises(RuntimeError, match="same length"):
        torch.ops.lohan.adam_update(ok[0], ok[1], ok[2], ok[3] * 2, [], [1.0], 1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match="shapes of tensor 0 differ"):
        run(([torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)], [torch.zeros(4, 2)], [], [1.0]))
    with pytest.raises(RuntimeError, match="must be float32"):
        run(([torch.zeros(8, dtype=torch.float64)], [torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)], [], [1.0]))
    with pytest.raises(RuntimeError, match="grad\\[0\\] must be float32, bfloat16 or float16"):
        run(([torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8, dtype=torch.int32)], [], [1.0]))
    with pytest.raises(RuntimeError, match="master\\[0\\] must be contiguous"):
        m = torch.zeros(4, 4).t()
        run(([m], [torch.zeros(4, 4)], [torch.zeros(4, 4)], [torch.zeros(4, 4)], [], [1.0]))
    with pytest.raises(RuntimeError, match="weight_out must be empty or as long"):
        run(([torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)],
             [torch.zeros(8), torch.zeros(8)], [1.0]))
    with pytest.raises(RuntimeError, match="weight_out\\[0\\] has shape"):
        run(([torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)], [torch.zeros(9)], [1.0]))
    with pytest.raises(RuntimeError, match="step\\[0\\] must be at least 1"):
        run(([torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)], [], [0.0]))
    with pytest.raises(RuntimeError, match="listed twice"):
        t = torch.zeros(8)
        run(([t, t], [torch.zeros(8)] * 2, [torch.zeros(8)] * 2, [torch.zeros(8)] * 2, [], [1.0, 1.0]))
    empty = [torch.zeros(0), torch.zeros(0)]  # no data, nothing to race on
    run((empty, [torch.zeros(0)] * 2, [torch.zeros(0)] * 2, [torch.zeros(0)] * 2, [], [1.0, 1.0]))
    with pytest.raises(RuntimeError, match="SparseCPU"):  # no kernel for sparse tensors at all
        s = torch.zeros(8).to_sparse()
        run(([torch.zeros(8)], [torch.zeros(8)], [torch.zeros(8)], [s], [], [1.0]))


def test_opcheck():
    case = make_case(40, torch.bfloat16, torch.bfloat16)
    args = (*case[:5], [2.0], 1e-3, 0.9, 0.999, 1e-8, 0.01, True, 0.5, "auto", 1)
    torch.library.opcheck(torch.ops.lohan.adam_update.default, args)
    torch.library.opcheck(torch.ops.lohan.grad_stats.default, ([torch.randn(40), torch.randn(3).half()], 2.0))


def test_under_torch_compile_fullgraph():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(master, m, v, g):
        stats = torch.ops.lohan.adam_update([master], [m], [v], [g * 2], [], [1.0], 1e-2, 0.9, 0.999, 1e-8, 0.0)
        return stats * 1.0

    case = make_case(100, torch.float32, None)
    eager = clone_case(case)
    want = torch.ops.lohan.adam_update(eager[0], eager[1], eager[2], [eager[3][0] * 2], [], [1.0],
                                       1e-2, 0.9, 0.999, 1e-8, 0.0)
    got = f(case[0][0], case[1][0], case[2][0], case[3][0])
    assert torch.equal(got, want)
    for k in range(3):
        assert torch.equal(case[k][0], eager[k][0])


def test_gil_is_released_during_the_update():
    """A Python thread keeps running while another thread is inside the kernel."""
    n = 1 << 21
    case = make_case(n, torch.float32, None)
    inside = threading.Event()
    done = threading.Event()
    durations = []

    def optimizer_thread():
        inside.set()
        for s in range(1, 6):
            t0 = time.perf_counter()
            adam_ops.adam_update(*case[:5], [float(s)], **HYPER, isa="scalar", num_threads=1)
            durations.append(time.perf_counter() - t0)
        done.set()

    t = threading.Thread(target=optimizer_thread)
    t.start()
    inside.wait()
    ticks = 0
    while not done.is_set():
        ticks += 1
    t.join()
    # Held GIL: the loop above could only run between calls (a handful of
    # switches). Released: it spins the whole time, millions of iterations.
    assert sum(durations) > 0.02
    assert ticks > 10_000, ticks


def test_pool_serves_concurrent_callers():
    """Two Python threads call the threaded kernel at once; both finish with exact results."""
    cases = [make_case(4 * 65536, torch.float32, torch.bfloat16, seed=s) for s in (10, 11)]
    want = [clone_case(c) for c in cases]
    for w in want:
        for s in range(1, 4):
            w5 = w[:5] + ([float(s)],)
            run(w5, num_threads=1)
    errors = []

    def worker(c):
        adam_ops.background_thread()  # (lohan's pool: on unmarked threads torch's team runs it)
        try:
            for s in range(1, 4):
                run(c[:5] + ([float(s)],), num_threads=2)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for c, w in zip(cases, want):
        for k in (0, 1, 2, 4):
            assert torch.equal(c[k][0], w[k][0])


def _update_in_child(queue):
    # torch's own OpenMP pool does not survive a fork (libgomp): keep torch's
    # ops on this thread so that only lohan's pool is under test here.
    torch.set_num_threads(1)
    case = make_case(4 * 65536, torch.float32, None)
    want = clone_case(case)
    run(want, num_threads=1)
    run(case, num_threads=2)  # the pool the parent started is gone: the child starts its own
    queue.put(all(torch.equal(case[k][0], want[k][0]) for k in range(3)))


def test_pool_works_in_a_forked_child():
    import multiprocessing as mp

    # the parent ran both: torch's OpenMP team on this thread, lohan's pool on a background one
    run(make_case(4 * 65536, torch.float32, None), num_threads=2)
    on_background_thread(lambda: run(make_case(4 * 65536, torch.float32, None), num_threads=2))
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_update_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert queue.get(timeout=5) is True
