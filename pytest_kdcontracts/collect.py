"""Collection: a contract file becomes a ``pytest.File`` whose children are ``pytest.Function`` items.

Following pytest's documented pattern for non-Python files, with one difference: items are
``Function``s built from a callable whose signature lists the check's fixtures, so the
fixture machinery (scopes, conftest overrides, syrupy, pytest-benchmark) applies to them.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from kdcontracts import families
from pytest_kdcontracts.check import Check
from pytest_kdcontracts.contracts import checks
from pytest_kdcontracts.errors import ArtifactError, ContractFileError, ContractViolation


def _test_function(check: Check):
    def contract_check(**fixtures):
        check.run(**fixtures)

    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in check.fixtures]
    contract_check.__signature__ = inspect.Signature(params)
    contract_check.__name__ = check.name
    contract_check.__doc__ = check.doc
    return contract_check


class ContractItem(pytest.Function):
    """One check of one contract; failures print the violation alone, no traceback."""

    check: Check

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, (ContractViolation, ArtifactError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::{self.name}"


def make_item(parent: pytest.Collector, check: Check, marks: tuple[str | pytest.MarkDecorator, ...] = ()) -> ContractItem:
    item = ContractItem.from_parent(parent, name=check.item_name, callobj=_test_function(check))
    item.check = check
    for mark in ("kdcontract", *marks):
        item.add_marker(mark)
    return item


class ContractFile(pytest.File):
    """A contract file; loading and schema validation happen here, at collection."""

    def collect(self):
        contract = families.load(self.path)
        family = families.family_for(self.path)
        for check in checks(family, contract):
            yield make_item(self, check, (family.mark, *check.marks))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, ContractFileError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


def is_contract_file(path: Path) -> bool:
    return path.suffix in (".json", ".yaml", ".yml")
