"""Fine-tuning with the Hugging Face ``Trainer`` through lohan.

    from transformers import Trainer, TrainingArguments
    import lohan_compile.hf

    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=data)
    trainer = lohan_compile.hf.prepare(trainer, memory_budget="6GiB")
    trainer.train()

The Trainer cannot name the backend itself: accelerate accepts only its own list
of backend names, so ``TrainingArguments(torch_compile_backend="lohan")`` is
refused. :func:`prepare` does what the Trainer would do for a compiled model and
its own AdamW, with gradient offloading:

- the optimizer is a :class:`~lohan_compile.CPUAdamW` built by the Trainer's own
  ``create_optimizer`` from the TrainingArguments (``learning_rate``,
  ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay`` on the Trainer's decay
  group only), with ``max_grad_norm`` moved into the optimizer;
- the model the Trainer trains (``trainer.model_wrapped``) is
  ``torch.compile(model, backend="lohan", options={..., "optimizer": opt})``;
  ``trainer.model`` stays the plain model, which evaluation and saving use;
- micro-batches after which the Trainer does not step (gradient accumulation)
  run inside ``opt.accumulate()``: their gradients add up on the host;
- the Trainer's gradient clipping is the optimizer's (``param.grad`` stays None:
  gradients left the device during backward), and the logged ``grad_norm`` is
  ``opt.last_grad_norm``, the norm before clipping, as ``clip_grad_norm_``
  returns it;
- the weights are complete (``opt.synchronize()``) before anything outside the
  compiled forward reads or writes them: evaluation, prediction, saving,
  loading a checkpoint, the end of ``train()`` (elsewhere, :func:`synchronize`).

The Trainer's learning-rate scheduler drives the optimizer; checkpoints hold
the optimizer's state (fp32 masters and moments) and the scheduler's, and
``train(resume_from_checkpoint=...)`` resumes where the run was.

With ``bf16=True`` the compiled model's forward runs under the accelerator's
autocast, as ``accelerator.prepare`` arranges for a model it wraps: the graph
holds the autocast casts, weights and gradients stay fp32, and outputs come back
in fp32.

Any ``Trainer`` subclass works (TRL's ``SFTTrainer`` among them), including one
whose ``compute_loss`` computes the loss outside the model, from its outputs or
from the weights: gradients that reach ``param.grad`` outside the compiled graph
(a graph break, code dynamo runs eagerly) are clipped and updated with the rest.

Supported: transformers 5.24 up to 6 (exclusive) with accelerate; one device per
process, and several processes (``torchrun``, ``accelerate launch``: the model is
compiled bare and lohan averages its gradients over the ranks, as DDP would);
``optim`` ``"adamw_torch"`` or ``"adamw_torch_fused"`` (the default); ``bf16=True``
or fp32. Refused with a message: ``fp16=True`` (it needs loss scaling; use bf16),
DeepSpeed, FSDP, several GPUs in one process, ``model_init``,
``auto_find_batch_size``, ``torch_compile=True``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .backend import check_supported, use_host_tier
from .optim import CPUAdamW
from .options import Options
from .runtime import stream
from .runtime.offload import runtime_of

SUPPORTED_TRANSFORMERS = ("5.24", "6")  # lowest supported, first unsupported
TESTED_TRANSFORMERS = "5.24"
_ADAMW = ("adamw_torch", "adamw_torch_fused")


def _supported() -> str:
    low, high = SUPPORTED_TRANSFORMERS
    return f"transformers>={low},<{high} (tested with {TESTED_TRANSFORMERS}) and accelerate"


def check_transformers() -> None:
    """Raise ``ImportError`` naming the supported versions when transformers is missing or
    outside them: :func:`prepare` overrides Trainer methods of those versions."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"lohan_compile.hf needs {_supported()}: pip install 'lohan_compile[hf]'"
        ) from e
    from packaging.version import Version

    version = Version(transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not Version(low) <= Version(version.base_version) < Version(high):
        raise ImportError(
            f"lohan_compile.hf supports {_supported()}; transformers {transformers.__version__} is "
            "installed. Its Trainer's training loop differs: install a supported version "
            "(pip install 'lohan_compile[hf]')."
        )


def prepare(trainer: Any, *, overlap: str = "auto", skip_nonfinite: bool = True, **options: Any) -> Any:
    """Make ``trainer`` train through lohan; returns the same Trainer.

    Call it after ``Trainer(...)`` is built and before ``train()``.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass) with its model.
        overlap, skip_nonfinite: of the :class:`~lohan_compile.CPUAdamW` built from the
            TrainingArguments (see there).
        **options: lohan options (``memory_budget``, ``policy``, ``dump_dir``, ...), checked
            at once (``ValueError`` for an unknown key or a malformed value, ``LohanError``
            for one this version cannot honour). ``optimizer``
            is not one of them here: prepare builds it, or takes a ``CPUAdamW`` given to
            the Trainer as ``optimizers=(opt, None)``.
    """
    check_transformers()
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(f"prepare() takes a transformers.Trainer, not {type(trainer).__name__}")
    if getattr(trainer, "_lohan", None) is not None:
        raise ValueError("this Trainer was already prepared for lohan")
    if "optimizer" in options:
        raise ValueError(
            "prepare() builds the CPUAdamW from the TrainingArguments; to give your own, pass it to "
            "the Trainer as optimizers=(CPUAdamW(...), None)"
        )
    # unknown keys, malformed values and what this version cannot honour fail here, not
    # wrapped by torch at the first step
    checked = Options(**options)
    check_supported(checked)
    _check_trainer(trainer)
    cls = _lohan_class(type(trainer))
    opt = _optimizer(trainer, overlap=overlap, skip_nonfinite=skip_nonfinite)
    # the offload runtime now, not at the first compile: optimizer state that a checkpoint loads
    # before then is allocated in the host tier, where the runtime keeps it, and not counted as
    # device memory by the plan (the tier of host_memory_budget / ssd_dir, made current first)
    use_host_tier(checked)
    runtime_of(opt)
    _name_the_loss(trainer.model)
    compiled = torch.compile(trainer.model, backend="lohan", options={**options, "optimizer": opt})
    if trainer.accelerator.mixed_precision == "bf16":
        _autocast_like_accelerate(trainer.accelerator, compiled)
    trainer.__class__ = cls
    trainer._lohan = _State(opt)
    # the Trainer trains model_wrapped when it differs from model (as for a DDP-wrapped one) and
    # lets accelerate prepare only the optimizer
    trainer.model_wrapped = compiled
    return trainer


def _name_the_loss(model: torch.nn.Module) -> None:
    """A transformers model with no ``loss_type`` (GPT-2, among others) warns from inside its
    forward that it falls back to the causal LM loss, and dynamo breaks the graph at that
    warning: the loss becomes a second graph of every step, planned apart from the first.
    Naming the loss transformers falls back to keeps the step one graph computing the same
    loss."""
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import LOSS_MAPPING

    for module in model.modules():  # (a PEFT model holds the transformers one inside)
        if (isinstance(module, PreTrainedModel) and "_loss_function" not in vars(module)
                and getattr(module, "loss_type", None) not in LOSS_MAPPING):
            module.loss_type = "ForCausalLM"


def _autocast_like_accelerate(accelerator: Any, compiled: torch.nn.Module) -> None:
    """What ``accelerator.prepare`` does to a model under mixed precision, done to the compiled
    one (the Trainer does not prepare a model it did not wrap itself): its forward runs under
    the accelerator's autocast, so dynamo traces the autocast casts into the graph, and
    floating-point outputs come back in fp32."""
    from accelerate.utils import convert_outputs_to_fp32

    forward = compiled.forward

    @functools.wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with accelerator.autocast():
            return forward(*args, **kwargs)

    compiled.forward = convert_outputs_to_fp32(autocast_forward)


def synchronize(trainer: Any) -> None:
    """Wait until every parameter of a prepared Trainer's model holds its updated weight.

    The Trainer's own evaluation, saving and loading, and the end of ``train()``, do this
    already; a callback that reads the weights between steps (``on_step_end``) calls it first:
    with ``overlap="deferred"`` the last step's updates may still be running.
    """
    state = getattr(trainer, "_lohan", None)
    if state is None:
        raise ValueError("this Trainer was not prepared for lohan (lohan_compile.hf.prepare)")
    state.synchronize()


def _check_trainer(trainer: Any) -> None:
    args = trainer.args
    refused = []
    if trainer.model_init is not None:
        refused.append("model_init (it builds a new model at train(); pass model= instead)")
    if args.auto_find_batch_size:
        refused.append("auto_find_batch_size")
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        refused.append("DeepSpeed / FSDP")
    if args.n_gpu > 1:
        refused.append(f"several GPUs in one process (n_gpu={args.n_gpu}): start one process per GPU "
                       "with torchrun or accelerate launch, and lohan trains them data parallel")
    if args.torch_compile:
        refused.append("torch_compile=True (prepare() compiles the model with backend='lohan'; leave it off)")
    precision = trainer.accelerator.mixed_precision
    if args.fp16 or precision == "fp16":
        refused.append(
            "fp16=True: the Trainer's loss scaling through accelerate is not supported with lohan yet. "
            "Use bf16=True (autocast, no scaling), or load the model in bfloat16 (CPUAdamW keeps fp32 "
            "master weights); a training loop of your own can use torch.amp.GradScaler with CPUAdamW"
        )
    elif precision not in ("no", "bf16"):
        refused.append(f"mixed_precision={precision!r} (lohan trains fp32 or bf16 autocast: use bf16=True)")
    if str(getattr(args.optim, "value", args.optim)) not in _ADAMW:
        refused.append(f"optim={args.optim!r} (lohan's optimizer is AdamW: use {' or '.join(_ADAMW)})")
    given = trainer.optimizer
    if given is not None and not isinstance(given, CPUAdamW):
        refused.append(
            f"optimizers=({type(given).__name__}, ...): gradients are offloaded to a "
            "lohan_compile.CPUAdamW; pass none (prepare builds it) or a CPUAdamW"
        )
    if given is None and trainer.lr_scheduler is not None:
        refused.append("a scheduler without its optimizer in optimizers=(None, scheduler)")
    cls_kwargs = trainer.optimizer_cls_and_kwargs
    if cls_kwargs is not None and cls_kwargs[0] is not CPUAdamW:
        refused.append(f"optimizer_cls_and_kwargs with {getattr(cls_kwargs[0], '__name__', cls_kwargs[0])}")
    if refused:
        raise ValueError("lohan_compile.hf.prepare() cannot train with: " + "; ".join(refused) + ".")


def _optimizer(trainer: Any, *, overlap: str, skip_nonfinite: bool) -> CPUAdamW:
    args = trainer.args
    max_grad_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
    given = trainer.optimizer
    if given is not None:
        if given.max_grad_norm != max_grad_norm:
            raise ValueError(
                f"the CPUAdamW given to the Trainer clips at max_grad_norm={given.max_grad_norm}, the "
                f"TrainingArguments say max_grad_norm={args.max_grad_norm}: make them agree"
            )
        return given
    kwargs = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "max_grad_norm": max_grad_norm,
        "overlap": overlap,
        "skip_nonfinite": skip_nonfinite,
    }
    if trainer.optimizer_cls_and_kwargs is not None:
        kwargs.update(trainer.optimizer_cls_and_kwargs[1])
    # the Trainer's own create_optimizer: its decay / no-decay groups (get_decay_parameter_names),
    # trainable parameters only, a subclass's override of either honoured
    saved = trainer.optimizer_cls_and_kwargs
    trainer.optimizer_cls_and_kwargs = (CPUAdamW, kwargs)
    try:
        opt = trainer.create_optimizer()
    finally:
        trainer.optimizer_cls_and_kwargs = saved
    if not isinstance(opt, CPUAdamW):
        trainer.optimizer = None
        raise TypeError(
            f"{type(trainer).__name__}.create_optimizer() built a {type(opt).__name__}; lohan offloads "
            "gradients to a CPUAdamW (pass one as optimizers=(CPUAdamW(...), None))"
        )
    return opt


