"""Schema-driven faults for contract files: walk a valid document beside its JSON Schema and
plant one violation (missing required key, wrong type, value outside an enum, emptied list,
unknown key), returning the key path where the plugin must report it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

from hypothesis import strategies as st

from kdcontracts.loader import key_path

# A value of each JSON type, used to plant a value of a type the schema does not allow.
SAMPLES = {"string": "oops", "integer": 7, "number": 2.5, "boolean": True, "null": None, "array": [1], "object": {"k": 1}}


@dataclass(frozen=True)
class Fault:
    path: tuple
    kind: str
    value: Any = None

    @property
    def key_path(self) -> str:
        return key_path(self.path)


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].split("/")[-1]]
    return schema


def faults(doc: Any, schema: dict, root: dict | None = None, path: tuple = ()) -> Iterator[Fault]:
    root = root or schema
    schema = _resolve(schema, root)
    allowed = schema.get("type")
    allowed = [allowed] if isinstance(allowed, str) else allowed
    if "enum" in schema:
        yield Fault(path, "replace", "not-a-valid-choice")
    if allowed:
        for name, value in SAMPLES.items():
            if name not in allowed and not (name == "integer" and "number" in allowed):
                yield Fault(path, "replace", value)
                break
    if isinstance(doc, dict):
        for key in schema.get("required", []):
            yield Fault(path + (key,), "delete")
        if schema.get("additionalProperties") is False:
            yield Fault(path + ("unexpected_key",), "add", 1)
        for key, value in doc.items():
            sub = schema.get("properties", {}).get(key) or schema.get("additionalProperties")
            if "propertyNames" in schema and "enum" in schema["propertyNames"]:
                yield Fault(path + ("not_a_tokenizer",), "add", value)
            if isinstance(sub, dict):
                yield from faults(value, sub, root, path + (key,))
    if isinstance(doc, list):
        if schema.get("minItems", 0) > 0:
            yield Fault(path, "replace", [])
        if doc and isinstance(schema.get("items"), dict):
            yield from faults(doc[0], schema["items"], root, path + (0,))


def apply(doc: Any, fault: Fault) -> Any:
    doc = copy.deepcopy(doc)
    if not fault.path:
        return fault.value
    parent = doc
    for part in fault.path[:-1]:
        parent = parent[part]
    last = fault.path[-1]
    if fault.kind == "delete":
        del parent[last]
    else:
        parent[last] = fault.value
    return doc


def fault_strategy(doc: Any, schema: dict) -> st.SearchStrategy[Fault]:
    return st.sampled_from(list(faults(doc, schema)))
