"""Shared fixtures: the reference artifacts (built once per session) and a contract-folder
workspace for running the plugin inside pytest (pytester) against planted faults."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from kdtrain import atomic

REPO = Path(__file__).resolve().parents[1]


# The reference contracts at two short lengths: every Core ML item is still generated per
# length, but export and conversion stay fast on two cores. `make demo` runs all four.
TEST_LENGTHS = [64, 128]


@pytest.fixture(scope="session")
def test_contracts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("contracts") / "contracts"
    shutil.copytree(REPO / "contracts", folder)
    coreml = json.loads((folder / "coreml_contract.json").read_text())
    coreml["enumerated_shapes"]["values"] = TEST_LENGTHS
    (folder / "coreml_contract.json").write_text(json.dumps(coreml, indent=2))
    return folder


@pytest.fixture(scope="session")
def reference_artifacts(tmp_path_factory, test_contracts) -> Path:
    """`kdtrain pipeline` output, built once; never mutate it (use ``workspace.artifacts``)."""
    from kdtrain.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("reference") / "artifacts"
    run_pipeline(out, contracts=test_contracts)
    return out


class Workspace:
    """A contract folder and a private artifacts folder inside a pytester directory.

    The artifacts are hard links to the reference build; ``edit_json`` and ``write`` replace
    a file (new inode), so a planted fault never reaches the shared reference copy.
    """

    def __init__(self, pytester: pytest.Pytester, contracts: Path, reference: Path):
        self.pytester = pytester
        self.contracts = pytester.path / "contracts"
        self.artifacts = pytester.path / "artifacts"
        shutil.copytree(contracts, self.contracts)
        shutil.copytree(reference, self.artifacts, copy_function=os.link)

    def write(self, relpath: str, text: str, root: Path | None = None) -> Path:
        path = (root or self.artifacts) / relpath
        atomic.write_text(path, text)
        return path

    def edit_json(self, relpath: str, change: Callable[[dict], None], root: Path | None = None) -> None:
        path = (root or self.artifacts) / relpath
        data = json.loads(path.read_text(encoding="utf-8"))
        change(data)
        self.write(relpath, json.dumps(data, ensure_ascii=False), root)

    def edit_contract(self, name: str, change: Callable[[dict], None]) -> None:
        self.edit_json(name, change, root=self.contracts)

    @staticmethod
    def failed(result: pytest.RunResult) -> set[str]:
        """Item names (``check[params]``) listed as FAILED in the short summary."""
        prefix = "FAILED contracts/"
        return {line[len(prefix):].split(" - ")[0].split("::", 1)[1] for line in result.outlines if line.startswith(prefix)}

    def stage_context(self):
        """kdtrain's view of this workspace: its artifacts folder and its contracts."""
        from kdtrain.artifacts import ArtifactsFolder
        from kdtrain.pipeline import StageContext

        return StageContext(ArtifactsFolder.open(self.artifacts), self.contracts)

    def reconvert(self, checkpoint: Path, length: int, islands=None) -> None:
        """Re-export and convert one length into this workspace (after patching kdtrain)."""
        from kdtrain.coreml.stage import convert_length
        from kdtrain.student.model import StudentLM

        ctx = self.stage_context()
        islands = ctx.contract("precision_islands.yaml").islands if islands is None else islands
        convert_length(StudentLM.from_pretrained(checkpoint), length, ctx.contract("coreml_contract.json"),
                       ctx.contract("export_lint.yaml").rules, islands, self.artifacts / f"coreml/fp16/student-L{length}.mlpackage")

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_inprocess("--kd-contracts", str(self.contracts), "-p", "no:cacheprovider", *args)


@pytest.fixture
def workspace(pytester: pytest.Pytester, test_contracts: Path, reference_artifacts: Path) -> Workspace:
    return Workspace(pytester, test_contracts, reference_artifacts)
