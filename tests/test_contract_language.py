"""The contract language (:mod:`kdcontracts`) is shared by the trainer and the plugin: kdtrain
reads every contract without importing pytest, syrupy or the plugin, and any contract file,
however mangled, loads or fails as a located :class:`ContractFileError`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcontracts.errors import ContractFileError
from kdcontracts.families import FAMILIES, load

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SIDE = ("pytest", "_pytest", "pluggy", "syrupy", "pytest_kdcontracts")


def _imported_plugin_side(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the plugin-side modules it left imported."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {PLUGIN_SIDE!r}))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_the_trainer_imports_no_plugin():
    assert _imported_plugin_side("import kdtrain.pipeline, kdtrain.train.loop, kdtrain.data.registry") == []


def test_the_trainer_reads_every_contract_without_the_plugin():
    code = "\n".join([
        "from pathlib import Path",
        "from kdtrain.data.registry import load_registry",
        "from kdtrain.stage import StageContext",
        "ctx = StageContext(None, Path('contracts'))",
        f"for name in {[f.file_name for f in FAMILIES]!r}:",
        "    ctx.contract(name)",
        "load_registry('contracts/tool_registry.json')",
    ])
    assert _imported_plugin_side(code) == []


HEAVY = ("torch", "coremltools", "transformers", "pytest", "_pytest", "syrupy", "pytest_kdcontracts")


def test_loading_every_contract_imports_no_training_code():
    """The contract language defines its own types: loading every reference contract imports
    no training code (only the leaf ``kdtrain.errors``), no torch, Core ML or pytest."""
    code = "\n".join([
        "import sys",
        "from pathlib import Path",
        "import kdcontracts.families",
        "files = [p for p in sorted(Path('contracts').iterdir()) if kdcontracts.families.family_for(p)]",
        f"assert sorted(p.name for p in files) == {sorted(f.file_name for f in FAMILIES)!r}, files",
        "for path in files:",
        "    kdcontracts.families.load(path)",
        "print(sorted(m for m in sys.modules if m.split('.')[0] in " + repr(HEAVY + ("kdtrain",)) + "))",
    ])
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))
    assert [m for m in imported if m not in ("kdtrain", "kdtrain.errors")] == []


# --- any mangled contract: loaded, or a located error ----------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 5000) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8"), max_size=8) | st.sampled_from(["", "\x00", "../x\x00y", "$", "L"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(doc, prefix=()):
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from _paths(value, prefix + (key,))


@st.composite
def mangled(draw):
    """A reference contract with one value replaced or one key deleted, anywhere in it."""
    family = draw(st.sampled_from(FAMILIES))
    text = (REPO / "contracts" / family.file_name).read_text(encoding="utf-8")
    doc = json.loads(text) if family.file_name.endswith(".json") else yaml.safe_load(text)
    path = draw(st.sampled_from(list(_paths(doc))[1:]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        parent[path[-1]] = draw(JSON_VALUES)
    else:
        del parent[path[-1]]
    return family, doc


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("mangled") / "contracts"
    shutil.copytree(REPO / "contracts", target)
    return target


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=mangled())
def test_a_mangled_contract_loads_or_is_a_located_error(folder, case):
    family, doc = case
    path = folder / family.file_name
    original = path.read_text(encoding="utf-8")
    dump = json.dumps(doc) if path.suffix == ".json" else yaml.safe_dump(doc, allow_unicode=True)
    path.write_text(dump, encoding="utf-8")
    try:
        load(path)
    except ContractFileError as exc:
        assert exc.problems and all(p.key_path and p.expected and p.found for p in exc.problems), str(exc)
        assert str(exc).startswith(f"{path}: invalid contract file")
    finally:
        path.write_text(original, encoding="utf-8")
