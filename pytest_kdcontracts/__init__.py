"""kdcontracts' pytest plugin: contract files in, one test item per check out.

Registered through the ``pytest11`` entry point as :mod:`pytest_kdcontracts.plugin`.
"""

from pytest_kdcontracts.errors import ContractFileError, ContractViolation

__all__ = ["ContractFileError", "ContractViolation"]
