"""The Hugging Face Trainer through lohan (lohan_compile.hf.prepare): the same training as the
Trainer with its own AdamW, under a memory budget, with accumulation, checkpoints and LoRA."""

import copy
import gc
import os
import sys

import pytest
import torch

pytest.importorskip("transformers", minversion="5.24")
pytest.importorskip("accelerate")

from models import tiny_llama
from transformers import Trainer, TrainingArguments

import lohan_compile as lohan
from lohan_compile import hf


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, each its own labels (causal LM)."""

    def __init__(self, n, t=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 128, (n, t), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_llama(layers=2)


def arguments(out, **changes):
    kw = {
        "output_dir": str(out), "use_cpu": True, "report_to": [], "per_device_train_batch_size": 2,
        "max_steps": 5, "learning_rate": 1e-3, "weight_decay": 0.1, "warmup_steps": 2, "logging_steps": 1,
        "save_strategy": "no", "dataloader_num_workers": 0, "seed": 0, "optim": "adamw_torch",
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**kw, **changes})


def train(model, out, *, lohan_options=None, resume=None, eval_data=None, **changes):
    """Train ``model`` with a Trainer (through lohan when ``lohan_options`` is a dict); returns
    the per-step logs and, with ``eval_data``, the evaluation loss after training. The
    Trainer is dropped: the budget counts every allocated device byte, an earlier run's too."""
    trainer = Trainer(model=model, args=arguments(out, **changes), train_dataset=Tokens(24),
                      eval_dataset=eval_data)
    if lohan_options is not None:
        hf.prepare(trainer, **lohan_options)
    trainer.train(resume_from_checkpoint=resume)
    if lohan_options is not None:
        assert all(p.grad is None for p in trainer.model.parameters())  # gradients left the device
    logs = [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]
    eval_loss = trainer.evaluate()["eval_loss"] if eval_data is not None else None
    trainer.accelerator.free_memory()
    del trainer, model
    gc.collect()
    return logs, eval_loss


def assert_same_logs(eager, compiled, *, atol=1e-4):
    assert [(h["step"], "loss" in h) for h in eager] == [(h["step"], "loss" in h) for h in compiled]
    for e, c in zip(eager, compiled):
        if "eval_loss" in e:  # an evaluation during training
            assert c["eval_loss"] == pytest.approx(e["eval_loss"], abs=atol), (e, c)
            continue
        assert c["loss"] == pytest.approx(e["loss"], abs=atol), (e, c)
        assert c["learning_rate"] == e["learning_rate"], (e, c)  # the Trainer's scheduler drives both
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4), (e, c)


@pytest.fixture(scope="module")
def unplanned_peak(base, tmp_path_factory):
    """Device peak of a Trainer step through lohan with every activation kept."""
    train(copy.deepcopy(base), tmp_path_factory.mktemp("keep"), lohan_options={}, max_steps=2)
    peak = lohan.last_report().summary()["measured_peak_bytes"]
    torch._dynamo.reset()
    return peak


