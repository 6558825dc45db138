"""Annotated dumps of the graphs of one compile (``dump_dir`` / ``LOHAN_DUMP_DIR``).

One file per graph (joint, forward, backward): every node on a line, with its
role, shape, dtype and bytes beside it.
"""

from __future__ import annotations

import os

import torch
import torch.fx as fx

from .meta import get_info
from .options import format_bytes
from .pipeline import Graphs
from .report import GraphRecord
from .shapes import nbytes_hint


def annotate(node: fx.Node) -> str:
    info = get_info(node)
    parts = []
    if info is not None:
        parts.append(info.role.value)
        if info.source:
            parts.append(info.source)
        if info.grad_of:
            parts.append("grad of input " + ",".join(map(str, info.grad_of)))
        if info.storage_of and info.storage_of != node.name:
            parts.append(f"view of %{info.storage_of}")
        parts.append(f"by {info.made_by}")
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        shape = "x".join(str(s) for s in val.shape) or "scalar"
        parts.append(f"{shape} {str(val.dtype).removeprefix('torch.')} {format_bytes(nbytes_hint(val))}")
    elif val is not None and not isinstance(val, (list, tuple)):
        parts.append(f"{type(val).__name__} {val}")
    return "  # " + ", ".join(parts) if parts else ""


def render(gm: fx.GraphModule, title: str) -> str:
    lines = [f"# {title}", "# one line per node: fx node  # role, source, shape dtype bytes, pass that set the role"]
    for node in gm.graph.nodes:
        lines.append((node.format_node() or f"%{node.name}") + annotate(node))
    return "\n".join(lines) + "\n"


def dump_graphs(folder: str, record: GraphRecord, graphs: Graphs) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, gm in graphs.items():
        kind = "inference" if graphs.inference and name == "fw" else name
        path = os.path.join(folder, f"graph{record.graph_id}_{kind}.txt")
        with open(path, "w") as f:
            f.write(render(gm, f"{record.name}, {kind} graph"))
        written.append(path)
    return written
