"""The LM head's cross-entropy a chunk of tokens at a time (passes/chunk_loss.py, its ops in ops.py)."""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F

import lohan_compile as lohan
from lohan_compile import ops  # noqa: F401 - defines the ops
from lohan_compile.errors import BudgetError
from lohan_compile.measure import measure_device_peak
from models import tiny_llama

MiB = 2**20


def _reference(hidden, weight, target, tangent, reduction, upcast):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    logits = hidden @ weight.t()
    loss = F.cross_entropy(logits.float() if upcast else logits, target, ignore_index=-100,
                           reduction="mean" if reduction == 1 else "sum")
    torch.autograd.backward([loss, logits], [torch.tensor(0.7, dtype=loss.dtype), tangent])
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("with_tangent", [False, True])
def test_the_chunked_ops_equal_cross_entropy_and_its_gradients(dtype, reduction, with_tangent):
    g = torch.Generator().manual_seed(0)
    rows, hidden_size, vocab = 37, 16, 50
    hidden = torch.randn(rows, hidden_size, generator=g).to(dtype)
    weight = torch.randn(vocab, hidden_size, generator=g).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[[0, 5, 6]] = -100
    tangent = torch.randn(rows, vocab, generator=g).to(dtype) if with_tangent else torch.zeros(rows, vocab, dtype=dtype)
    upcast = dtype != torch.float32
    compute = torch.float32
    want_loss, want_hidden, want_weight = _reference(hidden, weight, target, tangent, reduction, upcast)
    logits = hidden @ weight.t()
    loss, total, lse = torch.ops.lohan.chunked_ce_forward(logits, target, -100, reduction, compute, 8)
    grad_hidden, grad_weight = torch.ops.lohan.chunked_linear_ce_backward(
        torch.tensor(0.7, dtype=compute), tangent if with_tangent else None, hidden, weight.t(), target, lse, total,
        -100, reduction, compute, 8)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert total.item() == 34
    torch.testing.assert_close(loss, want_loss, **tol)
    torch.testing.assert_close(grad_hidden, want_hidden, **tol)
    torch.testing.assert_close(grad_weight, want_weight, **tol)
    # the forward that makes its own logits a chunk at a time: the same loss and log-sum-exp
    own_loss, own_total, own_lse = torch.ops.lohan.chunked_linear_ce_forward(hidden, weight.t(), target, -100,
                                                                            reduction, compute, 8)
    assert own_total.item() == 34
    torch.testing.assert_close(own_loss, want_loss, **tol)
    torch.testing.assert_close(own_lse, lse, **tol)
    # no chunk of these rows' own: every row ignored makes the mean NaN, as cross_entropy's does
    none = torch.full_like(target, -100)
    assert torch.isnan(torch.ops.lohan.chunked_ce_forward(logits, none, -100, 1, compute, 8)[0])


def test_the_chunked_ops_pass_opcheck():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(9, 4, generator=g), torch.randn(11, 4, generator=g)
    target = torch.randint(0, 11, (9,), generator=g)
    logits = hidden @ weight.t()
    torch.library.opcheck(torch.ops.lohan.chunked_ce_forward.default, (logits, target, -100, 1, torch.float32, 4))
    torch.library.opcheck(torch.ops.lohan.chunked_linear_ce_forward.default,
                          (hidden, weight.t(), target, -100, 1, torch.float32, 4))
    loss, total, lse = torch.ops.lohan.chunked_ce_forward(logits, target, -100, 1, torch.float32, 4)
    torch.library.opcheck(torch.ops.lohan.chunked_linear_ce_backward.default,
                          (torch.tensor(1.0), None, hidden, weight.t(), target, lse, total, -100, 1, torch.float32, 4))


def _llama_step(model, ids, labels, call=None):
    for p in model.parameters():
        p.grad = None
    out = (call if call is not None else model)(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("executor", ["fx", "inductor"])
@pytest.mark.parametrize("tie", [False, True])
def test_a_hugging_face_loss_chunked_equals_eager(executor, tie):
    torch.manual_seed(0)
    model = tiny_llama(tie=tie, layers=1, vocab=300)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 24))
    labels = ids.clone()
    labels[0, :7] = -100
    torch._dynamo.reset()
    cm = torch.compile(model, backend="lohan", options={"loss_chunks": 5, "executor": executor})
    for _ in range(2):
        loss, grads = _llama_step(model, ids, labels, cm)
        want_loss, want_grads = _llama_step(ref, ids, labels)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    report = lohan.last_report().graphs[0].pass_report("chunk_loss")
    assert report["chunked"] == 1 and report["regions"][0]["chunks"] == 5
    assert report["regions"][0]["rows"] == 48 and report["regions"][0]["vocab"] == 300