def clip_limit(base, out, **changes):
    """A max_grad_norm at the median of the unclipped run's norms: some steps clip, some do not."""
    logs, _ = train(copy.deepcopy(base), out, max_grad_norm=0.0, **changes)
    norms = sorted(h["grad_norm"] for h in logs if "grad_norm" in h)
    return norms[len(norms) // 2]


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_under_a_budget_trains_as_the_trainer_with_its_own_adamw(base, unplanned_peak, tmp_path, accumulation):
    limit = clip_limit(base, tmp_path / "norms", gradient_accumulation_steps=accumulation)
    steps = {"gradient_accumulation_steps": accumulation, "eval_strategy": "steps", "eval_steps": 2}
    eval_data = Tokens(4, seed=9)
    eager_logs, eager_eval = train(copy.deepcopy(base), tmp_path / "eager", max_grad_norm=limit,
                                   eval_data=eval_data, **steps)
    budget = int(unplanned_peak * 0.85)
    logs, eval_loss = train(copy.deepcopy(base), tmp_path / "lohan", max_grad_norm=limit, eval_data=eval_data,
                            lohan_options={"memory_budget": budget}, **steps)
    summary = lohan.last_report().summary()
    assert_same_logs(eager_logs, logs)
    norms = [h["grad_norm"] for h in eager_logs if "grad_norm" in h]
    assert len(norms) == 5 and any(n > limit for n in norms) and any(n <= limit for n in norms)
    assert sum("eval_loss" in h for h in logs) == 3  # evaluated during training (steps 2, 4, 5) too
    assert summary["budget_bytes"] == budget
    assert summary["measured_peak_bytes"] <= budget, summary
    # the budget made the planner move activations
    assert summary["swapped_bytes"] + summary["recomputed_bytes"] > 0, summary
    assert summary["measured_peak_bytes"] <= budget, summary
    assert eval_loss == pytest.approx(eager_eval, abs=1e-4)


@pytest.mark.slow
def test_resuming_from_a_checkpoint_continues_bit_exactly(base, unplanned_peak, tmp_path):
    # deferred: step() returns while updates still run, so saving must wait for them
    opts = {"memory_budget": int(unplanned_peak * 0.85), "overlap": "deferred"}
    run = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3, "max_grad_norm": 1.0}
    full, _ = train(copy.deepcopy(base), tmp_path / "full", lohan_options=opts, **run)
    torch._dynamo.reset()
    # a fresh model: the checkpoint brings the weights, the optimizer's fp32 masters and
    # moments, the scheduler, the data order and the RNG
    resumed, _ = train(copy.deepcopy(base), tmp_path / "resumed", lohan_options=opts,
                       resume=str(tmp_path / "full" / "checkpoint-3"), **run)
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]  # the first three from the checkpoint
    for a, b in zip(full, resumed):
        assert (a["loss"], a["grad_norm"], a["learning_rate"]) == (b["loss"], b["grad_norm"], b["learning_rate"])
    assert any(h["grad_norm"] > 1.0 for h in full)  # the optimizer clipped
    from safetensors.torch import load_file

    ends = [tmp_path / name / "checkpoint-6" for name in ("full", "resumed")]
    weights = [load_file(str(d / "model.safetensors")) for d in ends]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    states = [torch.load(d / "optimizer.pt", weights_only=True)["state"] for d in ends]
    for i, st in states[0].items():
        for name, t in st.items():
            assert torch.equal(t, states[1][i][name]), (i, name)
    assert any("master" in st for st in states[0].values())  # the host fp32 masters were saved


@pytest.mark.slow
def test_the_best_model_loaded_at_the_end_is_what_training_continues_from(tmp_path):
    """Weights loaded into a trained model (load_best_model_at_end) reach the host fp32 masters
    the optimizer updates, as they would reach torch AdamW's parameters."""
    torch.manual_seed(0)
    trainer = Trainer(
        model=tiny_llama(layers=1), train_dataset=Tokens(24), eval_dataset=Tokens(4, seed=9),
        args=arguments(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                       save_steps=1, load_best_model_at_end=True, metric_for_best_model="loss",
                       greater_is_better=False, learning_rate=1e-2, warmup_steps=0),
    )
    hf.prepare(trainer, overlap="deferred")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4"), best  # a step other than the last
    from safetensors.torch import load_file

    hf.synchronize(trainer)  # a no-op here (train() did it); what a callback would call
    saved = load_file(os.path.join(best, "model.safetensors"))
    opt = trainer._lohan.optimizer
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
        assert torch.equal(opt.state[p]["master"], saved[name]), name


