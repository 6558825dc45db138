"""Device memory an op allocates inside itself: its *scratch* (workspace) bytes.

A graph's storages are its nodes' outputs; the simulator counts those exactly. Some ops
also allocate memory they free before they return, which no node of the graph shows:
convolution's layout reorders and im2col buffers, the pooling and batch-norm backward's
temporaries, a reduction's partial sums, cuDNN's and cuBLAS's workspaces on a GPU. At
such an op the step peaks higher than its outputs say (a small CNN: 8 MiB above a 25 MiB
prediction).

``OpScratch`` measures it: each op that may allocate inside (not views, not pointwise
ops) runs once, on the step's own weights and batch where the backend gives them and the op
cannot write into them, else on zeros of its inputs' shapes, strides and dtypes, and what
the device counter saw at its highest point beyond its inputs and its outputs is its scratch.
Results are kept per process by the op and its inputs' description, so identical layers
and re-plans measure nothing new. Where nothing can run (a plan on the meta device, a
GPU whose step is in progress) ``estimated`` gives a conservative figure instead, and the
runtime's measurement of the first steps corrects the plan where it ran over. (The backend
chooses which: ``CompileFacts.op_scratch``.)
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from ..ops import PURE_OPS, arg_values, pure_op_name, pure_op_scratch
from .fxutil import is_view, output_tensors
from .shapes import hint_int, nbytes_hint

log = logging.getLogger("lohan_compile")

# (op, inputs' description) -> scratch bytes, measured in this process
_MEASURED: dict[tuple, int] = {}

# ops known to allocate inside themselves where they cannot be measured: the estimate is this
# many times the bytes of their largest tensor argument or result (at least what the kernels
# of these machines take for a CNN's convolutions, pooling and batch norm, tests/test_scratch.py:
# oneDNN's convolution backward with AVX-512 takes 2.08 times its largest tensor)
_ESTIMATED = {
    "convolution_backward": 3,
    **dict.fromkeys((
        "convolution", "cudnn_convolution", "max_pool2d_with_indices_backward", "max_pool3d_with_indices_backward",
        "native_batch_norm_backward", "native_batch_norm_legit_functional", "native_batch_norm",
        "adaptive_avg_pool2d_backward", "avg_pool2d_backward", "native_group_norm_backward",
        "native_layer_norm_backward", "upsample_bilinear2d_backward", "grid_sampler_2d_backward",
    ), 2),
}


# ops Inductor lowers to a call of an external library kernel (ATen's, oneDNN's, cuBLAS's),
# which allocates what the eager op does
_EXTERN = {"convolution", "_convolution", "mm", "addmm", "bmm", "baddbmm", "_int_mm", "_scaled_mm"}


# namespaces of ops never run to be measured: lohan's own (copies, waits) and collectives
_NOT_RUN = {"lohan", "c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor", "fsdp"}


def _measurable(node: fx.Node) -> bool:
    """An op that is safe and worth running on zeros at plan time: not lohan's, not a collective
    (other ranks would have to take part), not a view, not elementwise, not an assert (zeros may
    fail it) nor a random draw, with a tensor result. (A user's custom op is measured, on zeros
    made for it: whatever it writes is theirs.)"""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if (target.namespace in _NOT_RUN and not _pure_lohan(target)) or is_view(node) \
            or target._opname.startswith("_assert"):
        return False
    if torch.Tag.pointwise in target.tags or torch.Tag.nondeterministic_seeded in target.tags:
        return False  # an elementwise kernel writes its output and nothing else
    val = node.meta.get("val")
    outs = val if isinstance(val, (list, tuple)) else [val]
    return any(isinstance(v, torch.Tensor) for v in outs)


def inductor_generates(node: fx.Node) -> bool:
    """Whether Inductor writes the op's code itself (not a fallback to the eager kernel, nor an
    external library call): then it allocates nothing inside beyond what its segment's
    measurement shows (``segments.excess_over_plan``), whatever the eager op does."""
    from torch._inductor import lowering

    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target._opname in _EXTERN:
        return False
    return target in lowering.lowerings and target not in lowering.fallbacks


def _tensor_vals(node: fx.Node) -> list:
    out = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            out.append(a.meta.get("val"))
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    for a in list(node.args) + list(node.kwargs.values()):
        visit(a)
    val = node.meta.get("val")
    out.extend(val if isinstance(val, (list, tuple)) else [val])
    return out


def _describe(a: Any) -> Any:
    if isinstance(a, fx.Node):
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor):
            return ("T", tuple(hint_int(d) for d in v.shape), tuple(hint_int(d) for d in v.stride()), v.dtype,
                    str(v.device))
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return ("S", hint_int(v) if isinstance(v, torch.SymInt) else v.node.hint)
        return ("N", repr(v))
    if isinstance(a, (list, tuple)):
        return tuple(_describe(x) for x in a)
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("S", hint_int(a) if isinstance(a, torch.SymInt) else a.node.hint)
    return repr(a)


def signature(node: fx.Node) -> tuple:
    return (str(node.target), _describe(tuple(node.args)), tuple(sorted((k, _describe(v)) for k, v in node.kwargs.items())))


def _pure_lohan(target: Any) -> bool:
    """One of lohan's ops that only compute (``ops.PURE_OPS``: the chunked loss)."""
    return target.namespace == "lohan" and target._opname in PURE_OPS


