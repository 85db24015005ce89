"""What is wrong with a contract file, as one located message per problem."""

from __future__ import annotations

from dataclasses import dataclass

from kdtrain.errors import KDError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a contract file: where, what was expected, what was found."""

    key_path: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"at {self.key_path}: expected {self.expected}, found {self.found}"


class ContractFileError(KDError):
    """A contract file that cannot be loaded or does not match its schema (a collection error)."""

    def __init__(self, file: str, problems: list[Problem]):
        self.file, self.problems = file, problems
        lines = [f"{file}: invalid contract file"] + [f"  {p}" for p in problems]
        super().__init__("\n".join(lines))
