"""Parameter streaming (offload_params): weights twice the device budget, exact AdamW."""

import pytest
import torch

import lohan_compile as lohan
from lohan_compile.measure import measure_device_peak
from lohan_compile.runtime import stream
from test_offload import assert_close_models, eager_reference, lm_loss


def streamy_llama(layers=4):
    """A LLaMA whose weights dwarf its activations at the batches below (4.3 MiB of fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def batches(n, b=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (b, t), generator=g) for _ in range(n)]


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def streamed_params(model):
    return [p for p in model.parameters() if stream.lookup(p) is not None]


def train_steps(cm, opt, data):
    """One optimizer step per batch; the losses."""
    losses = []
    for ids in data:
        loss = lm_loss(cm, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def weights_of(make):
    with torch.device("meta"):
        return weight_bytes(make())


def budget_for(make, fraction):
    """``fraction`` of the model's weight bytes above what the process already holds on the
    device: the planner plans around every byte held (the CPU stand-in counts all of them, and a
    tensor that an earlier test's compiled code still holds too)."""
    import gc

    from lohan_compile.runtime import device

    gc.collect()
    return device.allocated() + int(fraction * weights_of(make))


@pytest.mark.parametrize("overlap", ["speculative", "deferred"])
def test_weights_twice_the_budget_train_exactly_within_the_budget(overlap):
    # the budget covers everything on the device (the CPU stand-in counts every c10 allocation):
    # no eager model may be alive while lohan runs, so eager runs before (for the clipping
    # limit) and after (the reference), each time from the same seed
    data = batches(3)
    _, norms = eager_reference(streamy_llama(), data, lm_loss, lr=1e-3, max_grad_norm=None)
    limit = sorted(norms)[len(norms) // 2]  # some steps clip, some do not
    budget = budget_for(streamy_llama, 0.5)
    held = budget - weights_of(streamy_llama) // 2  # (what the process held before)
    torch._dynamo.reset()
    box = {}

    def build():
        model = streamy_llama()
        opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, max_grad_norm=limit, overlap=overlap)
        cm = torch.compile(model, backend="lohan",
                           options={"optimizer": opt, "memory_budget": budget, "offload_params": True})
        box.update(model=model, opt=opt, losses=[], norms=[], peaks=[])
        return cm, opt

    def step(state):
        cm, opt = state
        ids = data[len(box["losses"])]
        loss = lm_loss(cm, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        box["losses"].append(loss.detach())
        box["norms"].append(opt.last_grad_norm)
        box["peaks"].append(lohan.last_report().summary()["measured_peak_bytes"])

    peak = measure_device_peak(build, step, steps=3)
    model, opt = box["model"], box["opt"]
    assert weight_bytes(model) >= 2 * (budget - held)
    # every step within the budget, the first included (the profiler's first step also holds
    # the weights as the model was built, until compiling streams them)
    assert max(box["peaks"]) <= budget, (box["peaks"], budget)
    assert max(peak.step_peaks[1:]) <= budget, (peak.step_peaks, budget)
    big = [p for p in model.parameters() if p.numel() * p.element_size() >= 64 << 10]
    assert streamed_params(model) and set(map(id, streamed_params(model))) == set(map(id, big))
    assert all(p.untyped_storage().nbytes() == 0 for p in big)  # at rest: no device memory
    report = lohan.last_report().summary()
    # every fetch really moved its weight: forward and backward each bring the streamed bytes in
    streamed_bytes = sum(p.numel() * p.element_size() for p in big)
    assert report["h2d_bytes"] >= 2 * streamed_bytes
    eager = streamy_llama()
    le, ne = eager_reference(eager, data, lm_loss, lr=1e-3, max_grad_norm=limit)
    for a, b in zip(le, box["losses"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert box["norms"] == pytest.approx(ne, rel=1e-4)
    with lohan.materialized(model):
        assert_close_models(eager, model)


def test_auto_streams_when_the_weights_do_not_fit():
    """offload_params="auto" (the default): weights above the budget are streamed."""
    data = batches(2)
    budget = budget_for(streamy_llama, 0.5)
    model = streamy_llama()
    _train(model, data, {"memory_budget": budget})
    assert streamed_params(model)
    assert lohan.last_report().summary()["measured_peak_bytes"] <= budget


class Adapted(torch.nn.Module):
    """An MLP plus a trained low-rank adapter beside it (as LoRA adds one)."""

    def __init__(self, mlp, hidden, rank=8):
        super().__init__()
        self.mlp = mlp
        self.down = torch.nn.Linear(hidden, rank, bias=False)
        self.up = torch.nn.Linear(rank, hidden, bias=False)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.mlp(x) + self.up(self.down(x))


def adapted_llama():
    model = streamy_llama(layers=2)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    for layer in model.model.layers:
        layer.mlp = Adapted(layer.mlp, 128)
    return model


def test_frozen_streamed_weights_with_trained_adapters():
    """LoRA-like: the base weights are frozen and streamed; only the small adapters train."""
    data = batches(3)
    model = adapted_llama()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = lohan.CPUAdamW(trainable, lr=1e-2)
    # (half the weights beside what the process already holds: an earlier test's leftovers count)
    cm = torch.compile(model, backend="lohan",
                       options={"optimizer": opt, "memory_budget": budget_for(adapted_llama, 0.5),
                                "offload_params": True})
    losses = train_steps(cm, opt, data)
    streamed = streamed_params(model)
    assert streamed and all(not p.requires_grad for p in streamed)
    assert all(stream.lookup(p).spare is None for p in streamed)  # frozen: no update buffer
    eager = adapted_llama()
    le, _ = eager_reference(eager, data, lm_loss, lr=1e-2, max_grad_norm=None)
    for a, b in zip(le, losses):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    with lohan.materialized(model):
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            if not p.requires_grad:
                assert p.equal(q), name  # never updated
        assert_close_models(eager, model)


def test_the_model_stays_usable_state_dict_save_pretrained_inference_and_resume(tmp_path):
    data = batches(5)
    model = streamy_llama(layers=2)
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, overlap="deferred")
    options = {"optimizer": opt, "offload_params": True}  # streamed without a budget too
    cm = torch.compile(model, backend="lohan", options=options)
    for ids in data[:2]:
        lm_loss(cm, ids).backward()
        opt.step()
        opt.zero_grad()
    assert streamed_params(model)
    # a full state dict while streamed, equal to what the model holds when materialized
    sd = lohan.state_dict(model)
    with lohan.materialized(model):
        plain = {k: v.detach().clone() for k, v in model.state_dict().items()}
        eager_logits = model(input_ids=data[4]).logits
        model.save_pretrained(tmp_path / "hf")
    assert sd.keys() == plain.keys() and all(sd[k].equal(plain[k]) for k in sd)
    assert all(p.untyped_storage().nbytes() == 0 for p in streamed_params(model))  # released again
    # inference through the compiled model, streamed too
    with torch.no_grad():
        logits = cm(input_ids=data[4]).logits
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=0)
    # save_pretrained wrote the current weights
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    for k, v in loaded.state_dict().items():
        assert v.equal(plain[k]), k
    # resume: a new model and optimizer from the checkpoint continue bit-exactly
    osd = opt.state_dict()
    resumed = streamy_llama(layers=2)
    resumed.load_state_dict(sd)
    opt2 = lohan.CPUAdamW(resumed.parameters(), lr=1e-3, overlap="deferred")
    opt2.load_state_dict(osd)
    cm2 = torch.compile(resumed, backend="lohan", options={**options, "optimizer": opt2})
    for ids in data[2:4]:
        a = lm_loss(cm, ids)
        a.backward()
        opt.step()
        opt.zero_grad()
        b = lm_loss(cm2, ids)
        b.backward()
        opt2.step()
        opt2.zero_grad()
        assert a.detach().equal(b.detach())
    with lohan.materialized(model), lohan.materialized(resumed):
        for (name, x), y in zip(model.named_parameters(), resumed.parameters()):
            assert x.equal(y), name


def test_a_trained_parameter_without_a_lohan_optimizer_is_refused():
    model = streamy_llama(layers=1)
    cm = torch.compile(model, backend="lohan", options={"offload_params": True})
    with pytest.raises(Exception, match="CPUAdamW"):
        lm_loss(cm, batches(1)[0]).backward()


def test_streamed_weights_with_optimizer_state_on_ssd(tmp_path):
    """Weights twice the device budget and optimizer state beyond the host budget: the same
    exact AdamW, SSD used, and its files gone with the tier."""
    import os

    from lohan_compile.runtime import hosttier

    data = batches(3)
    budget = budget_for(streamy_llama, 0.5)
    model = streamy_llama()
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    # host: streamed weights and their update buffers, host gradients and weight buffers
    # (fp32: 16 B/parameter), staging for the largest update, and half the optimizer state
    host_budget = 16 * n + 36 * largest + 6 * n + (128 << 10)
    previous = hosttier.current_if_set()
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, overlap="deferred")
    cm = torch.compile(model, backend="lohan", options={
        "optimizer": opt, "memory_budget": budget, "offload_params": True,
        "host_memory_budget": host_budget, "ssd_dir": str(tmp_path)})
    try:
        losses = train_steps(cm, opt, data)
        assert streamed_params(model)
        tier = opt.state_tier
        assert any(opt._on_ssd(t) for p in model.parameters() for t in opt.state[p].values())
        assert tier.stats().ssd_bytes_written > 0 and tier.stats().ssd_bytes_read > 0
        assert tier.stats().peak_in_use_bytes <= host_budget
        folder = tier.ssd.folder
        assert os.listdir(folder)
        eager = streamy_llama()
        le, _ = eager_reference(eager, data, lm_loss, lr=1e-3, max_grad_norm=None)
        for a, b in zip(le, losses):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        with lohan.materialized(model):
            assert_close_models(eager, model)
    finally:
        torch._dynamo.reset()
        hosttier.set_current(previous)
    del cm
    opt.state.clear()
    tier.close()
    assert not os.path.exists(folder)


def _train(model, data, options):
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, max_grad_norm=0.5, overlap="deferred")
    cm = torch.compile(model, backend="lohan", options={"optimizer": opt, **options})
    return train_steps(cm, opt, data), opt


