"""What an API teacher may spend, with a fake clock: requests and tokens per minute are
spaced exactly as their token buckets say, each limit on its own; the budget refuses before
a call would exceed it, and a restored budget continues from what was already spent."""

from __future__ import annotations

import json

import pytest

from kdtrain.teacher.base import BudgetExceeded, TeacherError
from kdtrain.teacher.budget import Budget, BudgetLimits, Usage
from kdtrain.teacher.ratelimit import RateLimiter, RateLimits


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def send_times(limits: RateLimits, costs: list[int]) -> list[float]:
    """When each request (of ``costs`` tokens) goes out, all asked for at time 0."""
    clock = FakeClock()
    limiter = RateLimiter(limits, clock, clock.sleep)
    times = []
    for cost in costs:
        limiter.acquire(cost)
        times.append(clock.now)
    return times


def test_requests_faster_than_the_limit_are_spaced_by_the_bucket():
    # A full bucket of 6 goes at once, then one request every 60/6 = 10 s.
    assert send_times(RateLimits(requests_per_minute=6), [1] * 10) == pytest.approx([0] * 6 + [10, 20, 30, 40])


def test_tokens_per_minute_applies_on_its_own():
    # 600 tokens/min = 10/s: two 300-token requests drain the bucket, the third waits 30 s.
    assert send_times(RateLimits(requests_per_minute=1000, tokens_per_minute=600), [300] * 4) == pytest.approx(
        [0, 0, 30, 60])
    # And requests/min when tokens are plentiful: tiered limits are both enforced.
    assert send_times(RateLimits(requests_per_minute=2, tokens_per_minute=100_000), [10] * 3) == pytest.approx(
        [0, 0, 30])


def test_the_slower_limit_decides_each_wait():
    # Bucket of 3 requests (one per 20 s) and of 300 tokens (5/s): the 4th request needs both.
    times = send_times(RateLimits(requests_per_minute=3, tokens_per_minute=300), [100, 100, 100, 200])
    assert times == pytest.approx([0, 0, 0, 40])  # a request is free at 20 s, but 200 tokens only at 40 s


def test_buckets_refill_continuously_up_to_capacity():
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(requests_per_minute=60), clock, clock.sleep)
    for _ in range(60):
        limiter.acquire(0)
    clock.now += 5.0  # idle: 5 requests come back, not a whole minute's worth
    assert [limiter.acquire(0) for _ in range(6)] == pytest.approx([0, 0, 0, 0, 0, 1])
    clock.now += 3600.0  # a long idle fills the bucket to its capacity and no further
    assert sum(limiter.acquire(0) for _ in range(61)) == pytest.approx(1.0)


def test_settling_gives_back_what_the_estimate_overcharged():
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(tokens_per_minute=600), clock, clock.sleep)
    limiter.acquire(600)
    limiter.settle(600, 100)  # the reply said 100 tokens: 500 come back
    assert limiter.acquire(500) == 0.0
    limiter.settle(100, 400)  # one that cost more than estimated leaves the bucket in debt
    assert limiter.acquire(60) == pytest.approx(36.0)  # 300 owed + 60 asked, at 10 tokens/s


def test_a_request_larger_than_tokens_per_minute_is_refused():
    limiter = RateLimiter(RateLimits(tokens_per_minute=1000), FakeClock(), FakeClock().sleep)
    with pytest.raises(TeacherError, match="at most tokens_per_minute=1000 tokens, found one estimated at 1001"):
        limiter.acquire(1001)


def test_limits_must_be_positive():
    with pytest.raises(TeacherError, match="requests_per_minute"):
        RateLimits(requests_per_minute=0)


def test_the_budget_refuses_before_a_call_would_exceed_it():
    budget = Budget(BudgetLimits(max_calls=2, max_tokens=100))
    budget.reserve(60)
    budget.charge(Usage(40, 20))
    with pytest.raises(BudgetExceeded, match="max_tokens=100 tokens, found 60 spent and the next call estimated at 41"):
        budget.reserve(41)
    budget.reserve(40)
    budget.charge(failed=True)
    with pytest.raises(BudgetExceeded, match="max_calls=2 calls, found 2 spent"):
        budget.reserve(0)
    assert (budget.calls, budget.failed_calls, budget.prompt_tokens, budget.completion_tokens) == (2, 1, 40, 20)
    Budget().reserve(10**12)  # no limits: never refuses


def test_the_budget_state_round_trips_and_continues():
    budget = Budget(BudgetLimits(max_calls=5))
    for _ in range(3):
        budget.charge(Usage(10, 5))
    budget.charge(failed=True)
    state = json.loads(json.dumps(budget.state_dict()))
    assert state == {"limits": {"max_calls": 5, "max_tokens": None},
                     "spent": {"calls": 4, "prompt_tokens": 30, "completion_tokens": 15, "failed_calls": 1}}
    restored = Budget.from_state(state, BudgetLimits(max_calls=5))
    assert restored.state_dict() == budget.state_dict()
    restored.reserve(0)
    restored.charge(Usage(1, 1))
    with pytest.raises(BudgetExceeded):
        restored.reserve(0)  # the restart did not get its 4 spent calls back


@pytest.mark.parametrize("state", [{}, {"spent": {"calls": -1}}, {"spent": {"calls": 1, "prompt_tokens": "2",
                                                                            "completion_tokens": 0, "failed_calls": 0}}])
def test_a_malformed_budget_state_is_refused(state):
    with pytest.raises(TeacherError, match="teacher budget state: at spent"):
        Budget.from_state(state, BudgetLimits())
