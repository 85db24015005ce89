"""Writing Core ML packages: nothing left in the system temp folder, and a full disk named as such."""

from __future__ import annotations

import shutil
import tempfile
from collections import namedtuple

import pytest
import torch

from kdtrain.coreml import convert
from kdtrain.errors import ArtifactError


class Square(torch.nn.Module):
    def forward(self, x):
        return x * x + 1.0


@pytest.fixture
def system_temp(tmp_path, monkeypatch):
    """The process's temp folder, pointed at an empty folder that the test can list."""
    folder = tmp_path / "system-temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_conversion_leaves_no_package_in_the_system_temp_folder(tmp_path, system_temp):
    import coremltools as ct

    out = tmp_path / "coreml" / "square.mlpackage"
    program = torch.export.export(Square().eval(), (torch.ones(4),)).run_decompositions({})
    with convert.scratch(out):
        model = ct.convert(program, inputs=[ct.TensorType(name="x", shape=(4,))], outputs=[ct.TensorType(name="y")],
                           minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
        convert.save_package(model, out)
    assert (out / "Manifest.json").is_file()
    assert list(system_temp.iterdir()) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["square.mlpackage"]  # the scratch folder is gone
    assert tempfile.tempdir == str(system_temp)  # restored


Usage = namedtuple("Usage", "total used free")


def test_a_write_that_fails_on_a_nearly_full_disk_names_the_disk(tmp_path, monkeypatch):
    out = tmp_path / "coreml" / "student-L512.mlpackage"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100 << 30, (100 << 30) - (12 << 20), 12 << 20))
    with pytest.raises(ArtifactError) as error, convert.scratch(out):
        raise RuntimeError("A valid manifest does not exist at path: /tmp/tmpqxj1pyfz.mlpackage/Manifest.json")
    message = str(error.value)
    assert message.startswith(f"{out}: expected room to write a Core ML package, found 12 MiB free on the disk holding {tmp_path / 'coreml'}")
    assert "(coremltools said: A valid manifest does not exist" in message
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_a_write_that_fails_with_room_on_the_disk_raises_the_original_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100 << 30, 0, 50 << 30))
    with pytest.raises(RuntimeError, match="^a conversion bug$"), convert.scratch(tmp_path / "x.mlpackage"):
        raise RuntimeError("a conversion bug")
