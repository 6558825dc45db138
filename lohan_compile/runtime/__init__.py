"""What runs while a step runs: step tracking, the host tier (host memory,
SSD tier, copy engine); the optimizer later."""

from .hosttier import CopyEvent, HostStats, HostTier, SSDInfo
from .step import TRACKER, StepTracker

__all__ = ["TRACKER", "CopyEvent", "HostStats", "HostTier", "SSDInfo", "StepTracker"]