class _State:
    """What a prepared Trainer keeps: its optimizer, and the grad-norm tensor of the step in flight."""

    def __init__(self, opt: CPUAdamW):
        self.optimizer = opt
        self.pending_norm: torch.Tensor | None = None
        opt.register_step_post_hook(self._step_done)

    def grad_norm(self) -> torch.Tensor:
        # The Trainer asks for the norm before optimizer.step(); the optimizer knows it only once
        # step() has seen every gradient. The Trainer reads the value (.item()) when it logs,
        # after the step: hand it a tensor that the step fills in.
        self.pending_norm = torch.full((), float("nan"), dtype=torch.float32)
        return self.pending_norm

    def _step_done(self, opt: CPUAdamW, args: Any, kwargs: Any) -> None:
        if self.pending_norm is not None and opt.last_grad_norm is not None:
            self.pending_norm.fill_(opt.last_grad_norm)
        self.pending_norm = None

    def synchronize(self) -> None:
        self.optimizer.synchronize()

    def weights_loaded(self) -> None:
        """Weights were loaded into the parameters: the host masters of offloaded parameters
        follow them (a checkpoint's optimizer state, loaded after, overwrites them again)."""
        opt = self.optimizer
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    if stream.lookup(p) is not None:
                        continue  # streamed: loading the model's state dict updated its master
                    master = opt.state.get(p, {}).get("master")
                    if master is not None:
                        opt.write_state(master, p.detach().float())