class LossOnly(torch.nn.Module):
    """A head that returns only its loss: nothing outside the loss reads the logits."""

    def __init__(self, hidden=16, vocab=300):
        super().__init__()
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, h, y):
        return F.cross_entropy(self.head(h).float().view(-1, self.head.out_features), y.view(-1))


@pytest.mark.parametrize("executor", ["fx", "inductor"])
def test_logits_only_the_loss_reads_never_exist_whole(executor):
    torch.manual_seed(0)
    model = LossOnly()
    ref = copy.deepcopy(model)
    h = torch.randn(2, 24, 16)
    y = torch.randint(0, 300, (2, 24))
    y[0, :5] = -100
    torch._dynamo.reset()
    cm = torch.compile(model, backend="lohan", options={"loss_chunks": 5, "executor": executor})
    for _ in range(2):
        got = [cm(hx := h.clone().requires_grad_(), y)]
        got[0].backward()
        want = ref(hr := h.clone().requires_grad_(), y)
        want.backward()
        torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hx.grad, hr.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.head.weight.grad, ref.head.weight.grad, rtol=1e-4, atol=1e-6)
        model.zero_grad(), ref.zero_grad()
    (region,) = lohan.last_report().graphs[0].pass_report("chunk_loss")["regions"]
    assert region["chunks"] == 5 and region["logits"] == "made a chunk at a time"


def test_logits_read_beside_the_loss_are_not_made_a_chunk_at_a_time():
    class WithAccuracy(LossOnly):
        """The loss and the accuracy of the logits' argmax: not only the loss reads them, so
        forward must make them whole (backward is chunked all the same)."""

        def forward(self, h, y):
            logits = self.head(h).float().view(-1, self.head.out_features)
            return F.cross_entropy(logits, y.view(-1)), (logits.argmax(-1) == y.view(-1)).float().mean()

    torch.manual_seed(0)
    model = WithAccuracy()
    ref = copy.deepcopy(model)
    h, y = torch.randn(2, 24, 16), torch.randint(0, 300, (2, 24))
    torch._dynamo.reset()
    cm = torch.compile(model, backend="lohan", options={"loss_chunks": 5, "executor": "fx"})
    got, got_accuracy = cm(hx := h.clone().requires_grad_(), y)
    want, want_accuracy = ref(hr := h.clone().requires_grad_(), y)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got_accuracy, want_accuracy)
    torch.testing.assert_close(hx.grad, hr.grad, rtol=1e-4, atol=1e-6)
    (region,) = lohan.last_report().graphs[0].pass_report("chunk_loss")["regions"]
    assert region["logits"] == "made whole (read outside the loss)"


def test_a_step_whose_logits_only_the_loss_reads_peaks_below_the_logits_alone():
    rows, vocab = 128, 4000
    logits_bytes = rows * vocab * 4

    def build():
        torch.manual_seed(0)
        model = LossOnly(16, vocab)
        torch._dynamo.reset()
        cm = torch.compile(model, backend="lohan", options={"loss_chunks": 16, "executor": "fx"})
        return model, cm, torch.randn(rows, 16, requires_grad=True), torch.randint(0, vocab, (rows,))

    def run(state):
        model, cm, h, y = state
        model.zero_grad(set_to_none=True)
        h.grad = None
        cm(h, y).backward()

    # (the weight and its gradient take 0.5 MiB, the hidden states 16 KiB: a step that made the
    # 1.95 MiB of fp32 logits whole, or their gradient, would peak above them)
    assert measure_device_peak(build, run, steps=2).peak_bytes < logits_bytes


def test_without_a_budget_auto_leaves_the_loss_whole_and_says_why():
    torch.manual_seed(0)
    model = tiny_llama(layers=1, vocab=300)
    ids = torch.randint(0, 300, (2, 24))
    torch._dynamo.reset()
    torch.compile(model, backend="lohan", options={"executor": "fx"})(input_ids=ids, labels=ids).loss.backward()
    report = lohan.last_report().graphs[0].pass_report("chunk_loss")
    assert report["chunked"] == 0 and report["skipped"] == ["nll_loss_forward: no memory budget"]


