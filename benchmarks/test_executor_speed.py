"""Speed of the MIL reference executor against PyTorch eager on the same machine.

Run with ``make bench``. The target (issue: golden vectors) is a ratio, reported here, never
asserted: the executor's prefill at L=512 within 3x of PyTorch eager's.
"""

from __future__ import annotations

import numpy as np
import pytest

LENGTH = 512  # the target's length; a folder converted at other lengths is measured at its largest
ROUNDS = 3


@pytest.fixture(scope="module")
def runtime(bench_artifacts):
    from kdtrain.artifact_table import coreml_package
    from kdtrain.artifacts import ArtifactsFolder
    from kdtrain.runtime.backend import MILSession, TorchSession
    from kdtrain.student.model import StudentLM

    folder = ArtifactsFolder.open(bench_artifacts)
    lengths = folder.manifest.stages["convert"].settings["lengths"]
    length = LENGTH if LENGTH in lengths else max(lengths)
    student = StudentLM.from_pretrained(folder.path(folder.exported_student()))
    ids = np.random.default_rng(0).integers(3, 49000, (1, length)).astype(np.int32)
    inputs = {"input_ids": ids, "attention_mask": np.ones((1, length), np.int32)}
    return {"mil": MILSession(folder.path(coreml_package(length))), "torch": TorchSession(student, length),
            "inputs": inputs, "length": length}


MEANS: dict[str, float] = {}


@pytest.mark.parametrize("backend", ["torch", "mil"])
def test_prefill(benchmark, runtime, backend):
    session = runtime[backend]
    state = session.new_state()
    benchmark.pedantic(session.predict, args=("prefill", runtime["inputs"], state), rounds=ROUNDS, warmup_rounds=1)
    MEANS[backend] = benchmark.stats.stats.mean
    if len(MEANS) == 2:
        print(f"\nMIL executor / PyTorch eager, prefill L={runtime['length']}: {MEANS['mil'] / MEANS['torch']:.2f}x (target: within 3x)")
