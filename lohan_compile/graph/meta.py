"""Per-node facts, in one namespaced place: ``node.meta["lohan"]``.

``NodeInfo`` is frozen. The partitioner copies ``node.meta`` shallowly from the
joint graph into the forward and backward graphs, so a fact is changed by
storing a new ``NodeInfo`` (``set_info(node, replace(info, ...))``), never by
mutating a shared one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

import torch.fx as fx

KEY = "lohan"


class Role(str, enum.Enum):
    PARAM = "param"  # an nn.Parameter input (trainable or frozen)
    BUFFER = "buffer"  # a module buffer (static-lifetime input that is not a Parameter)
    INPUT = "input"  # a user input (tensor or symbolic size)
    TANGENT = "tangent"  # incoming gradient of a forward output
    RNG_STATE = "rng_state"  # functionalized RNG seeds and offsets
    TOKEN = "token"  # effect tokens threading side-effecting ops
    FORWARD = "forward"  # a forward computation
    BACKWARD = "backward"  # a backward computation
    SAVED = "saved"  # a forward value kept for backward (activation, or a view of an input)
    OUTPUT = "output"  # the graph's output node


class Kind(str, enum.Enum):
    """What the joint graph's outputs are (from AOTAutograd's output descriptors)."""

    USER_OUTPUT = "user_output"
    MUTATION = "mutation"  # new value of a mutated input (a BatchNorm running stat)
    GRAD = "grad"
    SAVED = "saved"
    RNG = "rng"
    TOKEN = "token"
    OTHER = "other"


@dataclass(frozen=True)
class NodeInfo:
    role: Role
    made_by: str  # the pass that created the node or set this fact
    input_index: int | None = None  # index into the backend's example inputs
    source: str | None = None  # where dynamo found the input, e.g. "L['self']...weight"
    requires_grad: bool = False
    # indices (into the example inputs) of the inputs whose gradient this node is
    grad_of: tuple[int, ...] = ()
    # for SAVED: the forward node whose storage this value shares (itself when not a view),
    # and whether that storage is a graph input (a parameter, say) rather than an activation
    storage_of: str | None = None
    saved_input_view: bool = False
    outputs: tuple[Kind, ...] = ()  # for the output node: what each output is
    action: str | None = None  # for nodes a rewrite inserted: what they do (swap_out, recompute, ...)

    def with_(self, **changes: Any) -> "NodeInfo":
        return replace(self, **changes)


def get_info(node: fx.Node) -> NodeInfo | None:
    info = node.meta.get(KEY)
    return info if isinstance(info, NodeInfo) else None


def set_info(node: fx.Node, info: NodeInfo) -> None:
    node.meta[KEY] = info
