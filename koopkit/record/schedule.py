"""When to take a snapshot: every N steps, at explicit steps, or log-spaced (dense early)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Schedule", "every_n", "at_steps", "log_spaced", "log_steps", "make_schedule"]


@dataclass(frozen=True)
class Schedule:
    """A set of optimizer steps, tested with ``step in schedule``; serialisable to run attrs."""

    kind: str
    n: int = 1
    steps: frozenset = frozenset()
    per_decade: int = 0

    def __contains__(self, step: int) -> bool:
        if self.kind == "every":
            return step % self.n == 0
        if self.kind == "steps":
            return step in self.steps
        return step == 0 or step in _log_grid(step, self.per_decade)

    def to_json(self) -> dict:
        if self.kind == "every":
            return {"kind": "every", "n": self.n}
        if self.kind == "steps":
            return {"kind": "steps", "steps": sorted(self.steps)}
        return {"kind": "log", "per_decade": self.per_decade, "start": 0}


def _log_grid(step: int, per_decade: int) -> set[int]:
    """The grid points round(10**(k/per_decade)) that lie next to ``step``."""
    k = round(math.log10(step) * per_decade)
    return {round(10 ** (j / per_decade)) for j in (k - 1, k, k + 1)}


def _is_int(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_step(value) -> int:
    """An explicit step: an integer, or a float with an integral value (``5.0``)."""
    if _is_int(value):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
    raise ValueError(f"Invalid step {value!r} in the explicit schedule; expected an int >= 0.")


def every_n(n: int) -> Schedule:
    if not _is_int(n) or n < 1:
        raise ValueError(
            f"Invalid every={n!r}; expected a positive int, a list of steps or a schedule."
        )
    return Schedule("every", n=int(n))


def at_steps(steps: Iterable[int]) -> Schedule:
    steps = frozenset(_as_step(s) for s in steps)
    if not steps or min(steps) < 0:
        raise ValueError("Invalid explicit schedule; expected a non-empty list of steps >= 0.")
    return Schedule("steps", steps=steps)


def log_spaced(per_decade: int = 20) -> Schedule:
    """Steps round(10**(k/per_decade)) for k = 0, 1, ...: dense early in training, sparse later."""
    if not _is_int(per_decade) or per_decade < 1:
        raise ValueError(f"Invalid per_decade={per_decade!r}; expected an int >= 1.")
    return Schedule("log", per_decade=int(per_decade))


def log_steps(stop: int, num: int) -> list[int]:
    """About ``num`` distinct integer steps from 0 to ``stop``, log-spaced (always includes 0)."""
    grid = {0, int(stop)} | {int(round(x)) for x in _geomspace(1, stop, num)}
    return sorted(s for s in grid if 0 <= s <= stop)


def _geomspace(start, stop, num):
    if num < 2 or stop <= start:
        return [start]
    ratio = (stop / start) ** (1 / (num - 1))
    return [start * ratio**i for i in range(num)]


def make_schedule(every) -> Schedule:
    """Interpret the Recorder's ``every`` argument."""
    if isinstance(every, Schedule):
        return every
    if _is_int(every):
        return every_n(every)
    if isinstance(every, Iterable) and not isinstance(every, str | bytes):
        return at_steps(every)
    raise ValueError(
        f"Invalid every={every!r}; expected a positive int, a list of steps or a schedule."
    )