def estimate_scratch(node: fx.Node) -> int:
    """A conservative guess for ops known to allocate inside (none for the others)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return 0
    name = pure_op_name(node)
    if name is not None:
        return pure_op_scratch(name, arg_values(node))
    times = _ESTIMATED.get(target._opname.lstrip("_"), 0)
    return times * max((nbytes_hint(v) for v in _tensor_vals(node) if isinstance(v, torch.Tensor)), default=0)


def fused_away(node: fx.Node) -> bool:
    """Inductor: the node's result may be fused into every reader, never to exist in memory (an
    elementwise op or a fill (``full``, ``zeros``) Inductor writes code for, read only by ops
    Inductor writes code for, none of them a view, nor an output of its graph). The plan holds
    it until a compiled segment is seen with it inside (``CompileFacts.fused``); a reader
    across a segment boundary makes it a segment output after all, which the segments'
    measurement finds (``materialized``); Inductor may still keep it inside a segment (several
    readers, a reduction), which the measurement finds as bytes above the plan's model
    (``segment_scratch``)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    # (a fill, an op that reads no tensor: Inductor writes its values where they are read, and a
    # scatter into it, max pooling's backward, makes one buffer of it and the scatter's result)
    fill = (torch.Tag.nondeterministic_seeded not in target.tags
            and not any(isinstance(a.meta.get("val"), torch.Tensor) for a in node.all_input_nodes))
    if not (torch.Tag.pointwise in target.tags or fill) or target._schema.is_mutable or not inductor_generates(node):
        return False
    if not isinstance(node.meta.get("val"), torch.Tensor) or not node.users:
        return False
    return all(u.op == "call_function" and isinstance(u.target, torch._ops.OpOverload) and not is_view(u)
               and not u.target._schema.is_mutable and inductor_generates(u) for u in node.users)


def writes_arguments(target: Any) -> bool:
    """Whether an op may write into its arguments: its schema says so (a graph AOTAutograd
    functionalized holds no op that writes undeclared: torch.compile relies on the schemas of
    custom ops too), or it is one of aten's batch norms that write their running statistics
    without saying so (not the functional ones AOTAutograd's training graphs hold), or it is
    no ``OpOverload`` at all (a higher-order op: it cannot be told)."""
    if not isinstance(target, torch._ops.OpOverload):
        return True
    name = target._opname
    return target._schema.is_mutable or ("batch_norm" in name and "functional" not in name)


