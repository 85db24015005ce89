"""State of one pytest run with ``--kd-contracts``: folders, backend, and the verdicts to report."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_kdcontracts.errors import ContractFileError

MANIFEST = "manifest.json"
REPORT_PROPERTY = "kdcontracts"  # user_properties key of a figure an item reports (kd_report)


@dataclass(eq=False)  # registered as a pluggy plugin: must stay hashable
class KDSession:
    contract_dir: Path
    artifacts_override: Path | None
    manifest_error: str | None = None
    artifacts_dir: Path | None = None
    outcomes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    skip_reasons: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)  # measured figures items report (kd_report)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "KDSession":
        from kdcontracts.families import family_for

        contract_dir = Path(config.getoption("kd_contracts")).resolve()
        override = config.getoption("kd_artifacts")
        session = cls(contract_dir, Path(override).resolve() if override else None)
        session.artifacts_dir = session.artifacts_override
        if session.artifacts_dir is None:
            manifest = contract_dir / MANIFEST
            try:
                session.artifacts_dir = family_for(manifest).load(manifest).artifacts
            except ContractFileError as exc:
                session.manifest_error = str(exc)
            except FileNotFoundError:
                session.manifest_error = f"{manifest}: expected a contract-folder manifest naming the artifacts folder, found no such file (or pass --kd-artifacts)"
        return session

    def owns(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.contract_dir)

    def header(self, config: pytest.Config) -> list[str]:
        lines = [f"kdcontracts: contracts {self.contract_dir}"]
        if self.artifacts_dir is None:
            lines.append(f"kdcontracts: artifacts unresolved: {self.manifest_error}")
        else:
            source = "--kd-artifacts" if self.artifacts_override else f"{MANIFEST}"
            lines.append(f"kdcontracts: artifacts {self.artifacts_dir} (from {source})")
        from kdtrain.runtime.backend import describe_backend

        lines.append(f"kdcontracts: backend {describe_backend()}")
        lines.extend(f"kdcontracts: {line}" for line in self._fingerprints())
        return lines

    def _fingerprints(self) -> list[str]:
        from kdtrain.artifacts import ArtifactsFolder
        from kdtrain.errors import ArtifactError
        from kdtrain.tokenizers.fingerprint import tokenizer_fingerprint
        from kdtrain.tokenizers.load import TOKENIZER_ARTIFACTS

        if self.artifacts_dir is None:
            return []
        try:
            folder = ArtifactsFolder.open(self.artifacts_dir)
        except ArtifactError as exc:
            return [f"artifacts not readable: {str(exc).splitlines()[0]}"]
        lines = []
        for name, (artifact, _) in TOKENIZER_ARTIFACTS.items():
            try:
                lines.append(f"tokenizer {name:8s} {tokenizer_fingerprint(folder.path(artifact))}")
            except ArtifactError as exc:
                lines.append(f"tokenizer {name:8s} unavailable ({str(exc).splitlines()[0]})")
        return lines

    def collects(self, config: pytest.Config) -> bool:
        """Whether this run's paths reach the contract folder (``pytest tests`` with the ini
        option set does not, and must not need the artifacts)."""
        for arg in config.args:
            path = Path(arg.split("::")[0]).resolve()
            if path.is_relative_to(self.contract_dir) or self.contract_dir.is_relative_to(path):
                return True
        return False

    def artifacts_problem(self) -> str | None:
        """Why the artifacts folder cannot be opened, or None."""
        from kdtrain.artifacts import ArtifactsFolder
        from kdtrain.errors import ArtifactError

        if self.artifacts_dir is None:
            return self.manifest_error
        try:
            ArtifactsFolder.open(self.artifacts_dir)
        except ArtifactError as exc:
            return str(exc)
        return None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """One clear error before collection, instead of every item failing with the same one."""
        config = session.config
        if config.option.collectonly or not self.collects(config):
            return
        problem = self.artifacts_problem()
        if problem:
            raise pytest.UsageError(
                f"kdcontracts: the artifacts that {self.contract_dir} verifies are not there:\n  {problem}\n"
                f"  Build them first (`make demo` in the kdcontracts repository, or `kdtrain pipeline --out DIR`), "
                f"or name a built folder with --kd-artifacts DIR.")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Count one item once: its call, or the setup/teardown that kept it from passing.

        Keyed by the report alone (node id and markers), so that reports coming back from
        pytest-xdist workers count the same as local ones."""
        if "kdcontract" not in report.keywords or (report.when != "call" and report.passed):
            return
        path, _, name = report.nodeid.rpartition("::")
        key = f"{Path(path).name}::{name.split('[')[0]}"
        xfailed = report.skipped and hasattr(report, "wasxfail")  # a declared known failure (judge.yaml's known_unfit)
        outcome = "error" if report.when != "call" and report.failed else ("xfailed" if xfailed else report.outcome)
        self.outcomes[key][outcome] += 1
        self.notes.extend(value for prop, value in report.user_properties if prop == REPORT_PROPERTY)
        if xfailed:
            self.skip_reasons[f"xfailed: {report.wasxfail}"] += 1
        elif report.skipped and isinstance(report.longrepr, tuple):
            self.skip_reasons[report.longrepr[2]] += 1

    def summary(self) -> list[str]:
        lines = []
        width = max((len(k) for k in self.outcomes), default=10)
        for key in sorted(self.outcomes):
            counts = self.outcomes[key]
            verdict = ("FAILED" if counts["failed"] or counts["error"] else "passed" if counts["passed"]
                       else "xfailed" if counts["xfailed"] else "skipped")
            detail = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
            lines.append(f"{verdict:7s} {key:{width}s}  {detail}")
        lines.extend(sorted(self.notes, key=_natural))  # L=64 before L=128, whatever order workers report
        for reason, n in self.skip_reasons.most_common():
            lines.append(f"{n}x {reason}" if reason.startswith("xfailed: ") else f"skipped {n}x: {reason}")
        total = Counter()
        for counts in self.outcomes.values():
            total.update(counts)
        lines.append("contracts: " + (", ".join(f"{n} {o}" for o, n in sorted(total.items())) or "no items ran"))
        return lines


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]
