"""lohan.CPUAdamW: torch.optim.AdamW's semantics, fused; every path, checkpoints, schedulers, errors."""

import io
import threading

import pytest
import torch

import lohan_compile as lohan
from lohan_compile import adam_ops
from lohan_compile.optim import CPUAdamW

SUPPORTED = adam_ops.supported_isas()
SHAPES = [(7,), (33, 17), (5000,), (16384 + 3,)]
STEPS = 100


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def clone_params(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def grads(shapes, step, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]


def set_grads(params, gs):
    for p, g in zip(params, gs):
        p.grad = g.clone()


def assert_close_to_max(got, want, tol=1e-6):
    """Within tol of the reference tensor's largest magnitude (the issue's criterion)."""
    for a, b in zip(got, want):
        a, b = a.detach().double(), b.detach().double()
        err = (a - b).abs().max().item()
        assert err <= tol * b.abs().max().item(), (err, b.abs().max().item())


def ulp_distance(a, b):
    """Distance in units in the last place between two bf16/fp16 tensors (ordered bit patterns)."""
    def key(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i >= 0, i, -32768 - i)

    return (key(a) - key(b)).abs()


# ----------------------------------------------------------------- parity

CONFIGS = {
    "adamw": (dict(lr=1e-2, weight_decay=0.1), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    "no_weight_decay": (dict(lr=3e-3, weight_decay=0.0), lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.0)),
    "adam_l2": (dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=False),
                lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.05)),
    "maximize_betas_eps": (dict(lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02, maximize=True),
                           lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.8, 0.99), eps=1e-6,
                                                        weight_decay=0.02, maximize=True)),
    "large_beta1": (dict(lr=1e-2, betas=(0.3, 0.9)),  # 1-beta1 >= 0.5: the other lerp branch
                    lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.3, 0.9))),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fp32_matches_torch_after_100_steps(config):
    kwargs, make_ref = CONFIGS[config]
    ours = make_params()
    ref = clone_params(ours)
    opt, ref_opt = CPUAdamW(ours, **kwargs), make_ref(ref)
    for step in range(STEPS):
        gs = grads(SHAPES, step, scale=10.0 ** (step % 5 - 2))
        set_grads(ours, gs)
        set_grads(ref, gs)
        opt.step()
        ref_opt.step()
    assert_close_to_max(ours, ref)
    for p, r in zip(ours, ref):
        assert float(opt.state[p]["step"]) == float(ref_opt.state[r]["step"]) == STEPS
        assert_close_to_max([opt.state[p]["exp_avg"]], [ref_opt.state[r]["exp_avg"]])
        assert_close_to_max([opt.state[p]["exp_avg_sq"]], [ref_opt.state[r]["exp_avg_sq"]])
        assert "master" not in opt.state[p]  # an fp32 CPU parameter is its own master