class _LohanTrainer:
    """Overrides mixed in before the user's Trainer class (see :func:`prepare`)."""

    _lohan: _State

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # the Trainer sets sync_gradients for each micro-batch: False when no optimizer step follows
        if self.accelerator.gradient_state.sync_gradients:
            return super().training_step(*args, **kwargs)
        with self._lohan.optimizer.accumulate():
            return super().training_step(*args, **kwargs)

    def _clip_grad_norm(self, model: Any) -> torch.Tensor:
        return self._lohan.grad_norm()  # CPUAdamW(max_grad_norm=...) clips in step()

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return self._lohan.grad_norm() if grad_norm is None else grad_norm

    def train(self, *args: Any, **kwargs: Any) -> Any:
        out = super().train(*args, **kwargs)
        self._lohan.synchronize()  # the caller reads the weights next
        return out

    def _wrap_model(self, model: Any, training: bool = True, dataloader: Any = None) -> Any:
        if not training and model is self.model and any(stream.lookup(p) is not None for p in model.parameters()):
            # evaluation and prediction run the model itself, whose streamed weights have no
            # device memory between steps: the compiled model fetches them where they are read
            return self.model_wrapped
        return super()._wrap_model(model, training, dataloader)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        self._lohan.synchronize()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        self._lohan.synchronize()
        return super().predict(*args, **kwargs)

    def save_model(self, *args: Any, **kwargs: Any) -> None:
        self._lohan.synchronize()
        return super().save_model(*args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        opt = self._lohan.optimizer
        runtime = opt.__dict__.get("_lohan_offload")
        if runtime is None or not runtime.shared:
            return super()._save_optimizer_and_scheduler(output_dir)
        # several processes sharing the update: every rank takes part in gathering the whole
        # state, which the process that saves writes (a resume on any number of ranks loads it)
        full = opt.full_state_dict()
        opt.state_dict = lambda: full
        try:
            return super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del opt.state_dict

    def _load_from_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self._lohan.synchronize()
        super()._load_from_checkpoint(*args, **kwargs)
        self._lohan.weights_loaded()

    def _load_best_model(self, *args: Any, **kwargs: Any) -> None:
        self._lohan.synchronize()
        super()._load_best_model(*args, **kwargs)
        self._lohan.weights_loaded()


@functools.cache
def _lohan_class(cls: type) -> type:
    missing = [name for name in ("_clip_grad_norm", "_get_grad_norm", "_load_from_checkpoint", "_load_best_model",
                                 "_wrap_model")
               if not callable(getattr(cls, name, None))]
    if missing:
        raise ImportError(
            f"this Trainer has no {', '.join(missing)}: lohan_compile.hf supports {_supported()}"
        )
    return type(f"Lohan{cls.__name__}", (_LohanTrainer, cls), {"__module__": __name__})


__all__ = ["SUPPORTED_TRANSFORMERS", "check_transformers", "prepare", "synchronize"]
