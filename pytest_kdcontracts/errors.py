"""The plugin's errors. Each renders as one message a person can act on, without a traceback.

A bad contract file is the contract language's error (:mod:`kdcontracts.errors`); a broken
artifact is kdtrain's; only a violated contract is the plugin's own.
"""

from __future__ import annotations

from kdcontracts.errors import ContractFileError, Problem
from kdtrain.errors import ArtifactError

__all__ = ["ArtifactError", "ContractFileError", "ContractViolation", "Problem"]


class ContractViolation(AssertionError):
    """An artifact breaks a contract. ``str()`` is the whole report of the failing item."""
