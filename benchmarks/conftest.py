"""What the benchmarks measure on: the artifacts folder named by ``--kd-artifacts`` (``make
bench ARTIFACTS=DIR``), by default the demo's ``artifacts/``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_artifacts(request) -> Path:
    option = request.config.getoption("kd_artifacts")
    return Path(option).resolve() if option else Path(request.config.rootpath) / "artifacts"
