"""What runs while a step runs: step tracking now; copy engine and optimizer later."""

from .step import TRACKER, StepTracker

__all__ = ["TRACKER", "StepTracker"]