def test_clipping_matches_clip_grad_norm_then_adamw():
    ours = make_params()
    ref = clone_params(ours)
    opt = CPUAdamW([{"params": ours[:2]}, {"params": ours[2:], "lr": 3e-3}], lr=1e-2,
                   weight_decay=0.1, max_grad_norm=1.0)
    ref_opt = torch.optim.AdamW([{"params": ref[:2]}, {"params": ref[2:], "lr": 3e-3}], lr=1e-2,
                                weight_decay=0.1)
    clipped = 0
    for step in range(STEPS):
        # total norms from about 0.16 to 16: 3 steps in 5 clip
        gs = grads(SHAPES, step, scale=10.0 ** ((step % 5) / 2 - 3))
        set_grads(ours, gs)
        set_grads(ref, gs)
        opt.step()
        total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        clipped += bool(total > 1.0)
        assert opt.last_grad_norm == pytest.approx(float(total), rel=1e-6)
        assert not opt.found_inf
    assert clipped == 60
    assert_close_to_max(ours, ref)
    # p.grad is left as it was: the coefficient is fused into the update
    assert torch.equal(ours[0].grad, gs[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_within_one_ulp_of_fp32_master_adamw(dtype):
    ours = make_params(dtype=dtype)
    masters = clone_params(ours, torch.float32)
    opt = CPUAdamW(ours, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.1)
    worst = 0
    for step in range(STEPS):
        gs = grads(SHAPES, step, dtype=dtype, scale=0.1)
        set_grads(ours, gs)
        set_grads(masters, [g.float() for g in gs])
        opt.step()
        ref_opt.step()
        for p, m in zip(ours, masters):
            assert p.dtype == dtype
            worst = max(worst, int(ulp_distance(p.detach(), m.detach().to(dtype)).max()))
    assert worst <= 1
    assert_close_to_max([opt.state[p]["master"] for p in ours], masters)
    for p in ours:
        assert opt.state[p]["master"].dtype == torch.float32
        assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_every_simd_path_trains_identically():
    """Whole training runs, mixed dtypes, clipping: each path equals the scalar path bit for bit
    (the gradient norm is summed in the same order on every path, so clipping agrees too)."""
    results = {}
    for isa in SUPPORTED:
        ps = make_params(dtype=torch.float32) + make_params([(300,), (17, 5)], dtype=torch.bfloat16, seed=1)
        opt = CPUAdamW([{"params": ps[:4]}, {"params": ps[4:], "weight_decay": 0.0}],
                       lr=1e-2, max_grad_norm=0.5, isa=isa)
        shapes = [tuple(p.shape) for p in ps]
        for step in range(20):
            set_grads(ps, [g.to(p.dtype) for g, p in zip(grads(shapes, step), ps)])
            opt.step()
        results[isa] = [p.detach().clone() for p in ps] + [
            opt.state[p][k].clone() for p in ps for k in ("exp_avg", "exp_avg_sq")]
    assert "scalar" in results and len(results) == len(SUPPORTED) >= 2
    for isa, tensors in results.items():
        for a, b in zip(tensors, results["scalar"]):
            assert torch.equal(a, b), isa


# ---------------------------------------------------------- checkpoints

def _train(params, opt, sched, steps, start):
    shapes = [tuple(p.shape) for p in params]
    for step in range(start, start + steps):
        set_grads(params, [g.to(p.dtype) for g, p in zip(grads(shapes, step), params)])
        opt.step()
        sched.step()


def _setup(params):
    opt = CPUAdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
                   lr=1e-2, weight_decay=0.1, max_grad_norm=2.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return opt, sched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_exact(dtype):
    straight = make_params(dtype=dtype)
    opt, sched = _setup(straight)
    _train(straight, opt, sched, 12, 0)

    first = make_params(dtype=dtype)
    opt1, sched1 = _setup(first)
    _train(first, opt1, sched1, 6, 0)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict(),
                "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2, sched2 = _setup(resumed)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for p in resumed:
        for key in ("exp_avg", "exp_avg_sq") + (("master",) if dtype != torch.float32 else ()):
            assert opt2.state[p][key].dtype == torch.float32  # not cast to the parameter's dtype
    _train(resumed, opt2, sched2, 6, 6)

    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
    for a, b in zip(resumed, straight):
        for key, value in opt.state[b].items():
            assert torch.equal(opt2.state[a][key], value), key
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_loaded_state_is_copied_not_shared():
    ps = make_params()
    opt = CPUAdamW(ps)
    set_grads(ps, grads(SHAPES, 0))
    opt.step()
    sd = opt.state_dict()
    twin = clone_params(ps)
    opt2 = CPUAdamW(twin)
    opt2.load_state_dict(sd)
    set_grads(twin, grads(SHAPES, 1))
    opt2.step()
    for p in ps:  # the first optimizer's state did not move with the second's
        assert float(opt.state[p]["step"]) == 1.0
    assert not torch.equal(opt2.state[twin[0]]["exp_avg"], opt.state[ps[0]]["exp_avg"])


def test_loads_a_torch_adamw_checkpoint():
    ref = make_params()
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    low = clone_params(ref, torch.bfloat16)
    for step in range(5):
        set_grads(ref, grads(SHAPES, step))
        ref_opt.step()
    ours = clone_params(ref)
    opt = CPUAdamW(ours, lr=1e-2)
    opt.load_state_dict(ref_opt.state_dict())
    opt_low = CPUAdamW(low, lr=1e-2)
    opt_low.load_state_dict(ref_opt.state_dict())  # no master saved: starts from the bf16 weights
    for p in low:
        assert torch.equal(opt_low.state[p]["master"], p.detach().float())
    for step in range(5, 10):
        gs = grads(SHAPES, step)
        set_grads(ref, gs)
        set_grads(ours, gs)
        ref_opt.step()
        opt.step()
    assert_close_to_max(ours, ref)


# ------------------------------------------------- groups and schedulers

def test_schedulers_drive_lr_and_betas():
    ours = make_params()
    ref = clone_params(ours)
    opt = CPUAdamW(ours, lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.01)
    # OneCycleLR also cycles beta1 through the param groups' "betas"
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=60)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=2e-2, total_steps=60)
    seen_lrs = set()
    for step in range(60):
        gs = grads(SHAPES, step)
        set_grads(ours, gs)
        set_grads(ref, gs)
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        assert opt.param_groups[0]["betas"] == ref_opt.param_groups[0]["betas"]
        seen_lrs.add(opt.param_groups[0]["lr"])
    assert len(seen_lrs) > 50
    assert_close_to_max(ours, ref)


