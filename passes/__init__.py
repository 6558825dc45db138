"""Graph passes of lohan_compile, one per file (see README.md for the invariants).

Installed as ``lohan_compile.passes``. ``default_pipeline()`` lists the
passes in the order the backend runs them.
"""

from __future__ import annotations

from lohan_compile.graph.pipeline import Pass, Pipeline
from lohan_compile.passes.accumulate_grads import accumulate_grads
from lohan_compile.passes.apply_plan import apply_plan
from lohan_compile.passes.chunk_loss import chunk_loss
from lohan_compile.passes.classify_roles import classify_roles
from lohan_compile.passes.classify_saved import classify_saved
from lohan_compile.passes.offload_grads import offload_grads
from lohan_compile.passes.partition_graph import partition_graph
from lohan_compile.passes.plan_memory import plan_memory
from lohan_compile.passes.reduce_grads import reduce_grads
from lohan_compile.passes.stream_params import stream_params


def default_passes() -> list[Pass]:
    return [
        Pass("classify_roles", classify_roles, inference=True),
        Pass("chunk_loss", chunk_loss, requires=("classify_roles",)),
        Pass("partition_graph", partition_graph, required=True),
        Pass("classify_saved", classify_saved, requires=("classify_roles",)),
        Pass("reduce_grads", reduce_grads, required=True, requires=("classify_roles",)),
        Pass("offload_grads", offload_grads, requires=("classify_roles",)),
        Pass("accumulate_grads", accumulate_grads, requires=("classify_roles",)),
        Pass("plan_memory", plan_memory, requires=("classify_saved",)),
        Pass("apply_plan", apply_plan, requires=("plan_memory",)),
        Pass("stream_params", stream_params, inference=True, requires=("classify_roles",)),
    ]


def default_pipeline() -> Pipeline:
    return Pipeline(default_passes())


PASS_NAMES = tuple(p.name for p in default_passes())

__all__ = [
    "PASS_NAMES",
    "accumulate_grads",
    "apply_plan",
    "chunk_loss",
    "classify_roles",
    "classify_saved",
    "default_passes",
    "default_pipeline",
    "offload_grads",
    "partition_graph",
    "plan_memory",
    "reduce_grads",
    "stream_params",
]