@pytest.mark.slow
def test_lora_through_peft_trains_only_the_adapters(base, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    lora = peft.get_peft_model(copy.deepcopy(base), config)
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    # no clipping here (max_grad_norm=0): the logged norm is still the optimizer's
    eager_logs, _ = train(copy.deepcopy(lora), tmp_path / "eager", max_grad_norm=0.0)
    logs, _ = train(lora, tmp_path / "lohan", lohan_options={}, max_grad_norm=0.0)
    assert_same_logs(eager_logs, logs)
    after = dict(lora.named_parameters())
    for n, p in frozen.items():
        assert torch.equal(after[n].detach(), p), n  # the base model is untouched
    assert any(not torch.equal(after[n].detach(), p) for n, p in adapters.items())
    offloaded = lohan.last_report().graphs[0].pass_report("offload_grads")["offloaded"]
    assert offloaded == len(adapters)  # only the adapters have gradients, and they all left the device


def small_trainer(tmp_path, **changes):
    torch.manual_seed(0)
    return Trainer(model=tiny_llama(layers=1), args=arguments(tmp_path, **changes), train_dataset=Tokens(4))


@pytest.mark.slow
def test_bf16_autocast_under_a_budget_trains_within_bf16_tolerance_of_the_trainer(base, tmp_path):
    """bf16=True: the compiled forward runs under accelerate's autocast (the casts are in the
    graph, weights and CPUAdamW's state stay fp32), and the budget holds."""
    steps = {"bf16": True, "max_grad_norm": 1.0}
    eager_logs, _ = train(copy.deepcopy(base), tmp_path / "eager", **steps)
    train(copy.deepcopy(base), tmp_path / "keep", lohan_options={}, max_steps=2, **steps)
    budget = int(lohan.last_report().summary()["measured_peak_bytes"] * 0.85)
    torch._dynamo.reset()
    logs, _ = train(copy.deepcopy(base), tmp_path / "lohan", lohan_options={"memory_budget": budget}, **steps)
    summary = lohan.last_report().summary()
    assert len(logs) == len(eager_logs) == 5
    for e, c in zip(eager_logs, logs):
        assert c["loss"] == pytest.approx(e["loss"], abs=2e-2), (e, c)
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=2e-2), (e, c)
    assert summary["measured_peak_bytes"] <= budget, summary
    assert summary["swapped_bytes"] + summary["recomputed_bytes"] > 0, summary


class OwnLossTrainer(Trainer):
    """A Trainer subclass whose compute_loss works outside the model: the loss from the logits
    it returns, plus a penalty on a weight read directly (its gradient reaches ``.grad`` outside
    the compiled graph, beside the graph's own)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        loss = loss + 1e-3 * self.model.lm_head.weight.square().sum()
        return (loss, outputs) if return_outputs else loss


@pytest.mark.slow
def test_a_trainer_subclass_with_its_own_compute_loss_trains_as_without_lohan(base, tmp_path):
    def run(out, lohan_options=None):
        trainer = OwnLossTrainer(model=copy.deepcopy(base), args=arguments(out, max_grad_norm=1.0),
                                 train_dataset=Tokens(24))
        if lohan_options is not None:
            hf.prepare(trainer, **lohan_options)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        trainer.accelerator.free_memory()
        return logs

    eager_logs = run(tmp_path / "eager")
    logs = run(tmp_path / "lohan", {})
    assert_same_logs(eager_logs, logs)
    assert any(h["grad_norm"] > 1.0 for h in eager_logs)  # clipping is at work


def test_the_optimizer_follows_the_training_arguments(tmp_path):
    trainer = hf.prepare(small_trainer(tmp_path, max_grad_norm=0.5, adam_beta1=0.8, adam_epsilon=1e-6))
    opt = trainer.optimizer
    assert isinstance(opt, lohan.CPUAdamW) and opt.max_grad_norm == 0.5
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.999) and decay["eps"] == 1e-6 and decay["lr"] == 1e-3
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])  # Trainer.get_decay_parameter_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ValueError, match="already prepared"):
        hf.prepare(trainer)


def test_a_model_without_a_loss_type_trains_in_one_graph(tmp_path):
    """GPT-2 has no ``loss_type``: transformers warns from its forward that it falls back to
    the causal LM loss, and dynamo would break the graph there (the loss a second graph of
    the step). prepare names that loss: one graph, the same loss as the Trainer's own."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    assert gpt2().loss_type is None
    eager_logs, _ = train(gpt2(), tmp_path / "eager", max_steps=2)
    logs, _ = train(gpt2(), tmp_path / "lohan", lohan_options={}, max_steps=2)
    assert len(lohan.last_report().graphs) == 1
    assert_same_logs(eager_logs, logs)


