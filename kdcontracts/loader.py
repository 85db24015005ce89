"""Read a contract file (JSON or YAML) and validate it against the JSON Schema shipped for it.

Every failure becomes a :class:`ContractFileError` listing each problem as key path,
expected and found; nothing here lets a parser's or validator's traceback escape. The YAML
loader that refuses duplicate keys is the one every YAML file of the project is read with.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from kdcontracts.errors import ContractFileError, Problem

_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}


def _is_strict_integer(checker, instance) -> bool:
    # JSON Schema would accept 3.0 as an integer; a token id written as 3.0 is a bug.
    return isinstance(instance, int) and not isinstance(instance, bool)


_StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)


def json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def describe(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if json_type(value) in _JSON_TYPES.values() else repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{text} ({json_type(value)})"


def key_path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _problem(error: ValidationError) -> Problem:
    path = list(error.absolute_path)
    kind, value, instance = error.validator, error.validator_value, error.instance
    if "propertyNames" in error.relative_schema_path:
        # The error is about a key (instance), reported at the object that holds it.
        expected = f"keys from {value}" if kind == "enum" else f"keys matching {error.message}"
        return Problem(key_path(path + [instance]), expected, f"unknown key {instance!r}")
    if kind == "required":
        missing = [k for k in value if k not in instance]
        return Problem(key_path(path + missing[:1]), "a value (required key)", "no such key")
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = [k for k in instance if k not in allowed]
        return Problem(key_path(path + extra[:1]), f"only the keys {allowed}", f"unknown key {extra[0]!r}")
    if kind == "type":
        types = value if isinstance(value, list) else [value]
        return Problem(key_path(path), " or ".join(types), describe(instance))
    if kind == "enum":
        return Problem(key_path(path), f"one of {value}", describe(instance))
    if kind == "minItems":
        return Problem(key_path(path), f"at least {value} item(s)", f"{len(instance)} item(s)")
    if kind == "minProperties":
        return Problem(key_path(path), f"at least {value} key(s)", f"{len(instance)} key(s)")
    if kind == "minLength":
        return Problem(key_path(path), f"a string of at least {value} character(s)", describe(instance))
    if kind == "pattern":
        return Problem(key_path(path), f"a string matching {value}", describe(instance))
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        word = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        return Problem(key_path(path), f"a number {word} {value}", describe(instance))
    if kind == "uniqueItems":
        return Problem(key_path(path), "no repeated items", describe(instance))
    if kind == "const":
        return Problem(key_path(path), json.dumps(value), describe(instance))
    return Problem(key_path(path), error.message, describe(instance))


@lru_cache(maxsize=None)
def schema_validator(schema_name: str):
    text = resources.files("kdcontracts.schemas").joinpath(schema_name).read_text(encoding="utf-8")
    schema = json.loads(text)
    _StrictValidator.check_schema(schema)
    return _StrictValidator(schema)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """Two equal keys in one YAML mapping; both marks are kept so the message names both lines."""

    def __init__(self, key, first: yaml.Mark, again: yaml.Mark):
        self.key, self.first_line, self.again_line = key, first.line + 1, again.line + 1
        super().__init__(f"{key!r} first at line {self.first_line}", first, f"duplicate key {key!r}", again)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys, silently; a second value is refused instead."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            # Before merge keys (<<) are flattened: overriding a merged key is YAML, not a duplicate.
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in first:
                        raise DuplicateKeyError(key, first[key], key_node.start_mark)
                    first[key] = key_node.start_mark
                except TypeError:  # unhashable: the base constructor reports it
                    break
        return super().construct_mapping(node, deep=deep)


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_document(path: Path) -> Any:
    """JSON or YAML by suffix; a parse failure names the line and column."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ContractFileError(file, [Problem("(document)", "UTF-8 text", f"undecodable byte at offset {exc.start}")]) from None
    if path.suffix in (".yaml", ".yml"):
        try:
            return yaml.load(text, Loader=UniqueKeyLoader)
        except DuplicateKeyError as exc:
            found = f"{exc.key!r} at line {exc.first_line} and again at line {exc.again_line}"
            raise ContractFileError(file, [Problem(str(exc.key), "unique keys in every mapping", found)]) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ContractFileError(file, [Problem("(document)", "valid YAML", f"{problem}{where}")]) from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise ContractFileError(file, [Problem("(document)", "valid JSON", f"{exc.msg} at line {exc.lineno} column {exc.colno}")]) from None
    except ValueError as exc:
        raise ContractFileError(file, [Problem("(document)", "unique keys in every object", str(exc))]) from None


def load_contract(path: Path, schema_name: str) -> Any:
    """Parse and schema-validate; returns the plain document (:mod:`kdcontracts.models` types it)."""
    data = parse_document(path)
    errors = sorted(schema_validator(schema_name).iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        raise ContractFileError(str(path), [_problem(e) for e in errors[:20]])
    return data


def path_beside(file: Path, key: str, value: str) -> Path:
    """A path a contract names, resolved against the contract's folder; a value no file system
    accepts (a NUL byte) is a located error like any other bad value."""
    try:
        return (file.parent / value).resolve()
    except (ValueError, OSError, RuntimeError) as exc:
        raise ContractFileError(str(file), [Problem(key, "a file-system path", f"{describe(value)}: {exc}")]) from None