def test_bf16_weights_streamed_train_bitwise_as_resident_ones():
    """Low-precision weights in the host tier, fp32 masters in the optimizer: streaming moves
    the same bytes the resident run reads, so the two runs are bitwise equal."""
    data = batches(3)
    streamed = streamy_llama(layers=2).to(torch.bfloat16)
    ls, opt = _train(streamed, data, {"offload_params": True})
    torch._dynamo.reset()
    resident = streamy_llama(layers=2).to(torch.bfloat16)
    lr_, opt_r = _train(resident, data, {"offload_params": False})
    opt_r.synchronize()  # its last deferred updates write the resident weights
    assert streamed_params(streamed)
    assert all(stream.lookup(p).host.dtype == torch.bfloat16 for p in streamed_params(streamed))
    assert all(opt.state[p]["master"].dtype == torch.float32 for p in streamed_params(streamed))
    for a, b in zip(lr_, ls):
        assert a.equal(b)
    with lohan.materialized(streamed):
        for (name, x), y in zip(streamed.named_parameters(), resident.parameters()):
            assert x.equal(y), name


@pytest.mark.inductor
def test_streaming_under_inductor_within_the_budget():
    """The default executor: Inductor compiles the compute between the fetches and releases."""
    data = batches(3)
    budget = budget_for(lambda: streamy_llama(layers=2), 0.6)
    model = streamy_llama(layers=2)
    losses, _ = _train(model, data, {"memory_budget": budget, "offload_params": True, "executor": "inductor"})
    report = lohan.last_report().summary()
    assert streamed_params(model)
    assert report["measured_peak_bytes"] <= budget
    ref, _ = eager_reference(streamy_llama(layers=2), data, lm_loss, lr=1e-3, max_grad_norm=0.5)
    for a, b in zip(ref, losses):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_on_cuda_within_the_budget():
    """The same on a GPU: fetches are host-to-device copies on the copy engine's stream, the
    peak is what torch.cuda.max_memory_allocated counts. The budget counts every allocated
    byte, cuBLAS's workspaces too (tens of MiB on a recent GPU, one per thread that runs
    matmuls: forward's and autograd's): it is what the process holds before the model, plus
    half the weights."""
    warm = torch.nn.Linear(8, 8).cuda()
    warm(torch.randn(4, 8, device="cuda")).sum().backward()  # both threads' cuBLAS workspaces
    del warm
    data = [b.cuda() for b in batches(3)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    budget = base + weights_of(streamy_llama) // 2
    model = streamy_llama().cuda()
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, max_grad_norm=0.5, overlap="deferred")
    cm = torch.compile(model, backend="lohan",
                       options={"optimizer": opt, "memory_budget": budget, "offload_params": True})
    losses = []
    for i, ids in enumerate(data):
        if i == 0:  # every step, the first included
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        loss = lm_loss(cm, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    assert streamed_params(model)
    peak = torch.cuda.max_memory_allocated()
    print(f"cuda streaming: base {base} B, budget {budget} B, peak {peak} B "
          f"(peak above base / budget above base: {(peak - base) / (budget - base):.3f})")
    assert peak <= budget
    torch._dynamo.reset()
    ref, _ = _train(streamy_llama().cuda(), data, {"offload_params": False})
    for a, b in zip(ref, losses):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_auto_does_not_stream_weights_that_fit():
    """offload_params="auto" with room for the weights: nothing is streamed. (Last in this file:
    the resident model it trains outlives the test inside torch's tracing state, and would count
    against the budgets of the tests above.)"""
    roomy = streamy_llama(layers=1)
    _train(roomy, batches(1), {"memory_budget": 8 * weights_of(streamy_llama)})
    assert not streamed_params(roomy)
