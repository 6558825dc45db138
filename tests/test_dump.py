"""Dumps can be read back: every inserted node is annotated; the trace is valid JSON with its tracks."""

import json

import torch

from lohan_compile.dump import TRACKS
from models import tiny_llama


def test_dump_of_a_planned_graph(tmp_path):
    torch.manual_seed(0)
    cm = torch.compile(tiny_llama(), backend="lohan", options={"dump_dir": str(tmp_path), "policy": "recompute-all"})
    ids = torch.randint(0, 128, (2, 16))
    cm(input_ids=ids, labels=ids).loss.backward()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["graph0_bw.py", "graph0_fw.py", "graph0_joint.py", "graph0_plan.md", "graph0_trace.json"]
    bw = (tmp_path / "graph0_bw.py").read_text()
    compile(bw, "graph0_bw.py", "exec")
    recomputed = [line for line in bw.splitlines() if "# recompute" in line]
    plan = (tmp_path / "graph0_plan.md").read_text()
    assert len(recomputed) == plan.count("| recompute |") > 0
    assert all("by apply_plan" in line for line in recomputed)
    fw = (tmp_path / "graph0_fw.py").read_text()
    assert "plan: keep" in fw and "predicted" in fw
    trace = json.loads((tmp_path / "graph0_trace.json").read_text())
    tracks = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert tracks == set(TRACKS.values())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 for e in spans)
    assert any(e["name"].startswith("recompute:") for e in spans)
