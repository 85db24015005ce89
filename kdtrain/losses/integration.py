"""Where an answer carries values from a tool result, found by permissive patterns.

An answer integrates a result when it restates its values, not when it copies its bytes:
"18.50 °C, cloudy" integrates ``{"temperature": 18.5, "sky": "overcast"}``. Each JSON leaf
becomes atoms (a number, or a bag of words) and each atom is searched for in the answer:

- numbers equal up to formatting: thousands separators ("66,412", no-break or thin spaces),
  a decimal comma when not followed by exactly three digits ("18,5"), trailing zeros, and
  rounding to the precision written (18.5 matches "18" and "19"; 412.37 matches "412.4").
  A rounded number needs two significant digits ("1" does not match 1.4), so that small
  integers do not match everything; "66.412" is read as a decimal, never as 66412;
- synonyms from a small table (overcast ~ cloudy, celsius ~ °C, EUR ~ €, ...), applied to
  both sides, plus plural "s" stripped;
- reordering: a multi-word value matches as a bag of words inside a window of at most
  ``len(bag) + SLACK`` answer words ("partly cloudy" ~ "cloudy, partly");
- variable naming: identifiers split on snake_case, camelCase and spaces, so a key
  ``price_eur`` matches "price in EUR". Keys count only with two or more words (a key like
  ``sky`` is too generic), and only for spans: ``integrates`` counts leaf values.

Stop words and one-letter words are dropped from bags but may fill a window.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Iterator

NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?"  # 66,412 / 1,234.5
    r"|\d{1,3}(?:[\u00a0\u202f]\d{3})+(?!\d)(?:[.,]\d+)?"  # 66 412 with a no-break or thin space
    r"|\d+(?:[.,]\d+)?)(?!\d)"  # 18.5 / 18,5 / 412
)
WORD = re.compile(r"°\s?[CFcf]\b|[€$¥£]|[^\W_]+")
SEGMENT = re.compile(r"[\n;:!?()\[\]{}\"]|[.,](?:\s|$)")
CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
SLACK = 2
STOP = frozenset("a an the in of to and or for on at by with is are was be it its this that as from per".split())
SYNONYMS = {
    "cloudy": ("overcast", "clouds", "cloud"),
    "clear": ("sunny",),
    "fog": ("foggy", "mist", "misty"),
    "rain": ("rainy", "raining"),
    "snow": ("snowy", "snowing"),
    "celsius": ("°c", "centigrade"),
    "fahrenheit": ("°f",),
    "eur": ("€", "euro"),
    "usd": ("$", "dollar"),
    "jpy": ("¥", "yen"),
    "gbp": ("£", "pound", "sterling"),
    "minute": ("min", "mins"),
    "sent": ("emailed", "delivered"),
}
CANONICAL = {alias: word for word, aliases in SYNONYMS.items() for alias in (word, *aliases)}


def _word(raw: str) -> str:
    w = raw.lower().replace(" ", "")
    if w in CANONICAL:
        return CANONICAL[w]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        w = w[:-1]
    return CANONICAL.get(w, w)


def _bag(text: str) -> frozenset[str]:
    """The words a value must show: identifiers split, synonyms folded, stop words and single letters dropped."""
    words = (_word(m.group()) for m in WORD.finditer(CAMEL.sub(" ", text)))
    return frozenset(w for w in words if len(w) > 1 and w not in STOP and not w.isdigit())


def _number(text: str) -> tuple[float, int, int]:
    """(value, decimals written, significant digits written) of a NUMBER match."""
    t = text.replace("\u00a0", "").replace("\u202f", "")
    t = t.replace(",", "") if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", t) else t.replace(",", ".")
    decimals = len(t.split(".")[1]) if "." in t else 0
    return float(t), decimals, len(re.sub(r"\D", "", t).lstrip("0"))


@dataclass(frozen=True)
class Atom:
    number: float | None = None
    words: frozenset[str] = frozenset()


def _value_atoms(value: object) -> list[Atom]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [Atom(number=float(value))]
    text = str(value)
    atoms = [Atom(number=_number(m.group())[0]) for m in NUMBER.finditer(text)]
    bags = (_bag(segment) for segment in SEGMENT.split(NUMBER.sub(" ", text)))
    return atoms + [Atom(words=bag) for bag in bags if bag]


def _leaves(value: object) -> Iterator[tuple[bool, list[Atom]]]:
    """(is a leaf value, its atoms) for every key with two or more words and every leaf value."""
    if isinstance(value, dict):
        for key, item in value.items():
            bag = _bag(str(key))
            if len(bag) >= 2:
                yield False, [Atom(words=bag)]
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        atoms = _value_atoms(value)
        if atoms:
            yield True, atoms


def _parse(tool_result: str) -> object:
    try:
        return json.loads(tool_result)
    except (json.JSONDecodeError, TypeError):
        return tool_result


class _Answer:
    """The answer's numbers and words, with their character spans."""

    def __init__(self, text: str):
        self.numbers = [(*_number(m.group()), m.span()) for m in NUMBER.finditer(text)]
        self.words = [(_word(m.group()), m.start(), m.end()) for m in WORD.finditer(text)]

    def find(self, atom: Atom) -> list[tuple[int, int]]:
        if atom.number is not None:
            return [span for value, decimals, digits, span in self.numbers if _same_number(atom.number, value, decimals, digits)]
        return self._windows(atom.words)

    def _windows(self, bag: frozenset[str]) -> list[tuple[int, int]]:
        found, limit = [], len(bag) + SLACK
        for i, (word, start, _) in enumerate(self.words):
            if word not in bag:
                continue
            seen = set()
            for word_j, _, end in self.words[i: i + limit]:
                seen.add(word_j)
                if bag <= seen:
                    found.append((start, end))
                    break
        return found


def _same_number(result: float, written: float, decimals: int, digits: int) -> bool:
    if math.isclose(result, written, rel_tol=0.0, abs_tol=1e-9):
        return True
    return digits >= 2 and abs(result - written) <= 0.5 * 10.0 ** -decimals + 1e-9


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def integration_spans(answer: str, tool_result: str) -> list[tuple[int, int]]:
    """Character spans of ``answer`` that restate values (or multi-word keys) of ``tool_result``, merged and sorted."""
    found = _Answer(answer)
    return _merge([span for _, atoms in _leaves(_parse(tool_result)) for atom in atoms for span in found.find(atom)])


def integrates(answer: str, tool_result: str) -> float:
    """The fraction of the result's leaf values the answer restates (any atom of a leaf counts); 1.0 if it has none."""
    found = _Answer(answer)
    leaves = [atoms for is_value, atoms in _leaves(_parse(tool_result)) if is_value]
    if not leaves:
        return 1.0
    return sum(any(found.find(atom) for atom in atoms) for atoms in leaves) / len(leaves)
