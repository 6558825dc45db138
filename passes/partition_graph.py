"""partition_graph: split the joint graph into forward and backward graphs.

Requires: a joint graph and AOTAutograd's partition arguments (in the facts).
Ensures: ``graphs.fw`` and ``graphs.bw`` are set; the forward graph returns
the user outputs followed by the values saved for backward (descriptors
``SavedForBackwardsAOTOutput``), and the backward graph takes those values in
the same order followed by the tangents. Node metadata, ``meta["lohan"]``
included, is carried over from the joint graph.

With nothing to plan, this is torch's default partitioner, which saves what
the joint graph computed rather than recomputing it: results are bitwise
those of ``aot_eager``.
"""

from __future__ import annotations

from typing import Any

from torch._functorch.partitioners import default_partition

from ..pipeline import CompileFacts, Graphs

NAME = "partition_graph"


def partition_graph(graphs: Graphs, facts: CompileFacts) -> tuple[Graphs, dict[str, Any]]:
    assert graphs.joint is not None and facts.num_fwd_outputs is not None
    fw, bw = default_partition(
        graphs.joint,
        facts.joint_inputs,
        num_fwd_outputs=facts.num_fwd_outputs,
        **facts.partition_kwargs,
    )
    report = {
        "partitioner": "default",
        "fw_nodes": len(fw.graph.nodes),
        "bw_nodes": len(bw.graph.nodes),
    }
    return Graphs(joint=graphs.joint, fw=fw, bw=bw), report