def test_param_groups_keep_their_own_hyperparameters():
    ours = make_params()
    ref = clone_params(ours)
    late_shapes = [(64, 3)]
    late = make_params(late_shapes, seed=7)
    late_ref = clone_params(late)
    groups = lambda ps: [  # noqa: E731
        {"params": ps[:1], "lr": 5e-2, "weight_decay": 0.5, "betas": (0.5, 0.9)},
        {"params": ps[1:3], "eps": 1e-4, "decoupled_weight_decay": False, "weight_decay": 0.1},
        {"params": ps[3:]},
    ]
    opt = CPUAdamW(groups(ours), lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.Adam(groups(ref), lr=1e-2, weight_decay=0.01, decoupled_weight_decay=True)
    for step in range(40):
        if step == 20:
            opt.add_param_group({"params": late, "lr": 2e-3, "maximize": True})
            ref_opt.add_param_group({"params": late_ref, "lr": 2e-3, "maximize": True})
        gs = grads(SHAPES, step)
        set_grads(ours, gs)
        set_grads(ref, gs)
        if step >= 20:
            lg = grads(late_shapes, step)
            set_grads(late, lg)
            set_grads(late_ref, lg)
        opt.step()
        ref_opt.step()
    assert_close_to_max(ours + late, ref + late_ref)
    assert float(opt.state[late[0]]["step"]) == 20


def test_zero_grad_and_closure():
    ps = make_params()
    opt = CPUAdamW(ps)
    set_grads(ps, grads(SHAPES, 0))
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return 3.5

    assert opt.step(closure) == 3.5
    assert calls == [True]
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in ps)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)
    before = [p.detach().clone() for p in ps]
    opt.step()  # no gradients: nothing moves, no step counted
    assert all(torch.equal(a, b) for a, b in zip(ps, before))
    assert all(float(opt.state[p]["step"]) == 1 for p in ps)


def test_trains_a_model_like_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5)
    ref_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    losses = []
    for _ in range(30):
        for m, o in ((model, opt), (twin, ref_opt)):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            if m is twin:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert_close_to_max(list(model.parameters()), list(twin.parameters()), tol=1e-5)


# ------------------------------------------------------ update_params

def test_update_params_per_parameter_equals_step():
    a = make_params()
    b = clone_params(a)
    opt_a = CPUAdamW([{"params": a[:2]}, {"params": a[2:], "lr": 5e-3}], lr=1e-2)
    opt_b = CPUAdamW([{"params": b[:2]}, {"params": b[2:], "lr": 5e-3}], lr=1e-2)
    for step in range(5):
        gs = grads(SHAPES, step)
        set_grads(a, gs)
        opt_a.step()
        stats = adam_ops.NO_GRADS
        for p, g in reversed(list(zip(b, gs))):  # as backward produces them: last layer first
            stats = stats + opt_b.update_params([p], [g])
        assert stats.sumsq == pytest.approx(opt_a.last_grad_norm ** 2, rel=1e-6)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert y.grad is None  # gradients came from host buffers, not p.grad


