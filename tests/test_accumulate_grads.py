"""Gradients of micro-batches added into ``.grad`` inside backward (passes/accumulate_grads.py).

Without a lohan optimizer, autograd adds each gradient into ``.grad`` once backward returns:
a micro-batch after the first holds the earlier gradients and all its new ones at once. A
graph compiled (or planned again) while ``.grad`` holds gradients adds each new one where
backward makes it, and the plan frees it there.
"""

from __future__ import annotations

import gc

import pytest
import torch

import lohan_compile as lohan
from lohan_compile.errors import BudgetError, LohanError
from lohan_compile.runtime import device as device_memory


def make() -> torch.nn.Module:
    """Weights much larger than the activations, as when fine-tuning with small micro-batches."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])


MICRO = [torch.randn(4, 256, generator=torch.Generator().manual_seed(i)) for i in range(3)]
WEIGHT_BYTES = 4 * (256 * 256 + 256) * 4


def accumulate(model: torch.nn.Module, options: dict | None = None) -> list[dict]:
    """Micro-batches after the first (which ran before the compile), added into ``.grad``."""
    cm = torch.compile(model, backend="lohan", options=options) if options is not None else model
    reports = []
    for x in MICRO[1:]:
        cm(x).square().mean().backward()
        if options is not None:
            report = lohan.last_report()
            added = report.graphs[0].pass_report("accumulate_grads")
            reports.append({**report.summary(), "accumulated": added["accumulated"] if added else None})
    return reports


def test_micro_batches_hold_one_set_of_gradients_beside_the_weights():
    """Compiled after a first micro-batch (``.grad`` held), under what the device holds then
    (weights, one set of gradients) plus 0.4x the weights: each new gradient is added where it
    is made, and two micro-batches accumulate within the budget, bitwise as eager; without the
    pass, no plan fits (backward would return a second set of gradients beside the first)."""
    device_memory.install()  # (counting before the model is made: the budget is set from its level)
    for disabled in (["accumulate_grads"], []):
        torch._dynamo.reset()
        model = make()
        model(MICRO[0]).square().mean().backward()
        gc.collect()
        budget = device_memory.allocated() + int(0.4 * WEIGHT_BYTES)
        options = {"memory_budget": budget, "disable_passes": disabled}
        if disabled:
            with pytest.raises(Exception) as info:  # (torch wraps it at the first call)
                accumulate(model, options)
            error = BudgetError.within(info.value)
            assert error is not None and error.smallest_feasible_bytes >= budget + 0.6 * WEIGHT_BYTES, info.value
            del model, info, error
            continue
        reports = accumulate(model, options)
        assert [r["accumulated"] for r in reports] == [8, 8]
        assert max(r["measured_peak_bytes"] for r in reports) <= budget, [r["measured_peak_bytes"] for r in reports]
        got = [p.grad.clone() for p in model.parameters()]
        del model
        torch._dynamo.reset()
        eager = make()
        eager(MICRO[0]).square().mean().backward()
        accumulate(eager)
        for a, p in zip(got, eager.parameters()):
            assert torch.equal(a, p.grad)


def test_what_autograd_would_do_otherwise_is_done_as_autograd_does_or_refused():
    """``backward(inputs=...)`` leaves the other parameters' ``.grad`` alone, as autograd does;
    ``torch.autograd.grad`` asking for a parameter's gradient, and a hook registered after the
    compile, are refused with what to do (backward returns no gradient to give them), before
    any ``.grad`` is added into."""
    torch._dynamo.reset()
    model, eager = make(), make()
    x = MICRO[0]
    model(x).sum().backward()  # .grad held when compiled
    eager(x).sum().backward()
    cm = torch.compile(model, backend="lohan", options={})
    cm(x).sum().backward(inputs=[model[3].weight])
    eager(x).sum().backward(inputs=[eager[3].weight])
    assert lohan.last_report().graphs[0].pass_report("accumulate_grads")["accumulated"] == 8
    for a, b in zip(model.parameters(), eager.parameters()):
        assert torch.equal(a.grad, b.grad)
    held = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(LohanError, match="autograd.grad"):
        torch.autograd.grad(cm(x).sum(), [model[0].weight])
    model[0].weight.register_hook(lambda g: g * 2)  # (the first layer's: backward reaches it last)
    with pytest.raises(LohanError, match="hook"):
        cm(x).sum().backward()
    # refused before any gradient was added: no .grad is half a step ahead of the others
    assert all(torch.equal(p.grad, h) for p, h in zip(model.parameters(), held))


class SharedGradient(torch.nn.Module):
    """``x + a + b``: backward returns one tensor as the gradient of both ``a`` and ``b``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Parameter(torch.randn(8, 64)), torch.nn.Parameter(torch.randn(8, 64))
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x + self.a + self.b).square().mean()


def test_accumulation_cycles_equal_eager_when_gradients_share_a_tensor():
    """Compiled while ``.grad`` holds gradients, then cycles of two micro-batches with
    ``zero_grad(set_to_none=True)`` between: where ``.grad`` is None the gradient becomes it,
    a copy where another parameter's gradient is the same tensor (else each addition would
    land in both)."""
    torch._dynamo.reset()
    model, eager = SharedGradient(), SharedGradient()
    xs = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model(xs[0]).backward()
    eager(xs[0]).backward()
    cm = torch.compile(model, backend="lohan", options={})
    for cycle in range(2):
        for x in xs[1:]:
            cm(x).backward()
            eager(x).backward()
        assert lohan.last_report().graphs[0].pass_report("accumulate_grads")["accumulated"] == 4
        assert model.a.grad.untyped_storage().data_ptr() != model.b.grad.untyped_storage().data_ptr()
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert torch.equal(p.grad, q.grad), (cycle, name)
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
