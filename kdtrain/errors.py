"""kdtrain's error hierarchy: every message names the file, the key, what was expected and found."""

from __future__ import annotations


class KDError(Exception):
    """Base class of every error kdtrain raises on purpose."""


class ArtifactError(KDError):
    """An artifact is missing, unreadable, or not what its manifest says."""


class ConfigError(KDError):
    """A configuration or input file is invalid."""


class DataError(KDError):
    """Distillation data is unreadable, fails its checksum, or cannot be used with the target runtime."""


def located(file: object, key: str | None, expected: str, found: object) -> str:
    """The one message format: ``file: at key: expected …, found …``."""
    where = f"{file}" + (f": at {key}" if key else "")
    return f"{where}: expected {expected}, found {found}"