def test_update_params_grad_scale_host_dtypes_and_weights_out():
    a = make_params(dtype=torch.bfloat16)
    b = clone_params(a)
    opt_a, opt_b = CPUAdamW(a), CPUAdamW(b)
    gs = grads(SHAPES, 0, dtype=torch.float16)
    opt_a.update_params(a, [g.float() * 0.25 for g in gs])  # exact: scaling by a power of two
    outs = [torch.empty_like(p) for p in b]
    before = [p.detach().clone() for p in b]
    stats = opt_b.update_params(b, gs, grad_scale=0.25, weights_out=outs)
    assert stats.sumsq == pytest.approx(sum((g.double() * 0.25).square().sum().item() for g in gs), rel=1e-6)
    for p, old, out, ref in zip(b, before, outs, a):
        assert torch.equal(p, old) and p._version == 0  # written to weights_out instead
        assert out._version > 0 and ref._version > 0
        assert torch.equal(out, ref.detach())
        assert torch.equal(opt_b.state[p]["master"], opt_a.state[ref]["master"])


def test_update_params_from_background_threads():
    a = make_params()
    b = clone_params(a)
    opt_a, opt_b = CPUAdamW(a), CPUAdamW(b)
    gs = grads(SHAPES, 0)
    for p, g in zip(a, gs):
        opt_a.update_params([p], [g])
    errors = []

    def run(ps, g):
        try:
            opt_b.update_params(ps, g)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(b[i::2], gs[i::2])) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_found_inf_and_last_grad_norm():
    ps = make_params()
    opt = CPUAdamW(ps)
    gs = grads(SHAPES, 0)
    set_grads(ps, gs)
    opt.step()
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])).item()
    assert opt.last_grad_norm == pytest.approx(want, rel=1e-6)
    assert not opt.found_inf
    gs[2][10] = float("nan")
    set_grads(ps, gs)
    opt.step()
    assert opt.found_inf
    clipped = CPUAdamW(make_params(), max_grad_norm=1.0)
    gs[2][10] = float("inf")
    set_grads(clipped.param_groups[0]["params"], gs)
    clipped.step()
    assert clipped.found_inf and clipped.last_grad_norm == float("inf")


def test_state_allocator_provides_master_and_moments():
    handed_out = []

    def alloc(shape, dtype):
        t = torch.full(shape, float("nan"), dtype=dtype)  # must be initialised by the optimizer
        handed_out.append(t)
        return t

    ps = make_params(dtype=torch.bfloat16)
    opt = CPUAdamW(ps, state_allocator=alloc)
    set_grads(ps, grads(SHAPES, 0, dtype=torch.bfloat16))
    opt.step()
    assert len(handed_out) == 3 * len(ps)
    owned = {t.data_ptr() for t in handed_out}
    for p in ps:
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].data_ptr() in owned
        assert not p.isnan().any()
    bad = CPUAdamW(make_params(), state_allocator=lambda s, d: torch.empty(s, dtype=torch.float64))
    set_grads(bad.param_groups[0]["params"], grads(SHAPES, 0))
    with pytest.raises(ValueError, match="state_allocator returned"):
        bad.step()


# ---------------------------------------------------------------- errors

