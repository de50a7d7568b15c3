"""The autopilot's rule: when is a precopy migration not converging, so that it must change course.

It watches what each dirty sync leaves to send (``remaining``). A pass whose remainder is not 5 % below
the smallest one so far is a stalled pass; ``stalled_passes`` of them in a row call for action. So does a
migration past its deadline, and one whose advice predicted it would not converge or would end past the
deadline (then at the first pass). After acting it waits for as many stalled passes again before it
acts once more, so a lever has time to work.
"""

from __future__ import annotations

from dataclasses import dataclass

#: a pass must leave this much less than the best so far to count as progress
PROGRESS = 0.95
DEFAULT_STALLED_PASSES = 3


@dataclass
class AutopilotPolicy:
    """When to act: ``stalled_passes`` passes without progress, or past ``deadline_ms`` (0: no deadline)."""

    stalled_passes: int = DEFAULT_STALLED_PASSES
    deadline_ms: int = 0

    def __post_init__(self) -> None:
        self.start(None)

    def start(self, predicted_ms: float | None, converges: bool = True) -> None:
        """A migration starts; ``predicted_ms``/``converges``: the advice's prediction for it, if any."""
        self._best: float | None = None
        self._stalled = 0
        self._deadline_passed = False
        self._doomed = not converges or bool(self.deadline_ms and predicted_ms is not None
                                              and predicted_ms > self.deadline_ms)
        self._predicted = predicted_ms

    def observe(self, pass_number: int, remaining: int, elapsed_ms: float) -> str | None:
        """One dirty sync; the reason to act now, or None."""
        if pass_number < 2:  # the setup's sync: everything is still to send
            return None
        if self._doomed:
            self._doomed = False
            return ("the advice predicted it would not converge" if self._predicted is None else
                    f"the advice predicted {self._predicted / 1000:.1f} s, past the deadline of "
                    f"{self.deadline_ms / 1000:.1f} s")
        if self.deadline_ms and elapsed_ms > self.deadline_ms and not self._deadline_passed:
            self._deadline_passed = True
            self._stalled = 0
            return (f"still running after {elapsed_ms / 1000:.1f} s, past the deadline of "
                    f"{self.deadline_ms / 1000:.1f} s")
        if self._best is None or remaining < PROGRESS * self._best:
            self._best = remaining if self._best is None else min(self._best, remaining)
            self._stalled = 0
            return None
        self._stalled += 1
        if self._stalled >= self.stalled_passes:
            self._stalled = 0
            return f"remaining has not fallen for {self.stalled_passes} passes ({remaining / 1e6:.1f} MB left)"
        return None
