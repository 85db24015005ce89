"""The trainer's data: validated corpus samples paired with cached teacher targets, in a
reproducible order that a checkpoint can resume mid-epoch.

Only samples whose cache entry verifies are trained on (:class:`kdtrain.data.targets.TeacherTargets`
logs the missing-teacher ratio); a corpus whose ``tool_schema_version`` the target runtime
cannot read is refused before anything is loaded (``kdtrain migrate-data`` fixes it), and so
is a cache filled by a teacher or top-k other than the config's ``teacher`` section names
(:func:`check_cache_teacher`): without it every such sample would only be "missing". The
order of epoch ``e`` is a permutation drawn from ``data.seed + e``; rank ``r`` of ``w``
takes every ``w``-th sample of it, so ``(epoch, position)`` is all a resume needs.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from kdcontracts.models.tool_registry import compatible
from kdtrain.artifact_table import DATA_CORPUS, TEACHER_CACHE
from kdtrain.artifacts import ArtifactsFolder
from kdtrain.data.corpus import Corpus
from kdtrain.data.chat import ChatFormat
from kdtrain.data.targets import DistillExample, TeacherTargets, as_teacher_forced
from kdtrain.errors import DataError, located
from kdtrain.losses import DistillBatch, collate_distill
from kdtrain.teacher.cache import TeacherCache
from kdtrain.teacher.fill import build_request
from kdtrain.tokenizers.load import load_tokenizer
from kdtrain.train.checkpoint import DataPosition
from kdtrain.train.config import DistillConfig

log = logging.getLogger("kdtrain.train")


@dataclass(frozen=True)
class TrainingData:
    examples: tuple[DistillExample, ...]
    eligible: tuple[bool, ...]  # code-mode eligibility per example (sample metadata)
    tokenizer: object  # the student tokenizer
    missing_ratio: float  # samples without verified teacher targets, over the corpus
    too_long: int  # samples over data.max_length student tokens, left out

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def eligible_fraction(self) -> float:
        return sum(self.eligible) / len(self.eligible) if self.eligible else 0.0

    def order(self, epoch: int, seed: int) -> list[int]:
        """The sample indices of ``epoch``, a seeded permutation (each rank takes its stride of each step's window)."""
        return np.random.default_rng(seed + epoch).permutation(len(self.examples)).tolist()

    def batch(self, indices: list[int]) -> DistillBatch:
        return collate_distill([self.examples[i] for i in indices], self.tokenizer, [self.eligible[i] for i in indices])


class Batches:
    """Batches of one rank from a :class:`DataPosition` on; ``position`` is where the next starts.

    The order does not depend on the world size: step ``s`` of an epoch takes the epoch's
    samples ``[done + s * B * w, done + (s + 1) * B * w)`` and rank ``r`` every ``w``-th of
    them, so a checkpoint resumes at another world size (``done`` is what it had taken).
    With ``workers`` > 0, batches are collated (tokenised, aligned, padded) in DataLoader
    worker processes, ``prefetch`` batches ahead of the step that needs them.
    """

    def __init__(self, data: TrainingData, batch_size: int, seed: int, start: DataPosition, rank: int = 0, world: int = 1,
                 workers: int = 0, prefetch: int = 2):
        self.data, self.batch_size, self.seed, self.rank, self.world = data, batch_size, seed, rank, world
        self.global_batch = batch_size * world
        if len(data) < self.global_batch:
            raise DataError(f"training data: expected at least data.batch_size ({batch_size}) samples per rank ({world} rank(s)), "
                            f"found {len(data)} usable sample(s) in all")
        done = start.samples(batch_size)
        if done % self.global_batch:
            raise DataError(f"resuming at {world} rank(s): expected the samples already taken in epoch {start.epoch} "
                            f"({start.position} batch(es) of {batch_size} on {start.world} rank(s) = {done}) to be a multiple "
                            f"of data.batch_size x ranks ({self.global_batch}); resume on a world size that divides it")
        self.batches_per_epoch = len(data) // self.global_batch  # the ragged tail is dropped: every rank takes the same steps
        self.position = DataPosition(start.epoch, rank, done // self.global_batch, world)
        self._plans = self._plan(self.position)
        self._loader = None
        if workers > 0:
            self._loader = iter(DataLoader(_Collated(data), batch_size=None, sampler=_Indices(self._plan(self.position)),
                                           num_workers=workers, prefetch_factor=prefetch, persistent_workers=True))

    def _plan(self, start: DataPosition) -> Iterator[tuple[DataPosition, list[int]]]:
        """(where each batch is taken, its sample indices), from ``start`` on, forever."""
        epoch, index, order = start.epoch, start.position, None
        while True:
            if index >= self.batches_per_epoch:
                epoch, index, order = epoch + 1, 0, None
            if order is None:
                order = self.data.order(epoch, self.seed)
            window = order[index * self.global_batch:(index + 1) * self.global_batch]
            yield DataPosition(epoch, self.rank, index, self.world), window[self.rank::self.world]
            index += 1

    def next(self) -> tuple[DataPosition, list[int], DistillBatch]:
        """(where the batch was taken, its sample indices, the batch)."""
        taken, indices = next(self._plans)
        batch = next(self._loader) if self._loader is not None else self.data.batch(indices)
        self.position = DataPosition(taken.epoch, self.rank, taken.position + 1, self.world)
        return taken, indices, batch


class _Collated(Dataset):
    """Sample indices -> their collated batch, in a DataLoader worker (the tokenizer is forked with it)."""

    def __init__(self, data: TrainingData):
        self.data = data

    def __getitem__(self, indices: list[int]) -> DistillBatch:
        return self.data.batch(indices)


class _Indices(Sampler):
    """The batches' index lists, in the order :meth:`Batches._plan` takes them."""

    def __init__(self, plans: Iterator[tuple[DataPosition, list[int]]]):
        self.plans = plans

    def __iter__(self) -> Iterator[list[int]]:
        return (indices for _, indices in self.plans)


def check_schema_version(corpus: Corpus, corpus_file: Path, runtime_version: str) -> None:
    """Distillation refuses data the target runtime cannot read."""
    if not compatible(corpus.tool_schema_version, runtime_version):
        raise DataError(located(corpus_file, "tool_schema_version",
                                f"a version the target runtime reads (data.tool_schema_version {runtime_version}: same major, "
                                "minor at most its own); migrate the corpus with `kdtrain migrate-data`",
                                repr(corpus.tool_schema_version)))


def check_cache_teacher(config: DistillConfig, cache: TeacherCache, missing: set[str]) -> None:
    """Refuse, naming both files, when samples lack targets because another teacher or top-k filled them."""
    wanted = config.teacher.settings()
    others: dict[str, set[str]] = {}
    for entry in cache:
        k = int(entry.response.topk_ids.shape[1])
        if entry.sample_id in missing and (entry.teacher != wanted.teacher or k != wanted.top_k):
            others.setdefault(entry.sample_id, set()).add(f"{entry.teacher.name} {entry.teacher.version} top-{k}")
    if not others:
        return
    found = Counter(who for whos in others.values() for who in whos)
    raise DataError(located(
        cache.file, None,
        f"entries of the teacher that {config.file} names (teacher.name {wanted.name!r}, teacher.version {wanted.version!r}, "
        f"teacher.top_k {wanted.top_k})",
        f"{len(others)} sample(s) with entries only from " + ", ".join(f"{who} ({n})" for who, n in found.most_common())
        + f"; fill the cache with the config's teacher (kdtrain pipeline --stages teacher --distill-config {config.file}) "
        "or set its teacher section to the one that filled it"))


def load_training_data(config: DistillConfig, artifacts: Path | str | None = None) -> TrainingData:
    """The examples of ``data.artifacts`` (or ``artifacts``) that the trainer may use."""
    folder = ArtifactsFolder.open(artifacts or config.data.artifacts)
    corpus_dir = folder.path(DATA_CORPUS)
    corpus = Corpus.load(corpus_dir)
    check_schema_version(corpus, corpus_dir / "corpus.json", config.data.tool_schema_version)
    teacher_tokenizer = load_tokenizer(folder, "teacher")
    student_tokenizer = load_tokenizer(folder, "student")
    settings = config.teacher.settings()
    samples = {s.id: s for s in corpus.samples}
    requests = [build_request(s.id, s.messages, teacher_tokenizer, settings) for s in corpus.samples]
    cache = TeacherCache(folder.path(TEACHER_CACHE))
    targets = TeacherTargets(requests, cache, settings.accept)
    chat = ChatFormat.of(student_tokenizer)
    verified = [as_teacher_forced(e, chat) for e in targets]  # generate mode: the teacher's answers are the turns
    check_cache_teacher(config, cache, set(targets.missing))
    examples = [e for e in verified if len(student_tokenizer.encode(e.request.text).ids) <= config.data.max_length]
    too_long = len(verified) - len(examples)
    if too_long:
        log.info("left out %d sample(s) longer than data.max_length (%d student tokens)", too_long, config.data.max_length)
    if config.data.slice is not None:
        examples = examples[: config.data.slice]
    if not examples:
        raise DataError(located(folder.path(TEACHER_CACHE), None, "samples with verified teacher targets",
                                f"none of {len(requests)} ({dict(targets.reasons)}; {too_long} too long)"))
    eligible = tuple(samples[e.request.sample_id].meta.eligible.code_mode for e in examples)
    return TrainingData(tuple(examples), eligible, student_tokenizer, targets.missing_ratio, too_long)