def test_a_cpu_adamw_given_to_the_trainer_is_used(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama(layers=1)
    opt = lohan.CPUAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Tokens(4), optimizers=(opt, None))
    assert hf.prepare(trainer).optimizer is opt


@pytest.mark.parametrize(
    "changes, options, match",
    [
        ({"optim": "sgd"}, {}, "adamw_torch"),
        ({"torch_compile": True}, {}, "torch_compile"),
        ({"auto_find_batch_size": True}, {}, "auto_find_batch_size"),
        ({}, {"memory_budjet": "1GiB"}, "memory_budget"),
        ({}, {"memory_budget": "6G"}, "ambiguous"),
        ({}, {"optimizer": None}, "optimizers="),
    ],
    ids=["sgd", "torch-compile", "auto-batch-size", "unknown-option", "bad-budget", "optimizer-option"],
)
def test_what_prepare_cannot_honour_is_refused_before_training(tmp_path, changes, options, match):
    trainer = small_trainer(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        hf.prepare(trainer, **options)
    assert trainer.optimizer is None and trainer.model_wrapped is trainer.model


def test_options_this_version_cannot_honour_are_refused_before_training(tmp_path):
    with pytest.raises(lohan.LohanError, match="zero-infinity"):
        hf.prepare(small_trainer(tmp_path), policy="zero-infinity")


@pytest.mark.slow
def test_weights_and_state_beyond_host_memory_train_as_the_trainer(tmp_path):
    """offload_params=True with ssd_dir and a host budget a quarter of the weights and moments:
    the Trainer's losses, gradient norms and evaluation as with its own AdamW; its checkpoint
    (through the model's state_dict) holds the trained weights."""
    from safetensors.torch import load_file
    from test_ssd_weights import deep_llama, host_budget_for
    from test_stream_params import budget_for

    base = deep_llama()
    run = {"max_steps": 4, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 4}
    limit = clip_limit(base, tmp_path / "norms", max_steps=4)
    eval_data = Tokens(4, seed=9)
    eager_logs, eager_eval = train(copy.deepcopy(base), tmp_path / "eager", max_grad_norm=limit,
                                   eval_data=eval_data, **run)
    eager_weights = load_file(str(tmp_path / "eager" / "checkpoint-4" / "model.safetensors"))
    (tmp_path / "ssd").mkdir()
    opts = {"memory_budget": budget_for(deep_llama, 0.5), "offload_params": True, "executor": "fx",
            "tune_plans": False,
            "host_memory_budget": host_budget_for(base), "ssd_dir": str(tmp_path / "ssd")}
    logs, eval_loss = train(copy.deepcopy(base), tmp_path / "lohan", max_grad_norm=limit, eval_data=eval_data,
                            lohan_options=opts, **run)
    summary = lohan.last_report().summary()
    assert_same_logs(eager_logs, logs)
    assert eval_loss == pytest.approx(eager_eval, abs=1e-4)
    assert summary["measured_peak_bytes"] <= opts["memory_budget"], summary
    assert summary["host_peak_bytes"] <= opts["host_memory_budget"], summary
    from lohan_compile.runtime import hosttier

    tier = hosttier.current()  # the one of host_memory_budget and ssd_dir
    assert tier.ssd is not None and tier.stats().ssd_bytes_read > 4 * opts["host_memory_budget"]
    weights = load_file(str(tmp_path / "lohan" / "checkpoint-4" / "model.safetensors"))
    assert weights.keys() == eager_weights.keys()
    for name, t in weights.items():
        torch.testing.assert_close(t, eager_weights[name], atol=1e-4, rtol=0, msg=name)
    torch._dynamo.reset()


def test_a_torch_optimizer_given_to_the_trainer_is_refused(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama(layers=1)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Tokens(4),
                      optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(ValueError, match="CPUAdamW"):
        hf.prepare(trainer)


@pytest.mark.parametrize("version", ["4.56.0", "5.23.1", "6.0.0"])
def test_an_unsupported_transformers_says_which_versions_are_supported(monkeypatch, version):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(ImportError, match=r"transformers>=5\.24,<6"):
        hf.check_transformers()


def test_without_transformers_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"lohan_compile\[hf\]"):
        hf.check_transformers()
