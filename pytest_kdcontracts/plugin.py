"""pytest hooks of kdcontracts. Each hands off at once to :class:`KDSession` or the collector.

Nothing heavy is imported here: pytest imports every installed plugin on every run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kdcontracts import fixtures
from pytest_kdcontracts.fixtures import SESSION_KEY


def pytest_addoption(parser: pytest.Parser) -> None:
    """https://docs.pytest.org/en/stable/reference/reference.html#pytest.hookspec.pytest_addoption"""
    group = parser.getgroup("kdcontracts", "knowledge-distillation contracts")
    group.addoption("--kd-contracts", metavar="DIR", help="contract folder to collect (collected alone when no paths are given)")
    group.addoption("--kd-artifacts", metavar="DIR", help="artifacts folder to verify (overrides the contracts' manifest.json)")
    parser.addini("kd_contracts", "contract folder collected when --kd-contracts is not given (so `pytest -m golden --snapshot-update` works)")


def pytest_configure(config: pytest.Config) -> None:
    """https://docs.pytest.org/en/stable/reference/reference.html#pytest.hookspec.pytest_configure"""
    from pytest_kdcontracts.contracts import MARKERS

    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    if config.getoption("kd_contracts") is None:
        if not config.getini("kd_contracts"):
            return
        config.option.kd_contracts = str(config.rootpath / config.getini("kd_contracts"))
    from pytest_kdcontracts.session import KDSession

    session = KDSession.from_config(config)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(fixtures, "kdcontracts-fixtures")
    # The session checks the artifacts at start and counts verdicts (pytest_sessionstart,
    # pytest_runtest_logreport).
    config.pluginmanager.register(session, "kdcontracts-session")
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args = [str(session.contract_dir)]


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """https://docs.pytest.org/en/stable/reference/reference.html#pytest.hookspec.pytest_collect_file"""
    session = parent.config.stash.get(SESSION_KEY, None)
    if session is None:
        return None
    from pytest_kdcontracts.collect import ContractFile, is_contract_file

    if is_contract_file(file_path) and session.owns(file_path):
        return ContractFile.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    """https://docs.pytest.org/en/stable/reference/reference.html#pytest.hookspec.pytest_report_header"""
    session = config.stash.get(SESSION_KEY, None)
    return session.header(config) if session and session.collects(config) else None


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """https://docs.pytest.org/en/stable/reference/reference.html#pytest.hookspec.pytest_terminal_summary

    Last, whatever order the plugins were installed in: the verdicts close the report."""
    session = config.stash.get(SESSION_KEY, None)
    if session is None or config.option.collectonly or not session.outcomes:
        return
    terminalreporter.write_sep("=", "kdcontracts")
    for line in session.summary():
        terminalreporter.write_line(line)
