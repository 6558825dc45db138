"""``lohan.explain``: what the compiler would do with a training step, without training.

The step is traced and planned on a copy of the model on the meta device
(no memory, no arithmetic, the user's model untouched), through the same
backend, passes and planner as training; the returned ``Report`` holds the
decisions (``plan_table()``, ``decisions()``) and the predictions
(``summary()``), with the measured figures left empty.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .options import Options
from .optim import CPUAdamW
from .report import Report
from .runtime.step import TRACKER


def explain(
    model: torch.nn.Module,
    *example_args: Any,
    example_kwargs: dict[str, Any] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    **options: Any,
) -> Report:
    """Plan one training step of ``model(*example_args, **example_kwargs)`` and return the report.

    ``options`` are those of ``torch.compile(model, backend="lohan", options=...)``
    (``memory_budget``, ``policy``, ``hardware``, ``optimizer``, ...). With an
    ``optimizer`` (a ``CPUAdamW`` over the model's parameters) the report also
    says which gradients would be offloaded; nothing is updated. The loss is
    ``loss_fn(output)`` when given, else the output's ``.loss`` (Hugging Face
    models given labels), else the output itself when it is a scalar, else the
    sum of the first output tensor (enough to plan the backward).

    Example::

        report = lohan.explain(model, ids, example_kwargs={"labels": ids},
                               memory_budget="2GiB", hardware="rtx4090")
        print(report.plan_table(limit=None))
    """
    opts = Options.coerce(options)
    meta_model, mapping = _meta_copy(model)
    # the plan, not the code: nothing is compiled (and Inductor's decompositions would turn
    # the flash attention traced below back into the math path)
    compile_options = {**opts.as_dict(), "executor": "fx"}
    meta_opt = None
    if opts.optimizer is not None:
        real = opts.optimizer
        groups = []
        for group in real.param_groups:
            missing = [p for p in group["params"] if id(p) not in mapping]
            if missing:
                raise ValueError(
                    "explain(): the optimizer holds parameters that are not the model's; give the "
                    "CPUAdamW built over model.parameters()"
                )
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [mapping[id(p)] for p in group["params"]]})
        meta_opt = CPUAdamW(groups, max_grad_norm=real.max_grad_norm, overlap=real.overlap,
                            skip_nonfinite=real.skip_nonfinite)
        compile_options["optimizer"] = meta_opt
    args = [_to_meta(a) for a in example_args]
    kwargs = {k: _to_meta(v) for k, v in (example_kwargs or {}).items()}
    compiled = torch.compile(meta_model, backend="lohan", options=compile_options)
    try:
        with warnings.catch_warnings(), flash_attention_on_meta():
            # ops that run eagerly on meta tensors (a loss outside the graph) have no
            # autograd kernel there; torch warns, harmlessly for a plan
            warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
            out = compiled(*args, **kwargs)
            loss = _loss_of(out, loss_fn)
            if not loss.requires_grad:
                raise ValueError(
                    "explain(): the loss does not require grad, so there is no backward to plan. On the "
                    "meta device, code that reads a value (.item(), data-dependent branches) can run "
                    "outside the compiled graphs without autograd; give the model no labels and pass "
                    "loss_fn= computing the loss from its output (e.g. cross-entropy of the logits)"
                )
            loss.backward()
        report = TRACKER.last_report()
    finally:
        if meta_opt is not None:
            meta_opt.zero_grad()  # no step: the (empty) step is dropped
    if report is None:
        raise RuntimeError("explain(): the step produced no report (did the model run any graph?)")
    report.planned_only = True
    return report


def _meta_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, dict[int, torch.Tensor]]:
    """A copy of ``model`` whose parameters and buffers are meta tensors (nothing allocated)."""
    memo: dict[int, Any] = {}
    mapping: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        if id(p) not in memo:
            meta = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            memo[id(p)] = mapping[id(p)] = meta
    for b in model.buffers():
        if id(b) not in memo:
            memo[id(b)] = torch.empty_like(b, device="meta")
    meta_model = copy.deepcopy(model, memo)
    config = getattr(meta_model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False  # a training step keeps no KV cache
    return meta_model, mapping


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def _loss_of(out: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(out)
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    first = out
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if not isinstance(first, torch.Tensor) and hasattr(out, "logits"):
        first = out.logits
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"explain(): cannot find a loss in a {type(out).__name__}; pass loss_fn=")
    return first if first.dim() == 0 else first.sum()


@contextlib.contextmanager
def flash_attention_on_meta():
    """Trace ``scaled_dot_product_attention`` on meta tensors as a fused flash-attention
    kernel, as a GPU runs it, instead of the math decomposition the meta device falls back
    to (which would plan a sequence x sequence attention matrix per head that no GPU kernel
    materializes). The op traced is the CPU flash kernel: it saves what the GPU's does
    (output and log-sum-exp) and the cost model knows its FLOPs."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta" or dropout_p != 0.0:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            groups = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(groups, dim=-3)
            value = value.repeat_interleave(groups, dim=-3)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
