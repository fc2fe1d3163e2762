"""Clocks the core reads time from: the wall clock when serving, a virtual one under a fake executor or a simulator."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds, on the time.time() scale for the wall clock."""
        ...


class WallClock:
    def now(self) -> float:
        return time.time()


class VirtualClock:
    """Time moves only when told to: ``advance`` (e.g. by a fake executor's cost per step)."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now = start_s

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self._now += seconds
