"""What the runtime sees of one compiled plan while it runs: the step tracker writes it, the
re-planner (``backend/replan.py``) reads it. The report (``report.py``) only reports."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Observed:
    # graph seconds (forward + backward) of the latest steps (trials compare plans by them),
    # and the forwards whose backward has not run yet
    step_seconds_log: list[float] = field(default_factory=list)
    pending_forward_s: list[float] = field(default_factory=list)
    steps_run: int = 0
    # forward outputs found gone when the latest backward started (None: not looked at since
    # the re-planner last read it)
    dropped_seen: frozenset[int] | None = None
    # the most device bytes a run (after the plan's first step) was measured above its predicted
    # peak (moved by the level its forward found): what the executor holds that the simulator
    # does not model
    peak_excess: int = 0
    # the most device bytes code outside the compiled graphs (run eagerly: after a graph break)
    # allocated between this graph's forward and its backward, above what the device held when
    # that code began (after the plan's first step)
    outside_bytes: int = 0

    def ran(self, phase: str, seconds: float) -> None:
        if phase == "forward":
            self.pending_forward_s.append(seconds)
            del self.pending_forward_s[:-8]
            return
        # a backward goes with the latest forward (forwards under no_grad never get one)
        fw = self.pending_forward_s.pop() if self.pending_forward_s else 0.0
        self.pending_forward_s.clear()
        self.step_seconds_log.append(fw + seconds)
        del self.step_seconds_log[:-16]
        self.steps_run += 1
