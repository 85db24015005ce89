"""Tokenizer fingerprints change with meaning, not with formatting."""

from __future__ import annotations

import json
import shutil

import pytest

from kdtrain.tokenizers.fingerprint import tokenizer_fingerprint


@pytest.fixture
def student(tmp_path, reference_artifacts):
    folder = tmp_path / "student"
    shutil.copytree(reference_artifacts / "tokenizers/student", folder)
    return folder


def _rewrite(path, change=None, **dump):
    data = json.loads(path.read_text())
    if change:
        change(data)
    path.write_text(json.dumps(data, **dump))


def test_formatting_key_order_and_merges_spelling_do_not_change_it(student):
    before = tokenizer_fingerprint(student)

    def merges_as_strings(data):
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
        data["version"] = "9.9"

    _rewrite(student / "tokenizer.json", merges_as_strings, indent=None, sort_keys=True)
    _rewrite(student / "tokenizer_config.json", lambda d: d.update(model_max_length=512), indent=4)
    assert tokenizer_fingerprint(student) == before


@pytest.mark.parametrize(
    "file, change",
    [
        ("tokenizer.json", lambda d: d["model"]["merges"].pop()),
        ("tokenizer.json", lambda d: d["added_tokens"][-1].update(normalized=True)),
        ("tokenizer.json", lambda d: d["pre_tokenizer"].update(add_prefix_space=True)),
        ("tokenizer_config.json", lambda d: d.update(pad_token="<|endoftext|>")),
    ],
    ids=["merge", "added-token-flag", "pre-tokenizer", "pad-role"],
)
def test_a_change_of_meaning_changes_it(student, file, change):
    before = tokenizer_fingerprint(student)
    _rewrite(student / file, change)
    assert tokenizer_fingerprint(student) != before


def test_runtime_file_and_student_folder_differ_by_roles_and_template(reference_artifacts):
    runtime = tokenizer_fingerprint(reference_artifacts / "tokenizers/runtime/tokenizer.json")
    assert runtime == tokenizer_fingerprint(reference_artifacts / "tokenizers/student/tokenizer.json")
    assert runtime != tokenizer_fingerprint(reference_artifacts / "tokenizers/student")
