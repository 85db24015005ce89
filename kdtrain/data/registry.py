"""The tool-schema registry (``contracts/tool_registry.json``): the tools the target runtime
offers, their argument schemas, the versions of the tool schema and of the orchestrator, and
the declared migrations from older tool-schema versions.

Data written against one registry is trained on for another runtime only if the versions are
compatible (:func:`compatible`); otherwise it is migrated first (``kdtrain.data.migrate``) or
refused. Schema validation and cross-reference checks of the file happen in the contract
language (``kdcontracts.models.tool_registry``); :func:`load_registry` goes through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Union

from kdtrain.errors import DataError, located

REGISTRY_FILE = "tool_registry.json"
_VERSION = re.compile(r"^(\d+)\.(\d+)$")


def parse_version(version: str) -> tuple[int, int]:
    """``"2.1"`` -> ``(2, 1)``; a DataError for anything that is not ``MAJOR.MINOR``."""
    match = _VERSION.match(version) if isinstance(version, str) else None
    if match is None:
        raise DataError(located("version", None, '"MAJOR.MINOR" (e.g. "2.0")', repr(version)))
    return int(match[1]), int(match[2])


def compatible(data_version: str, runtime_version: str) -> bool:
    """Whether data written at ``data_version`` can be used by a runtime at ``runtime_version``.

    Versions are ``MAJOR.MINOR``. A minor bump only adds optional fields, so a runtime reads
    data of its own major version and any minor up to its own; a major bump (renamed tools or
    fields, removed or newly required fields) breaks compatibility both ways. The same rule
    holds for ``tool_schema_version`` and ``orchestrator_version``. An unparsable version is
    never compatible.
    """
    try:
        data, runtime = parse_version(data_version), parse_version(runtime_version)
    except DataError:
        return False
    return data[0] == runtime[0] and data[1] <= runtime[1]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON Schema object for the arguments

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.parameters.get("properties", {}))

    @cached_property
    def validator(self):
        """A draft 2020-12 validator of this tool's arguments (``format`` is asserted: emails)."""
        from jsonschema import Draft202012Validator

        return Draft202012Validator(self.parameters, format_checker=Draft202012Validator.FORMAT_CHECKER)


@dataclass(frozen=True)
class RenameTool:
    old: str
    new: str


@dataclass(frozen=True)
class RenameField:
    tool: str
    old: str
    new: str


@dataclass(frozen=True)
class AddField:
    tool: str
    field: str
    default: Any


Step = Union[RenameTool, RenameField, AddField]


def parse_step(data: dict) -> Step:
    """One migration step as written in the file (exactly one key, checked by the schema)."""
    kind, body = next(iter(data.items()))
    if kind == "rename_tool":
        return RenameTool(body["from"], body["to"])
    if kind == "rename_field":
        return RenameField(body["tool"], body["from"], body["to"])
    return AddField(body["tool"], body["field"], body["default"])


def describe_step(step: Step) -> str:
    if isinstance(step, RenameTool):
        return f"rename_tool {step.old} -> {step.new}"
    if isinstance(step, RenameField):
        return f"rename_field {step.tool}.{step.old} -> {step.tool}.{step.new}"
    return f"add_field {step.tool}.{step.field} = {step.default!r}"


@dataclass(frozen=True)
class Migration:
    """Rewrites data from tool-schema version ``source`` to ``target``; steps apply in order."""

    source: str
    target: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class ToolRegistry:
    file: Path
    tool_schema_version: str
    orchestrator_version: str
    tools: tuple[Tool, ...]
    migrations: tuple[Migration, ...]

    @classmethod
    def from_json(cls, file: Path, data: dict) -> "ToolRegistry":
        tools = tuple(Tool(t["name"], t["description"], t["parameters"]) for t in data["tools"])
        migrations = tuple(Migration(m["from"], m["to"], tuple(parse_step(s) for s in m["steps"])) for m in data["migrations"])
        return cls(Path(file), data["tool_schema_version"], data["orchestrator_version"], tools, migrations)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tools)

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)

    def migration_path(self, version: str) -> tuple[Migration, ...] | None:
        """The migrations taking data at ``version`` to this registry, or None if there is no way.

        Data already compatible needs none; otherwise follow the declared chain from ``version``
        until the data is compatible (the chain ends at ``tool_schema_version``).
        """
        path: list[Migration] = []
        while not compatible(version, self.tool_schema_version):
            step = next((m for m in self.migrations if m.source == version), None)
            if step is None or len(path) > len(self.migrations):
                return None
            path.append(step)
            version = step.target
        return tuple(path)


def load_registry(path: Path | str) -> ToolRegistry:
    """Read a registry file exactly as the plugin reads ``contracts/tool_registry.json``."""
    from kdcontracts.families import family_for  # its model types the file with this module's ToolRegistry

    path = Path(path)
    if not path.is_file():
        raise DataError(located(path, None, "a tool registry file (contracts/tool_registry.json)", "no such file"))
    return family_for(Path(REGISTRY_FILE)).load(path)