class OpScratch:
    """Scratch bytes of ops, measured on ``device`` with the runtime's device counter
    (``counter``: ``allocated``, ``peak``, ``reset_peak``, ``raise_peak``); with
    ``inductor``, none for the ops Inductor generates code for."""

    def __init__(self, device: torch.device | None, counter: Any, *, inductor: bool = False,
                 real_value: Callable[[fx.Node], torch.Tensor | None] | None = None,
                 budget: int | None = None):
        self.device = device
        self.counter = counter
        self.inductor = inductor
        # the step's own tensor for an argument (a parameter, the batch), where it has one: an
        # op that writes into none of its arguments runs on it rather than on a copy beside it
        self.real_value = real_value
        # the device bytes the process may hold: a measurement runs inside a step (a graph is
        # compiled when it is first called), so what it allocates counts against the budget
        self.budget = budget

    def __call__(self, node: fx.Node) -> int:
        if not _measurable(node) or (self.inductor and inductor_generates(node)):
            return 0
        try:
            # (this CPU's kernels take per-thread temporaries: the thread count is part of the key)
            key = (str(self.device), torch.get_num_threads(), signature(node))
            if key not in _MEASURED:
                _MEASURED[key] = self._measure(node)
        except NoRoom as e:
            log.debug("lohan: scratch of %s not measured (%s); estimated", node.format_node(), e)
            return estimate_scratch(node)  # (not kept: measured once there is room)
        except Exception as e:  # noqa: BLE001 - an op that cannot run on zeros is estimated
            log.debug("lohan: scratch of %s not measured (%s: %s); estimated", node.format_node(),
                      type(e).__name__, e)
            return estimate_scratch(node)
        return _MEASURED[key]

    def _check_room(self, node: fx.Node, reads_only: bool) -> None:
        """Raise ``NoRoom`` where the inputs made for ``node`` and its results would not fit the
        budget beside what the device holds now. (What it allocates inside is what is being
        measured: the step holds it too, with the same inputs and results, beside what is alive
        throughout the step, which is all the device holds when a plan is made.)"""
        if self.budget is None:
            return
        made = {a: nbytes_hint(a.meta["val"]) for a in node.all_input_nodes
                if isinstance(a.meta.get("val"), torch.Tensor)
                and not (reads_only and self.real_value(a) is not None)}
        need = sum(made.values()) + sum(nbytes_hint(v) for v in output_tensors(node))
        room = self.budget - self.counter.allocated(self.device)
        if need > room:
            raise NoRoom(f"its inputs and results take {need} bytes, {max(room, 0)} are left under the budget")

    def _measure(self, node: fx.Node) -> int:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        counter, device = self.counter, self.device
        on_cuda = device is not None and device.type == "cuda"
        before = counter.peak(device)  # (before the inputs too: a step in progress keeps its own)
        with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(devices=[device] if on_cuda else []):
            made: dict[fx.Node, Any] = {}

            reads_only = self.real_value is not None and not writes_arguments(node.target)
            self._check_room(node, reads_only)

            def real(a: Any) -> Any:
                if isinstance(a, fx.Node):
                    if a not in made:
                        own = self.real_value(a) if reads_only else None
                        made[a] = own if own is not None else _zeros_like(a.meta.get("val"))
                    return made[a]
                if isinstance(a, (list, tuple)):
                    return type(a)(real(x) for x in a)
                return a

            args = [real(a) for a in node.args]
            kwargs = {k: real(v) for k, v in node.kwargs.items()}
            try:
                if on_cuda:
                    node.target(*args, **kwargs)  # the first call may tune, with memory of its own
                    torch.cuda.synchronize(device)
                level = counter.allocated(device)
                counter.reset_peak(device)
                out = node.target(*args, **kwargs)
                if on_cuda:
                    torch.cuda.synchronize(device)
                peak = counter.peak(device)
                inputs = {t.untyped_storage().data_ptr() for t in made.values() if isinstance(t, torch.Tensor)}
                outputs = _new_storage_bytes(out, inputs)
                del out
            finally:
                del args, kwargs
                made.clear()
                restore_peak(counter, before, device)
        return max(0, peak - level - outputs)


def restore_peak(counter: Any, before: int, device: Any) -> None:
    """After a measurement that reset the device peak (its allocations freed again): the peak
    is what it was before, as if the measurement never ran (a step in progress keeps its own).
    (CUDA keeps no setter: its peak stays reset; nothing is measured there mid-step.)"""
    counter.reset_peak(device)
    counter.raise_peak(before, device)


def _zeros_like(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        shape = [hint_int(d) for d in v.shape]
        stride = [hint_int(d) for d in v.stride()]
        return torch.empty_strided(shape, stride, dtype=v.dtype, device=v.device).zero_()
    if isinstance(v, torch.SymInt):
        return hint_int(v)
    if isinstance(v, (torch.SymFloat, torch.SymBool)):
        return v.node.hint
    return v


class NoRoom(Exception):
    """A measurement that could take the device past its budget, not run."""


def _new_storage_bytes(out: Any, inputs: set[int]) -> int:
    seen: set[int] = set(inputs)
    total = 0
    stack = [out]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, torch.Tensor):
            s = v.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def estimated(executor: str | None = None) -> Callable[[fx.Node], int]:
    """Each op's scratch where nothing can run (a plan on the meta device; on CUDA while a step
    is in progress, whose peak statistics a measurement would reset)."""
    if executor != "inductor":
        return estimate_scratch
    return lambda node: 0 if inductor_generates(node) else estimate_scratch(node)
