"""``tool_registry.json``: beyond its schema, tool names are unique, argument schemas are
valid JSON Schemas whose required fields exist, and the migrations form one chain ending at
``tool_schema_version`` whose steps name tools and fields of their target version."""

from __future__ import annotations

import json
from pathlib import Path

from kdcontracts.errors import ContractFileError, Problem
from kdcontracts.loader import describe, key_path
from kdtrain.data.registry import ToolRegistry, parse_version


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
