"""speed.MachineClock, the regression gate's clock on shared runners: a round counts in units of a
reference workload timed just before it, so a slower machine leaves the reading where it was and
a slower program moves it. On a fake clock: nothing here depends on this machine's speed."""

from __future__ import annotations

import pytest

from kdtrain.runtime import speed


class FakeTime:
    """A perf_counter that advances only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch) -> FakeTime:
    clock = FakeTime()
    monkeypatch.setattr(speed.time, "perf_counter", clock)
    return clock


def _round(clock: speed.MachineClock, fake_time: FakeTime, machine_slowness: float, program_seconds: float) -> float:
    """One benchmark round as pytest-benchmark takes it: calibrate (setup), then clock() around the
    target. The reference workload takes 40 ms on the quiet machine, the program ``program_seconds``;
    both take ``machine_slowness`` times as long on a busy one."""
    def workload():
        fake_time.now += 0.040 * machine_slowness

    clock._reference_workload = workload
    clock.calibrate()
    start = clock()
    fake_time.now += program_seconds * machine_slowness
    return clock() - start


def test_a_slower_machine_leaves_the_machine_clock_reading_unchanged(fake_time):
    clock = speed.MachineClock(machine=True)
    quiet = _round(clock, fake_time, machine_slowness=1.0, program_seconds=0.2)
    busy = _round(clock, fake_time, machine_slowness=1.5, program_seconds=0.2)
    assert quiet == pytest.approx(0.2 / 0.040) and busy == pytest.approx(quiet)
    assert clock.units == pytest.approx([0.040, 0.060])  # each round's unit, kept for the report


def test_a_slower_program_moves_the_machine_clock_reading(fake_time):
    clock = speed.MachineClock(machine=True)
    before = _round(clock, fake_time, machine_slowness=1.0, program_seconds=0.2)
    after = _round(clock, fake_time, machine_slowness=1.0, program_seconds=0.3)
    assert after / before == pytest.approx(1.5)


def test_the_wall_clock_counts_seconds_and_never_runs_the_workload(fake_time):
    clock = speed.MachineClock(machine=False)
    assert _round(clock, fake_time, machine_slowness=1.5, program_seconds=0.2) == pytest.approx(0.3)
    assert clock.units == [] and fake_time.now == pytest.approx(100.3)  # no workload time spent


def test_the_reference_workload_is_deterministic():
    clock = speed.MachineClock(machine=True)
    assert clock._reference_workload() == clock._reference_workload()
