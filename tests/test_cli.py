"""The ``lohan`` command line: the demo trains under half its unplanned peak."""

import re

import pytest

from lohan_compile import cli


def _bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]


@pytest.mark.parametrize("model", ["hf", "builtin"])
def test_demo_trains_under_half_the_unplanned_peak(model, capsys):
    pytest.importorskip("transformers") if model == "hf" else None
    rc = cli.main(["demo", "--model", model, "--steps", "6", "--layers", "2", "--seq", "128", "--lr", "1e-2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    unplanned = _bytes(re.search(r"unplanned peak ([\d.]+ \w+)", out).group(1))
    peak = _bytes(re.search(r"device peak under lohan \(largest of all steps\)\s+([\d.]+ \w+)", out).group(1))
    budget = _bytes(re.search(r"memory budget\s+([\d.]+ \w+)", out).group(1))
    assert abs(budget - 0.5 * unplanned) <= 0.01 * unplanned  # (both printed rounded)
    assert peak <= budget  # every step, the first included
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out)]
    assert losses[-1] < losses[0]
    assert re.search(r"\d[\d,]* tokens/s", out)
    assert "offload" in out and "swap" in out  # the plan table shows both kinds of traffic
    swapped = re.search(r"device -> host / host -> device per step\s+([\d.]+ \w+)", out).group(1)
    assert _bytes(swapped) > 0


def test_demo_rejects_a_budget_out_of_range():
    with pytest.raises(SystemExit, match="fraction"):
        cli.main(["demo", "--budget", "1.5"])


def test_hw_prints_a_preset_and_the_measured_profile_as_json(capsys):
    import json

    assert cli.main(["hw", "--preset", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "rtx4090" in out and "TFLOP/s" in out and "host -> device" in out
    assert cli.main(["hw", "--cached", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)
    assert profile["matmul_flops"] > 0 and profile["h2d_bandwidth"] > 0
    import lohan_compile as lohan

    assert lohan.HardwareProfile.from_json(profile) == lohan.hardware.auto()  # what hardware="auto" uses
