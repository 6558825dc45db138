"""``lohan.explain``: plans a step on the meta device and reports what it would do, training nothing."""

import warnings

import pytest
import torch

import lohan_compile as lohan
from models import MLP, tiny_llama


def test_explain_reports_every_decision_and_trains_nothing():
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    # a budget under what keeping everything needs: some activations must move
    keep = lohan.explain(model, example_kwargs={"input_ids": ids, "labels": ids}, policy="keep-all")
    peak = keep.summary()["predicted_peak_bytes"]
    report = lohan.explain(model, example_kwargs={"input_ids": ids, "labels": ids},
                           memory_budget=int(0.8 * peak), optimizer=opt, debug=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not opt.state  # the optimizer was not touched
    summary = report.summary()
    assert summary["predicted_peak_bytes"] <= int(0.8 * peak)
    assert summary["measured_peak_bytes"] is None and summary["d2h_bytes"] is None  # nothing ran
    decisions = report.decisions()
    kinds = {d["decision"] for d in decisions}
    assert {"keep", "offload"} <= kinds and kinds & {"swap", "recompute"}
    assert all(d["reason"] for d in decisions)
    assert not any("keep-all policy" in d["reason"] for d in decisions)  # said in auto's terms
    offload = next(d for d in decisions if d["decision"] == "offload")
    assert offload["bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert "swap" in report.plan_table(limit=None) or "recompute" in report.plan_table(limit=None)


@pytest.mark.parametrize("fraction", [0.7, 0.8, 0.9])
def test_swapped_tensors_read_through_views_are_waited_for_first(fraction):
    """A swapped tensor whose first backward reader is a view (a transpose before the matmul):
    the wait is planned before the matmul, and the view must still come after the wait."""
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (2, 64))
    keep = lohan.explain(model, example_kwargs={"input_ids": ids, "labels": ids}, policy="keep-all")
    peak = keep.summary()["predicted_peak_bytes"]
    budget = int(fraction * peak)
    assert budget < peak
    report = lohan.explain(model, example_kwargs={"input_ids": ids, "labels": ids}, memory_budget=budget,
                           debug=True)  # debug: graphs are linted after every pass
    assert report.summary()["predicted_peak_bytes"] <= budget


def test_explain_finds_a_loss_or_takes_one():
    model = MLP()
    x = torch.randn(4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from the meta trace reaches the user
        report = lohan.explain(model, x)
    assert report.graphs and report.summary()["predicted_peak_bytes"] > 0
    report = lohan.explain(model, x, loss_fn=lambda out: out.pow(2).mean())
    assert report.graphs
    with pytest.raises(ValueError, match="memory_budget"):
        lohan.explain(model, x, memory_budget="lots")


def test_attention_is_planned_as_the_fused_kernel_a_gpu_runs():
    """On the meta device SDPA would fall back to its math decomposition and save a
    sequence x sequence matrix per head; explain traces the fused kernel instead."""
    torch.manual_seed(0)
    model = tiny_llama(layers=1)
    b, t = 2, 512
    ids = torch.randint(0, 128, (b, t))
    original = torch.nn.functional.scaled_dot_product_attention
    report = lohan.explain(model, example_kwargs={"input_ids": ids, "labels": ids}, policy="keep-all")
    assert torch.nn.functional.scaled_dot_product_attention is original  # restored
    heads = model.config.num_attention_heads
    scores_bytes = b * heads * t * t * 4
    assert all(d["bytes"] < scores_bytes for d in report.decisions())
    assert report.summary()["predicted_peak_bytes"] < scores_bytes


def test_a_plan_does_not_depend_on_unrelated_memory_of_the_process():
    """explain() plans the model it was given: memory other objects of the process hold (on the
    CPU standing in for the device) is not resident on the meta device it plans on."""
    from lohan_compile.runtime import device

    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(16, 32)
    device.install()  # count every allocation from here on, as a test run after others does
    alone = lohan.explain(model, x, memory_budget="1GiB").summary()["predicted_peak_bytes"]
    unrelated = torch.ones(8 << 20)  # 32 MiB the plan has nothing to do with
    beside = lohan.explain(model, x, memory_budget="1GiB").summary()["predicted_peak_bytes"]
    del unrelated
    assert beside == alone
