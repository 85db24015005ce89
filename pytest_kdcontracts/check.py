"""What a contract family yields: one :class:`Check` per test item.

A check names the fixtures it needs; the collector turns it into a ``pytest.Function``
whose signature requests exactly those, so ``snapshot``, ``benchmark`` and a user's
overridden artifact fixtures reach it like any test function. Its ``marks`` are marker names
(``"golden"``) or whole marks (``pytest.mark.xfail(...)``), applied with ``add_marker``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from pytest_kdcontracts.errors import ContractViolation


@dataclass(frozen=True)
class Check:
    name: str  # what is checked: "single_token"
    params: tuple[str, ...]  # over what: ("runtime", "<think>") -> id "runtime-<think>"
    run: Callable[..., None]  # called with the fixtures below as keyword arguments
    fixtures: tuple[str, ...]
    marks: tuple[str | pytest.MarkDecorator, ...] = ()  # marker names or marks, for item.add_marker
    doc: str = ""

    @property
    def item_name(self) -> str:
        return f"{self.name}[{'-'.join(self.params)}]" if self.params else self.name


def fail(contract: str, subject: str, expected: object, found: object, detail: str = "",
         error: type[ContractViolation] = ContractViolation) -> None:
    """Raise the standard violation: contract, subject, expected, found (and why it matters);
    ``error`` a narrower kind of violation where a family tells them apart."""
    message = f"{contract}: {subject}\n  expected: {expected}\n  found:    {found}"
    if detail:
        message += f"\n  {detail}"
    raise error(message)
