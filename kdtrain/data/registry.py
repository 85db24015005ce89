"""Reading a tool registry file (``contracts/tool_registry.json``) from the trainer's side.

The registry's types, its version-compatibility rule and the checks of the file are the
contract language's (:mod:`kdcontracts.models.tool_registry`); :func:`load_registry` reads a
file through it, exactly as the plugin does.
"""

from __future__ import annotations

from pathlib import Path

from kdcontracts.families import family_for
from kdcontracts.models.tool_registry import ToolRegistry
from kdtrain.errors import DataError, located

REGISTRY_FILE = "tool_registry.json"


def load_registry(path: Path | str) -> ToolRegistry:
    """Read a registry file exactly as the plugin reads ``contracts/tool_registry.json``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(located(path, None, "a tool registry file (contracts/tool_registry.json)", "no such file"))
    return family_for(Path(REGISTRY_FILE)).load(path)
