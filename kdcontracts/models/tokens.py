"""``tokens.json``: the authoritative special tokens (text, roles, supervision, id per
tokenizer), round-trip prompts, supervision examples, tokenizer fingerprints and the vocab
migration between two of the tokenizers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kdcontracts.errors import ContractFileError, Problem

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class Message:
    """One chat turn, as a supervision example writes it (and the corpus and teachers carry it)."""

    role: Role
    content: str


@dataclass(frozen=True)
class SpecialToken:
    text: str
    roles: tuple[str, ...]
    supervised: bool
    ids: dict[str, int | None]


@dataclass(frozen=True)
class Example:
    name: str
    messages: tuple[Message, ...]


@dataclass(frozen=True)
class TokensContract:
    file: Path
    tokenizers: tuple[str, ...]
    special_tokens: tuple[SpecialToken, ...]
    prompts: dict[str, str]
    supervision_tokenizers: tuple[str, ...]
    examples: tuple[Example, ...]
    fingerprints: dict[str, str]
    migration_from: str
    migration_to: str

    @property
    def name(self) -> str:
        return self.file.name

    def pad_id(self, tokenizer: str) -> int | None:
        return next(t.ids.get(tokenizer) for t in self.special_tokens if "pad" in t.roles)


def _cross_reference_problems(data: dict) -> list[Problem]:
    listed = data["tokenizers"]
    expected = f"a tokenizer listed in tokenizers {listed}"
    problems = []
    for i, token in enumerate(data["special_tokens"]):
        problems += [Problem(f"special_tokens[{i}].ids.{k}", expected, repr(k)) for k in token["ids"] if k not in listed]
    problems += [Problem(f"fingerprints.{k}", expected, repr(k)) for k in data["fingerprints"] if k not in listed]
    problems += [Problem(f"fingerprints.{k}", "a fingerprint for every listed tokenizer", "no such key") for k in listed if k not in data["fingerprints"]]
    problems += [Problem(f"supervision.tokenizers[{i}]", expected, repr(k)) for i, k in enumerate(data["supervision"]["tokenizers"]) if k not in listed]
    problems += [Problem(f"migration.{key}", expected, repr(data["migration"][key])) for key in ("from", "to") if data["migration"][key] not in listed]
    for key, items, field in (("special_tokens", data["special_tokens"], "text"), ("round_trip_prompts", data["round_trip_prompts"], "name"), ("supervision.examples", data["supervision"]["examples"], "name")):
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            if item[field] in seen:
                problems.append(Problem(f"{key}[{i}].{field}", f"a {field} not used before (also at [{seen[item[field]]}])", repr(item[field])))
            seen.setdefault(item[field], i)
    for role in ("bos", "eos", "pad"):  # a tokenizer may have no BOS (Qwen's): then none has the role
        holders = [t["text"] for t in data["special_tokens"] if role in t["roles"]]
        if len(holders) > 1 or (role != "bos" and not holders):
            wanted = "at most one token" if role == "bos" else "exactly one token"
            problems.append(Problem("special_tokens", f"{wanted} with role {role!r}", f"{len(holders)}: {holders}"))
    return problems


def parse(path: Path, data: dict) -> TokensContract:
    problems = _cross_reference_problems(data)
    if problems:
        raise ContractFileError(str(path), problems)
    return TokensContract(
        file=path,
        tokenizers=tuple(data["tokenizers"]),
        special_tokens=tuple(SpecialToken(t["text"], tuple(t["roles"]), t["supervised"], dict(t["ids"])) for t in data["special_tokens"]),
        prompts={p["name"]: p["text"] for p in data["round_trip_prompts"]},
        supervision_tokenizers=tuple(data["supervision"]["tokenizers"]),
        examples=tuple(Example(e["name"], tuple(Message(m["role"], m["content"]) for m in e["messages"])) for e in data["supervision"]["examples"]),
        fingerprints=dict(data["fingerprints"]),
        migration_from=data["migration"]["from"],
        migration_to=data["migration"]["to"],
    )
