"""The artifacts folder: atomic writes, a validated manifest, located errors."""

from __future__ import annotations

import json

import pytest

from kdtrain import atomic
from kdtrain.artifact_table import FIXED, Artifact, coreml_package, export_graph, export_lint
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.errors import ArtifactError


def test_atomic_directory_leaves_the_old_folder_when_the_build_fails(tmp_path):
    target = tmp_path / "out"
    with atomic.directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.directory(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_replaces_whole_file(tmp_path):
    atomic.write_json(tmp_path / "m.json", {"b": 1, "a": 2})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert list(tmp_path.iterdir()) == [tmp_path / "m.json"]


def test_record_and_resolve_by_name(tmp_path):
    folder = ArtifactsFolder.create(tmp_path)
    atomic.write_text(tmp_path / "x/y.txt", "hi")
    thing = Artifact("thing.y", "x/y.txt", "text", "demo")
    folder.record(thing)
    again = ArtifactsFolder.open(tmp_path)
    assert again.path(thing) == again.path("thing.y") == tmp_path / "x/y.txt"
    assert (again.entry(thing).kind, again.entry(thing).stage) == ("text", "demo")
    assert again.entry(thing).sha256 == "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"
    with pytest.raises(ArtifactError, match=r"at artifacts.nope: expected an artifact named 'nope', found only: thing.y"):
        again.path("nope")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"path": "../../etc/passwd", "kind": "k", "stage": "s", "sha256": "0" * 64}, "at artifacts.a.path: expected a relative path inside the artifacts folder"),
        ({"path": "a", "kind": "k", "stage": "s", "sha256": "xyz"}, "at artifacts.a.sha256: expected String should match pattern"),
        ({"path": "a", "kind": "k", "stage": "s"}, "at artifacts.a.sha256: expected Field required"),
    ],
)
def test_bad_manifest_is_a_located_error(tmp_path, entry, message):
    (tmp_path / "manifest.json").write_text(json.dumps({"manifest_version": 1, "artifacts": {"a": entry}, "stages": {}}))
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ArtifactsFolder.open(tmp_path)


def test_missing_file_behind_a_manifest_entry(tmp_path):
    folder = ArtifactsFolder.create(tmp_path)
    atomic.write_text(tmp_path / "f", "x")
    folder.record(Artifact("f", "f", "k", "s"))
    (tmp_path / "f").unlink()
    with pytest.raises(ArtifactError, match="at artifacts.f.path: expected f to exist, found nothing there"):
        folder.path("f")


def test_the_table_names_and_places_each_artifact_once():
    lengths = (64, 4096)
    families = [export_graph(f, n) for f in ("prefill", "decode") for n in lengths]
    families += [export_lint(f, n) for f in ("prefill", "decode") for n in lengths]
    families += [coreml_package(n, p) for p in ("fp16", "int8") for n in lengths]
    table = [*FIXED, *families]
    assert len({a.name for a in table}) == len({a.path for a in table}) == len(table)
    assert {coreml_package(64, p).stage for p in ("fp16", "int8")} == {"convert", "quantize"}
    assert export_graph("decode", 64).path == "export/decode-64/graph.json"
