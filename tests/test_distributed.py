"""Several processes (``torchrun``, gloo on the CPU): a bare model compiled with lohan trains data
parallel as one process on the global batch; lohan never trains the ranks apart silently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "ranks" / "train_ranks.py"


DATA_PARALLEL = Path(__file__).parent / "ranks" / "train_dp.py"
HF = Path(__file__).parent / "ranks" / "train_hf.py"


def ranks(case: str, out: Path, script: Path = SCRIPT, processes: int = 2) -> list[dict]:
    """Run ``script case out`` in ``processes`` processes (one thread each); what each rank wrote."""
    out.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
         str(script), case, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def test_a_cpuadamw_under_ddp_is_refused_with_what_to_do(tmp_path):
    """A CPUAdamW takes each gradient inside the compiled backward, before DDP's hooks could
    reduce it, so each rank would update from its own batch alone: the first call raises, saying
    to compile the model itself (lohan then reduces) or that the ranks may train apart on purpose
    (``data_parallel=False``); nothing was trained."""
    for r in ranks("ddp-cpuadamw", tmp_path):
        assert "Compile the model without DistributedDataParallel" in r["error"]
        assert "'data_parallel': False" in r["error"]
        assert r["norms"][0] == r["norms"][1] == pytest.approx(r["initial"])


def test_ranks_train_apart_when_told_together_bare_and_under_ddp(tmp_path):
    apart = ranks("apart", tmp_path / "apart")
    assert all("error" not in r for r in apart)
    norms = apart[0]["norms"]
    assert norms[0] != norms[1]  # each rank its own data: apart, as asked
    # lohan reduces the bare model's gradients (a CPUAdamW those of a head dynamo left eager
    # too, and a rank that updates none of a model's parameters takes part in its steps), DDP
    # the wrapped one's
    for case in ("bare", "eager-head", "lopsided", "ddp"):
        together = ranks(case, tmp_path / case)
        assert all("error" not in r for r in together)
        norms = together[0]["norms"]
        assert norms[0] == norms[1] and norms[0] != pytest.approx(together[0]["initial"])
        if case in ("eager-head", "lopsided"):  # with clipping: one process on the global batch
            for r in together:  # (the global norm: each gradient counted once, on one rank)
                assert r["grad_norms"] == pytest.approx(r["reference_grad_norms"], rel=1e-5)
                assert r["max_error"] < 0.1  # the learning rate (a noise-level gradient's sign)


# (4 ranks and more: python bench/data_parallel.py --worlds 2,4; four processes on CI's two cores
# would slow the rest of the suite beside them)
@pytest.mark.parametrize("case, processes", [("cpuadamw", 2), ("swap", 2), ("stream", 2), ("torch-inductor", 2)])
def test_data_parallel_training_equals_one_process_on_the_global_batch(case, processes, tmp_path):
    """A bare LLaMA-style model compiled with lohan under ``torchrun``, each rank on its slice of
    the global batch, 4 steps with clipping: every rank's losses (averaged over the ranks) and
    parameters (read through ``model.state_dict()``) equal one eager process with AdamW and
    ``clip_grad_norm_`` on the global batch, up to the reduction order: losses within 1e-4,
    parameters within 1e-5 relative in norm and no element off by the learning rate. With a
    CPUAdamW, a budget that swaps, streamed weights, and a torch optimizer under Inductor.
    The ranks' CPUAdamWs share the update: each holds the state of the parameters it updates."""
    results = ranks(case, tmp_path, DATA_PARALLEL, processes)
    for r in results:
        assert r["losses"] == pytest.approx(r["reference_losses"], abs=1e-4)
        assert r["model_relative_error"] < 1e-5
        assert max(r["max_abs_error"].values()) < r["lr"]
        assert all(g["world"] == processes and g["reduced"] == 21 for g in r["reduce_grads"])  # every parameter's
    for r in results:
        # every gradient averaged once per step, as planned, counted where the collectives ran;
        # where the ranks share the update, every weight broadcast from its owner at step()
        assert r["measured_reduced_bytes"] == r["summaries"][-1]["reduced_bytes"] == r["param_bytes"]
        shared = case in ("cpuadamw", "swap")
        assert r["measured_broadcast_bytes"] == (r["param_bytes"] if shared else 0)
    summaries = results[0]["summaries"]
    held = [r["state_bytes"] for r in results]
    if case in ("cpuadamw", "swap"):
        # each rank's CPUAdamW holds the state of the parameters it updates: about 1/N of one
        # process's, all of it between them
        assert sum(held) == results[0]["whole_state_bytes"]
        assert max(held) <= 1.1 * results[0]["whole_state_bytes"] / processes
        for r in results:  # a rank's checkpoint says it is a part; the whole one is one process's
            assert r["shard"] == {"rank": r["rank"], "world": processes}
            assert r["full_state_params"] == r["loaded_params"] == 21 and r["full_steps"] == [4.0]
            assert max(r["moment_errors"]) < 1e-6
    if case == "stream":  # (streamed weights: every rank updates every parameter)
        assert held == [results[0]["whole_state_bytes"]] * processes
    if case == "swap":
        assert all(s["swapped_bytes"] > 0 and s["measured_peak_bytes"] <= s["budget_bytes"] for s in summaries)
        # each rank its own budget: the ranks ran different plans
        assert results[0]["summaries"][0]["swapped_bytes"] != results[1]["summaries"][0]["swapped_bytes"]
    if case == "stream":
        assert all(s["h2d_bytes"] > 0 for s in summaries)  # the weights came from the host


def test_the_trainer_prepared_for_lohan_trains_as_the_plain_trainer_under_ddp(tmp_path):
    """``hf.prepare`` under ``torchrun``: the Trainer's distributed sampler hands each rank its
    slice, lohan averages the gradients, and the losses, gradient norms and weights equal the
    plain Trainer's (accelerate's DDP, torch AdamW), with two micro-batches per step (one that
    steps, one that accumulates)."""
    pytest.importorskip("accelerate")
    lohan_ranks = ranks("lohan-accumulating", tmp_path / "lohan", HF)
    plain = ranks("ddp-accumulating", tmp_path / "ddp", HF)
    assert len(plain[0]["logs"]) == 4
    for mine, theirs in zip(lohan_ranks[0]["logs"], plain[0]["logs"]):
        assert mine["step"] == theirs["step"] and mine["learning_rate"] == theirs["learning_rate"]
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    for r in lohan_ranks:
        assert r["norms"][0] == r["norms"][1]  # every rank holds the same weights
        # the checkpoint holds every parameter's optimizer state, though each rank updates half
        assert r["saved_states"] == plain[0]["saved_states"] == 21 and not r["saved_shard"]
        for name, values in r["state"].items():
            assert values == pytest.approx(plain[0]["state"][name], abs=1e-5), name
