"""What a run may spend on an API teacher, and what it has spent.

Every HTTP attempt that reached the server counts as a call, retries and failures included,
because the provider bills or rate-limits them all. ``reserve`` refuses a call *before* it
is sent if it could push a limit over (the token cost is the estimate: prompt plus max new
tokens); ``charge`` books what the reply says it cost. The spent counts travel in the
trainer's checkpoints as a plain dict, so a restarted run continues from them instead of
spending its budget a second time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kdtrain.teacher.base import BudgetExceeded, TeacherError

SPENT = ("calls", "prompt_tokens", "completion_tokens", "failed_calls")


@dataclass(frozen=True)
class BudgetLimits:
    """``None`` leaves that dimension unlimited."""

    max_calls: int | None = None
    max_tokens: int | None = None  # prompt + completion tokens


@dataclass(frozen=True)
class Usage:
    """The tokens one attempt cost, as the reply's ``usage`` reports them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Budget:
    """Limits and spent counts; thread-safe so concurrent clients may share one."""

    def __init__(self, limits: BudgetLimits = BudgetLimits()):
        self.limits = limits
        self.calls = self.prompt_tokens = self.completion_tokens = self.failed_calls = 0
        self._lock = threading.Lock()

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def reserve(self, tokens: int) -> None:
        """Raise :class:`BudgetExceeded` if one more call of ``tokens`` (estimated) would exceed a limit."""
        with self._lock:
            max_calls, max_tokens = self.limits.max_calls, self.limits.max_tokens
            if max_calls is not None and self.calls + 1 > max_calls:
                raise BudgetExceeded(f"teacher budget: expected at most max_calls={max_calls} calls, found {self.calls} spent")
            if max_tokens is not None and self.tokens + tokens > max_tokens:
                raise BudgetExceeded(
                    f"teacher budget: expected at most max_tokens={max_tokens} tokens, found {self.tokens} spent "
                    f"and the next call estimated at {tokens}"
                )

    def charge(self, usage: Usage = Usage(), failed: bool = False) -> None:
        """Book one attempt that reached the server (a failed one usually with unknown, zero usage)."""
        with self._lock:
            self.calls += 1
            self.failed_calls += int(failed)
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens

    def state_dict(self) -> dict[str, dict[str, int | None]]:
        """Limits (for the reader) and spent counts (what a restart restores), JSON-able."""
        with self._lock:
            return {"limits": {"max_calls": self.limits.max_calls, "max_tokens": self.limits.max_tokens},
                    "spent": {name: getattr(self, name) for name in SPENT}}

    @classmethod
    def from_state(cls, state: dict, limits: BudgetLimits) -> "Budget":
        """A budget under (possibly new) ``limits`` that has already spent what ``state`` says."""
        spent = state.get("spent") if isinstance(state, dict) else None
        if not isinstance(spent, dict):
            raise TeacherError(f"teacher budget state: at spent: expected a dict of {', '.join(SPENT)}, found {state!r}")
        budget = cls(limits)
        for name in SPENT:
            value = spent.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TeacherError(f"teacher budget state: at spent.{name}: expected a non-negative integer, found {value!r}")
            setattr(budget, name, value)
        return budget

    def __repr__(self) -> str:
        return (f"Budget(calls={self.calls}/{self.limits.max_calls}, tokens={self.tokens}/{self.limits.max_tokens}, "
                f"failed_calls={self.failed_calls})")
