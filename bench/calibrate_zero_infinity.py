"""Fit the zero-infinity baseline's one free parameter to its published throughput.

Fuyou's paper reports ZeRO-Infinity fine-tuning GPT-3 13B at 45 TFLOPS on an RTX 4090 server.
Our model of ZeRO-Infinity (``lohan_compile/wholestep/``, ``WholeStep.zero_infinity``)
simulates what it does (checkpointed blocks with synchronous input offload, weights fetched one
op ahead, the serial NVMe read / CPU update / write after backward); what it leaves out is a
single factor, ``ZERO_INFINITY_COMPUTE_SCALE`` (its compute seconds per second our cost model
estimates). This fits the factor by least squares in log TFLOPS over batch 32, 48 and 64 on the
lohan-testbed preset (a coarse grid, then a finer one around the best), and prints the ratio of
``auto`` to the calibrated baseline at batch 32.

    python bench/calibrate_zero_infinity.py [--published 45] [--batches 32,48,64]
"""

from __future__ import annotations

import argparse
import math
import sys

from lohan_compile import wholestep, zoo
from lohan_compile.hardware import preset


def zero_infinity_tflops(step: wholestep.WholeStep, scale: float) -> float:
    saved = wholestep.ZERO_INFINITY_COMPUTE_SCALE
    wholestep.ZERO_INFINITY_COMPUTE_SCALE = scale
    try:
        return step.plan("zero-infinity").tflops
    finally:
        wholestep.ZERO_INFINITY_COMPUTE_SCALE = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--published", type=float, default=45.0, help="published TFLOPS")
    ap.add_argument("--batches", default="32,48,64")
    ap.add_argument("--model", default="gpt3-13b")
    args = ap.parse_args(argv)
    hw = preset("lohan-testbed")
    steps = {b: wholestep.WholeStep(wholestep.trace(zoo.PRESETS[args.model], b, 1024, hw))
             for b in (int(x) for x in args.batches.split(","))}

    def error(scale: float) -> float:
        return sum(math.log(zero_infinity_tflops(s, scale) / args.published) ** 2 for s in steps.values())

    grid = [1.0 + 0.05 * i for i in range(21)]
    best = min(grid, key=error)
    fine = [best - 0.05 + 0.005 * i for i in range(21)]
    best = min(fine, key=error)
    print(f"ZERO_INFINITY_COMPUTE_SCALE = {best:.3f} (now {wholestep.ZERO_INFINITY_COMPUTE_SCALE})")
    for b, s in steps.items():
        t = zero_infinity_tflops(s, best)
        print(f"  batch {b}: zero-infinity {t:.1f} TFLOPS ({t / args.published - 1:+.1%} of {args.published:g})")
    first = min(steps)
    auto = steps[first].plan("auto").tflops
    print(f"  batch {first}: auto {auto:.1f} TFLOPS, {auto / zero_infinity_tflops(steps[first], best):.2f}x "
          "the calibrated zero-infinity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
