"""The Inductor executor (slow: each compile takes tens of seconds on 2 cores).

Inductor compiles the compute between lohan's ops (``lohan_compile/graph/segments.py``); these
tests check what that must keep: eager's results within Inductor's tolerance under every
policy, the plan's order of transfers and hand-offs, and the budget.
"""

import copy
import gc

import pytest
import torch

import lohan_compile as lohan
from lohan_compile.runtime import device
from models import MLP, Block, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.inductor

POLICIES = ("keep-all", "swap-all", "recompute-all", "auto", "torch-min-cut")


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def block_loss(model, x):
    return model(x).square().mean()


def _tokens(n, b, t):
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, 128, (b, t), generator=g) for _ in range(n)]


def _inputs(n):
    g = torch.Generator().manual_seed(4)
    return [torch.randn(4, 32, 64, generator=g) for _ in range(n)]


# batches large enough that activations, not the weights and the two optimizers' state,
# decide the peak: the budgets below then leave the planner room. Every policy runs on the
# block; each Hugging Face model runs keep-all (the others' budgets come from it) and two more,
# so that every policy also runs on a Hugging Face model and auto on the graph-breaking one
# (every policy on every model took four minutes of CI's time with a cold Inductor cache).
MODELS = {
    "block": (Block, _inputs(2), block_loss, POLICIES),
    "llama": (lambda: tiny_llama(layers=1), _tokens(2, 4, 64), lm_loss, ("keep-all", "swap-all", "torch-min-cut")),
    "gpt2": (lambda: tiny_gpt2(layers=1), _tokens(2, 8, 64), lm_loss, ("keep-all", "recompute-all", "auto")),
}


def side_by_side(make, batches, loss, options):
    """Eager and lohan-compiled copies of one model, forward and backward on the same batches:
    losses and gradients compared at every step. The report of the last step."""
    torch.manual_seed(0)
    eager = make()
    compiled = copy.deepcopy(eager)
    cm = torch.compile(compiled, backend="lohan", options=options)
    for batch in batches:
        eager.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)
        expected = loss(eager, batch)
        expected.backward()
        got = loss(cm, batch)
        got.backward()
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    return lohan.last_report()


def smallest_budget(make, batch, loss, options):
    """The smallest budget any plan meets (``BudgetError``), in side_by_side's first step."""
    torch.manual_seed(0)
    eager = make()
    compiled = copy.deepcopy(eager)
    loss(eager, batch).backward()  # its gradients are resident as in side_by_side
    cm = torch.compile(compiled, backend="lohan", options={**options, "memory_budget": 1})
    with pytest.raises(Exception) as e:
        loss(cm, batch)
    err = e.value
    while err is not None and not isinstance(err, lohan.BudgetError):
        err = err.__cause__ or getattr(err, "inner_exception", None)
    assert err is not None, repr(e.value)
    return err.smallest_feasible_bytes


@pytest.mark.parametrize("model", list(MODELS))
def test_every_policy_matches_eager_within_tolerance(model):
    """keep-all, swap-all, recompute-all, auto and torch-min-cut under Inductor: losses and
    gradients within Inductor's usual tolerance of eager's, step after step. (With the fx
    executor every policy equals eager bitwise: test_plan_e2e, test_parity.)"""
    make, batches, loss, policies = MODELS[model]
    device.install()  # count the eager copy's weights too (allocated before anything compiles)
    if "auto" in policies:
        smallest = smallest_budget(make, batches[0], loss, {"executor": "inductor"})
    keep_all = None
    for policy in policies:
        gc.collect()  # the previous policy's models would count against this budget
        torch._dynamo.reset()
        options = {"executor": "inductor", "policy": policy}
        if policy == "auto":  # between the smallest feasible and what keeping everything needs
            options["memory_budget"] = (smallest + keep_all) // 2
        elif policy == "torch-min-cut":
            options["memory_budget"] = keep_all  # min-cut saves little on these models
        try:
            report = side_by_side(make, batches, loss, options)
        except AssertionError as e:
            raise AssertionError(f"{model}, policy {policy}: {e}") from None
        summary = report.summary()
        moved = summary["swapped_bytes"] + summary["recomputed_bytes"]
        if policy == "keep-all":
            assert moved == 0
            keep_all = report.graphs[0].predicted_peak_bytes  # GPT-2's loss is a second graph
            assert summary["measured_peak_bytes"] <= 1.05 * keep_all
            # nothing to move: each graph is one segment, compiled whole as torch.compile would
            assert all(s["segments"] == 1 for g in report.graphs for s in g.segments.values())
        elif policy == "swap-all":
            assert summary["swapped_bytes"] > 0 and summary["d2h_bytes"] == summary["swapped_bytes"]
        elif policy == "recompute-all":
            assert summary["recomputed_bytes"] > 0
        elif policy == "auto":
            assert moved > 0, "the budget should make auto swap or recompute"
        assert all(g.executor == "inductor" and g.segments for g in report.graphs), policy


def test_measured_compute_calibrates_the_prediction_and_the_next_plan():
    """On the CPU stand-in the executor times its segments in the first steps: the report
    simulates the plan again with those times, and a re-plan estimates nothing it measured."""
    torch.manual_seed(0)
    # (deep enough that moving activations lowers the peak: in a 3-layer MLP it is set by the
    # largest weight, its gradient and what a fused segment holds, whatever the plan)
    model = torch.nn.Sequential(*(m for _ in range(6) for m in (torch.nn.Linear(256, 256), torch.nn.ReLU())))
    x = torch.randn(2048, 256)
    cm = torch.compile(model, backend="lohan", options={"executor": "inductor"})
    cm(x).sum().backward()
    keep_all = lohan.last_report().summary()["predicted_peak_bytes"]
    torch._dynamo.reset()
    cm = torch.compile(model, backend="lohan", options={"executor": "inductor", "memory_budget": int(keep_all * 1.3)})
    for _ in range(6):
        model.zero_grad(set_to_none=True)
        cm(x).sum().backward()
    first = lohan.last_report().graphs[0]
    summary = lohan.last_report().summary()
    assert first.measured_compute_s > 0 and summary["calibrated_step_s"] > 0
    assert summary["calibrated_step_s"] != summary["predicted_step_s"]

    hog = torch.empty(int(keep_all * 0.35) // 4)  # the device holds more: the graph is planned again
    model.zero_grad(set_to_none=True)
    cm(x).sum().backward()
    second = lohan.last_report().graphs[0]
    assert second is not first
    before = {op.name: op.seconds for op in first.pass_report("plan_memory")["problem"].ops}
    after = {op.name: op.seconds for op in second.pass_report("plan_memory")["problem"].ops}
    mm = [name for name in before if name.startswith("addmm")]
    assert mm and all(after[name] != before[name] for name in mm)  # measured, no longer estimated
    del hog
