"""Reading AOTAutograd's metadata: input and output descriptors.

Roles come from these descriptors (``meta["desc"]``) and the partitioner's
tags, never from node names. Every access to AOTAutograd's descriptor types
goes through this module, so a torch upgrade that moves them is one edit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._dynamo import compiled_autograd
from torch._functorch._aot_autograd import descriptors as d

from .meta import Kind, Role


def output_descs(gm: fx.GraphModule) -> list[Any]:
    """Descriptors of the graph's outputs, one per output (None where absent)."""
    out = gm.graph.output_node()
    n = len(out.args[0])
    descs = out.meta.get("desc")
    if not isinstance(descs, (list, tuple)) or len(descs) != n:
        return [None] * n
    return list(descs)


def input_index(desc: Any) -> int | None:
    """Index into the backend's example inputs that a placeholder descriptor names."""
    while isinstance(desc, (d.ViewBaseAOTInput, d.SyntheticBaseAOTInput)):
        desc = desc.base_of
    if isinstance(desc, d.PlainAOTInput):
        return desc.idx
    return None


def placeholder_role(desc: Any, input_kind: str | None) -> Role:
    """Role of a placeholder from its descriptor and what the backend's input is."""
    if isinstance(desc, d.TangentAOTInput) or (isinstance(desc, d.AOTInput) and desc.is_tangent()):
        return Role.TANGENT
    if isinstance(
        desc,
        (d.PhiloxForwardSeedAOTInput, d.PhiloxForwardBaseOffsetAOTInput,
         d.PhiloxBackwardSeedAOTInput, d.PhiloxBackwardBaseOffsetAOTInput),
    ):
        return Role.RNG_STATE
    if isinstance(desc, (d.ForwardTokenAOTInput, d.BackwardTokenAOTInput)):
        return Role.TOKEN
    if isinstance(desc, d.AOTInput) and desc.is_param():
        return Role.PARAM
    if isinstance(desc, d.AOTInput) and desc.is_buffer():
        return Role.BUFFER
    if input_kind in (Role.PARAM.value, Role.BUFFER.value):
        return Role(input_kind)
    return Role.INPUT


def is_tangent_desc(desc: Any) -> bool:
    return isinstance(desc, d.AOTInput) and desc.is_tangent()


def is_backward_only_input(desc: Any) -> bool:
    """Backward inputs that are not saved values: tangents, backward RNG state and tokens."""
    return is_tangent_desc(desc) or isinstance(
        desc, (d.PhiloxBackwardSeedAOTInput, d.PhiloxBackwardBaseOffsetAOTInput, d.BackwardTokenAOTInput)
    )


def output_kind(desc: Any) -> Kind:
    if isinstance(desc, d.GradAOTOutput):
        return Kind.GRAD
    if isinstance(desc, d.InputMutationAOTOutput):
        return Kind.MUTATION
    if isinstance(desc, (d.SavedForBackwardsAOTOutput, d.SavedForBackwardsNoVcCheckAOTOutput)):
        return Kind.SAVED
    if isinstance(desc, (d.PhiloxUpdatedForwardOffsetAOTOutput, d.PhiloxUpdatedBackwardOffsetAOTOutput)):
        return Kind.RNG
    if isinstance(desc, (d.ForwardTokenAOTOutput, d.BackwardTokenAOTOutput)):
        return Kind.TOKEN
    if isinstance(desc, (d.PlainAOTOutput, d.IntermediateBaseAOTOutput, d.MetadataMutationAOTOutput)):
        return Kind.USER_OUTPUT
    return Kind.OTHER


def grad_input_index(desc: Any) -> int | None:
    """For a gradient output, the example-input index of what it is the gradient of."""
    if isinstance(desc, d.GradAOTOutput):
        return input_index(desc.grad_of)
    return None


def is_backward_node(node: fx.Node) -> bool | None:
    """The partitioner's own tag; None when the node carries none."""
    tag = node.meta.get("partitioner_tag")
    if tag == "is_backward":
        return True
    if tag == "is_forward":
        return False
    return None


# -- the runtime interface AOTAutograd built around a forward and backward ---------------

def saved_interface(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> tuple:
    """What AOTAutograd's runtime wrapper fixed, when it was built, about a forward and backward
    pair: how many values saved for backward are symbolic sizes, tensors saved without a version
    check, or other objects (it slices the forward's outputs by those counts, from the end: the
    number of saved tensors is free), and which gradients backward returns. Another plan of the
    same joint graph can run inside the same wrapper where these are equal. None where the saved
    values are not in the order the wrapper slices them in (tensors, then tensors without a
    version check, objects, sizes): no plan can share such a wrapper."""
    saved = fw.graph.output_node().args[0][num_fwd_outputs:]
    kinds = [_saved_kind(n) for n in saved]
    if kinds != sorted(kinds):
        return None
    grads = tuple(g is None for g in bw.graph.output_node().args[0])
    return (kinds.count(1), kinds.count(2), kinds.count(3), grads)


def _saved_kind(node: Any) -> int:
    """0: a tensor, 1: one saved without a version check, 2: another object, 3: a size."""
    if not isinstance(node, fx.Node):
        return 2
    if _is_sym(node):
        return 3
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return 2
    return 1 if node.meta.get("saved_tensor_with_no_vc_check", False) else 0


def forward_metadata() -> Any:
    """AOTAutograd's view-and-mutation metadata of the forward it is compiling now (from the
    tracing context; None outside one), which its runtime wrapper reads at every call."""
    context = torch._guards.TracingContext.try_get()
    return context.fw_metadata if context is not None else None


def compiled_autograd_enabled() -> bool:
    """Compiled autograd traces backward from AOTAutograd's first backward graph, whatever runs
    inside its wrapper later."""
    return bool(compiled_autograd.compiled_autograd_enabled)


def retarget_saved_metadata(fw_metadata: Any, fw: fx.GraphModule, num_fwd_outputs: int) -> None:
    """Point the wrapper's record of which saved tensors have dynamic sizes (by position among
    the saved values, marked on them each forward) at the saved values of ``fw``: what
    AOTAutograd computes for the forward it compiles (``_categorize_saved_tensors_for_backward``)."""
    saved = fw.graph.output_node().args[0][num_fwd_outputs:]
    dynamic = {}
    for idx, n in enumerate(saved):
        val = n.meta.get("val") if isinstance(n, fx.Node) else None
        if isinstance(val, torch.Tensor):
            dims = {dim for dim, size in enumerate(val.shape) if not isinstance(size, int)}
            if dims:
                dynamic[idx] = dims
    fw_metadata.dynamic_saved_tensors_idxs = dynamic


def _is_sym(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))