def test_a_loss_on_sliced_logits_is_left_whole_and_says_why():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(8, 40, bias=False)

        def forward(self, h, y):
            logits = self.head(h)
            return F.cross_entropy(logits[:, :-1].reshape(-1, 40), y[:, 1:].reshape(-1))

    torch._dynamo.reset()
    cm = torch.compile(Head(), backend="lohan", options={"loss_chunks": 4, "executor": "fx"})
    cm(torch.randn(2, 6, 8), torch.randint(0, 40, (2, 6))).backward()
    report = lohan.last_report().graphs[0].pass_report("chunk_loss")
    assert report["chunked"] == 0
    assert "sliced" in report["skipped"][0] or "not from the head's mm" in report["skipped"][0]


def _qwen(vocab=4000):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, use_cache=False)
    return Qwen2ForCausalLM(cfg).train()


def _peak(options, ids, keep_output=False, steps=2):
    def build():
        torch._dynamo.reset()
        # (what earlier tests left for the collector is freed now, not between the plan's reading
        # of the device level and the step's)
        gc.collect()
        model = _qwen()
        return model, torch.compile(model, backend="lohan", options=options)

    def step(state):
        model, cm = state
        for p in model.parameters():
            p.grad = None
        out = cm(input_ids=ids, labels=ids)
        loss = out.loss
        if not keep_output:
            del out
        loss.backward()

    return measure_device_peak(build, step, steps=steps).peak_bytes


def _smallest(options, ids) -> int:
    with pytest.raises(Exception) as info:
        _peak({**options, "memory_budget": 1 << 20}, ids, steps=1)
    err = BudgetError.within(info.value)
    assert err is not None and err.smallest_feasible_bytes
    return err.smallest_feasible_bytes


def test_chunking_lowers_the_smallest_budget_and_the_step_keeps_it():
    # 4 x 128 tokens, vocabulary 4000: 7.8 MiB of fp32 logits, the largest tensors of the step
    ids = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(1))
    whole = _smallest({"executor": "fx", "loss_chunks": 1}, ids)
    chunked = _smallest({"executor": "fx"}, ids)
    assert chunked < 0.6 * whole
    budget = int(chunked * 1.002)
    # (no trial of other plans: the step measured is the plan reported, whatever this machine's load)
    measured = _peak({"executor": "fx", "memory_budget": budget, "tune_plans": False}, ids)
    report = lohan.last_report()
    assert report.graphs[0].pass_report("chunk_loss")["chunked"] == 1
    assert measured <= budget
    assert report.summary()["predicted_peak_bytes"] == pytest.approx(measured, rel=0.02)
    assert not report.graphs[0].pass_report("plan_memory")["loss_rows_per_chunk"]  # (no room for fewer)
    # with room under the budget, fewer chunks (of more rows each) whose scratch still fits
    # (the user keeps the logits, as the first plan of a graph assumes: predicted = measured)
    roomy = int(whole * 1.5)
    measured = _peak({"executor": "fx", "memory_budget": roomy, "tune_plans": False}, ids, keep_output=True)
    report = lohan.last_report()
    chosen = report.graphs[0].pass_report("plan_memory")["loss_rows_per_chunk"]
    assert chosen and min(chosen.values()) > 4 * 128 // 32
    assert measured <= roomy
    assert report.summary()["predicted_peak_bytes"] == pytest.approx(measured, rel=0.02)


def test_a_plan_that_needs_the_logits_dropped_refuses_a_step_that_keeps_them():
    ids = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(1))
    chunked = _smallest({"executor": "fx"}, ids)
    options = {"executor": "fx", "memory_budget": int(chunked * 1.002)}
    with pytest.raises(BudgetError, match="still alive when backward starts") as info:
        _peak(options, ids, keep_output=True, steps=1)
    assert info.value.smallest_feasible_bytes > chunked  # a plan that holds them needs more


def test_fp32_logits_of_a_bf16_head_take_their_tangent_in_fp32():
    # a model returning head(h).float(): the logits' tangent is fp32, the head's gradients bf16
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(12, 8, generator=g).to(torch.bfloat16)
    weight = torch.randn(30, 8, generator=g).to(torch.bfloat16)
    target = torch.randint(0, 30, (12,), generator=g)
    tangent = torch.randn(12, 30, generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = (h @ w.t()).float()
    loss = F.cross_entropy(logits, target)
    torch.autograd.backward([loss, logits], [torch.tensor(1.0), tangent])
    lse_out = torch.ops.lohan.chunked_ce_forward(hidden @ weight.t(), target, -100, 1, torch.float32, 5)
    grad_hidden, grad_weight = torch.ops.lohan.chunked_linear_ce_backward(
        torch.tensor(1.0), tangent, hidden, weight.t(), target, lse_out[2], lse_out[1], -100, 1, torch.float32, 5)
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    torch.testing.assert_close(grad_hidden, h.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_weight, w.grad, rtol=2e-2, atol=2e-2)
