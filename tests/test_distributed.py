"""Several processes (``torchrun``, gloo on the CPU): lohan never trains the ranks apart silently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "ranks" / "train_ranks.py"


def ranks(case: str, out: Path) -> list[dict]:
    """Run ``tests/dist/train_ranks.py case`` in 2 processes; what each rank wrote."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), case,
         str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case, said", [("bare", "not wrapped in DistributedDataParallel"),
                                        ("ddp-cpuadamw", "before DDP's hooks could reduce it")])
def test_ranks_that_would_train_apart_silently_are_refused_with_what_to_do(case, said, tmp_path):
    """Compiled without DistributedDataParallel, or with a CPUAdamW taking the gradients inside
    the compiled backward before DDP could reduce them, each rank would train on its own batch
    alone: the first call raises, saying what reduces gradients or that the ranks may train
    apart on purpose (``data_parallel=False``); nothing was trained."""
    for r in ranks(case, tmp_path):
        assert said in r["error"] and "'data_parallel': False" in r["error"]
        assert r["norms"][0] == r["norms"][1] == pytest.approx(r["initial"])


def test_ranks_train_apart_when_told_and_together_under_ddp(tmp_path):
    (tmp_path / "apart").mkdir()
    (tmp_path / "ddp").mkdir()
    apart = ranks("apart", tmp_path / "apart")
    assert all("error" not in r for r in apart)
    norms = apart[0]["norms"]
    assert norms[0] != norms[1]  # each rank its own data: apart, as asked
    together = ranks("ddp", tmp_path / "ddp")
    assert all("error" not in r for r in together)
    norms = together[0]["norms"]
    assert norms[0] == norms[1] and norms[0] != pytest.approx(together[0]["initial"])  # DDP reduced
