"""``tool_registry.json``: the tools the target runtime offers, their argument schemas, the
versions of the tool schema and of the orchestrator, and the declared migrations from older
tool-schema versions, typed as :class:`ToolRegistry` with the version-compatibility rule.

Data written against one registry is trained on for another runtime only if the versions are
compatible (:func:`compatible`); otherwise it is migrated first (``kdtrain.data.migrate``) or
refused. Beyond its schema, tool names are unique, argument schemas are valid JSON Schemas
whose required fields exist, and the migrations form one chain ending at
``tool_schema_version`` whose steps name tools and fields of their target version."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Union

from kdcontracts.errors import ContractFileError, Problem
from kdcontracts.loader import describe, key_path
from kdtrain.errors import DataError, located

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


def _tool_problems(tools: list[dict]) -> list[Problem]:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    problems, seen = [], {}
    for i, tool in enumerate(tools):
        if tool["name"] in seen:
            problems.append(Problem(f"tools[{i}].name", f"a name not used before (also at tools[{seen[tool['name']]}])", repr(tool["name"])))
        seen.setdefault(tool["name"], i)
        try:
            Draft202012Validator.check_schema(tool["parameters"])
        except SchemaError as exc:
            problems.append(Problem(key_path(["tools", i, "parameters", *exc.absolute_path]), "a valid JSON Schema (draft 2020-12)", exc.message))
        properties = sorted(tool["parameters"]["properties"])
        problems += [Problem(f"tools[{i}].parameters.required[{j}]", f"a key of parameters.properties {properties}", repr(name))
                     for j, name in enumerate(tool["parameters"]["required"]) if name not in properties]
    return problems


def _undo_steps(i: int, migration: dict, state: dict[str, dict], problems: list[Problem]) -> dict[str, dict]:
    """The tools (name -> field schemas) before ``migration``, checking each step against the tools after it."""
    from jsonschema import Draft202012Validator

    state = {name: dict(fields) for name, fields in state.items()}
    for j, step in reversed(list(enumerate(migration["steps"]))):
        kind, body = next(iter(step.items()))
        at, version = f"migrations[{i}].steps[{j}].{kind}", migration["to"]
        tool_key = "to" if kind == "rename_tool" else "tool"
        if body[tool_key] not in state:
            problems.append(Problem(f"{at}.{tool_key}", f"a tool of version {version} after this step {sorted(state)}", repr(body[tool_key])))
            continue
        if kind == "rename_tool":
            state[body["from"]] = state.pop(body["to"])
            continue
        fields = state[body["tool"]]
        field_key = "to" if kind == "rename_field" else "field"
        if body[field_key] not in fields:
            problems.append(Problem(f"{at}.{field_key}", f"a field of {body['tool']} at version {version} {sorted(fields)}", repr(body[field_key])))
        elif kind == "rename_field":
            state[body["tool"]] = {(body["from"] if k == body["to"] else k): v for k, v in fields.items()}
        else:
            if not Draft202012Validator(fields[body["field"]]).is_valid(body["default"]):
                problems.append(Problem(f"{at}.default", f"a value valid for {body['tool']}.{body['field']} {json.dumps(fields[body['field']])}", describe(body["default"])))
            del fields[body["field"]]
    return state


def _migration_problems(data: dict) -> list[Problem]:
    """Migrations form a chain ending at tool_schema_version; each step names tools and fields of its target version."""
    current, problems = data["tool_schema_version"], []
    tools_at = {current: {t["name"]: dict(t["parameters"]["properties"]) for t in data["tools"]}}
    pending, starts = [], {}
    for i, m in enumerate(data["migrations"]):
        if parse_version(m["from"]) >= parse_version(m["to"]):
            problems.append(Problem(f"migrations[{i}].from", f"a version older than its 'to' ({m['to']})", repr(m["from"])))
        elif m["from"] in starts:
            problems.append(Problem(f"migrations[{i}].from", f"a version no other migration starts from (also migrations[{starts[m['from']]}])", repr(m["from"])))
        else:
            starts[m["from"]] = i
            pending.append((i, m))
    while ready := [(i, m) for i, m in pending if m["to"] in tools_at]:
        for i, m in ready:
            tools_at[m["from"]] = _undo_steps(i, m, tools_at[m["to"]], problems)
            pending.remove((i, m))
    problems += [Problem(f"migrations[{i}].to", f"a version on the chain ending at tool_schema_version {current!r} (reachable: {sorted(tools_at)})", repr(m["to"]))
                 for i, m in pending]
    return problems


def parse(path: Path, data: dict) -> ToolRegistry:
    problems = _tool_problems(data["tools"])
    problems += _migration_problems(data) if not problems else []
    if problems:
        raise ContractFileError(str(path), problems)
    return ToolRegistry.from_json(path, data)