def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="not contiguous"):
        CPUAdamW([torch.nn.Parameter(torch.randn(4, 6).t())])
    with pytest.raises(TypeError, match="dtype torch.float64"):
        CPUAdamW([torch.nn.Parameter(torch.randn(4, dtype=torch.float64))])
    with pytest.raises(TypeError, match="dtype torch.int64"):
        CPUAdamW([torch.zeros(4, dtype=torch.int64)])
    with pytest.raises(ValueError, match="dense"):
        CPUAdamW([torch.nn.Parameter(torch.randn(4).to_sparse())])
    with pytest.raises(ValueError, match="learning rate"):
        CPUAdamW(make_params(), lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        CPUAdamW(make_params(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="max_grad_norm"):
        CPUAdamW(make_params(), max_grad_norm=0.0)
    with pytest.raises(ValueError, match="isa='sse9'"):
        CPUAdamW(make_params(), isa="sse9")
    opt = CPUAdamW(make_params())
    with pytest.raises(ValueError, match="not contiguous"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 5).t())]})


def test_bad_gradients_are_refused_without_side_effects():
    ps = make_params()
    opt = CPUAdamW(ps)
    before = [p.detach().clone() for p in ps]

    def attempt(grad, err, match):
        with pytest.raises(err, match=match):
            if grad.layout == torch.strided:  # torch refuses such tensors as p.grad already
                opt.update_params([ps[1]], [grad])
            else:
                ps[1].grad = grad
                opt.step()
        assert all(torch.equal(p, b) for p, b in zip(ps, before))
        assert all(not opt.state[p] or float(opt.state[p]["step"]) == 0 for p in ps)

    set_grads(ps, grads(SHAPES, 0))
    attempt(torch.randn(33, 16), ValueError, "shape \\(33, 16\\), the parameter \\(33, 17\\)")
    attempt(torch.randn(33, 17, dtype=torch.float64), TypeError, "float64")
    attempt(torch.randn(33, 17, device="meta"), ValueError, "gradients must be CPU tensors")
    attempt(torch.randn(33, 17).to_sparse(), RuntimeError, "sparse gradients")
    ps[1].grad = None
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.update_params([torch.nn.Parameter(torch.randn(3))], [torch.randn(3)])
    with pytest.raises(ValueError, match="listed twice"):
        opt.update_params([ps[0], ps[0]], [torch.randn(7), torch.randn(7)])
    with pytest.raises(ValueError, match="has no gradient"):
        opt.update_params([ps[1]])
    with pytest.raises(ValueError, match="weights_out\\[0\\]"):
        opt.update_params([ps[0]], [torch.randn(7)], weights_out=[torch.empty(8)])
    # a strided gradient is legal in torch: it is used, copied flat
    g = torch.randn(17, 33).t()
    ps[1].grad = g
    opt.step()
    assert float(opt.state[ps[1]]["step"]) == 1


def test_parameters_on_another_device_need_update_params():
    p = torch.nn.Parameter(torch.randn(4, device="meta"))
    opt = CPUAdamW([p])
    p.grad = torch.randn(4, device="meta")
    with pytest.raises(RuntimeError, match="step\\(\\) updates CPU parameters"):
        opt.step()
    with pytest.raises(ValueError, match="gradients must be CPU tensors"):
        opt.update_params([p], [torch.randn(4, device="meta")])


def test_amsgrad_group_is_refused():
    ps = make_params()
    opt = CPUAdamW(ps)
    opt.param_groups[0]["amsgrad"] = True
    set_grads(ps, grads(SHAPES, 0))
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_sees_the_update_as_an_in_place_change(dtype):
    """Like torch's optimizers, an update bumps the parameter's version counter."""
    w = torch.nn.Parameter(torch.randn(4, 4).to(dtype))
    opt = CPUAdamW([w])
    w.grad = torch.randn(4, 4).to(dtype)
    x = torch.randn(4, 4, dtype=dtype, requires_grad=True)
    y = (x @ w).sum()  # saves w for x's gradient
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_params_from_generators_and_single_tensors():
    model = torch.nn.Linear(3, 2)
    opt = CPUAdamW(model.parameters())  # a generator, read once
    assert len(opt.param_groups[0]["params"]) == 2
    extra = torch.nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": extra, "lr": 0.5})
    assert opt.param_groups[1]["params"] == [extra] and opt.param_groups[1]["lr"] == 0.5
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": {torch.nn.Parameter(torch.randn(2))}})
