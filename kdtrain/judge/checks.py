"""The objective checks: what an output is worth without asking any judge.

A probe stores its check (a small JSON object) beside its outputs, so that what the probe set
records can be measured again by anyone holding the file (the plugin's ``probes`` item does):

- ``unit_tests`` (``function``, ``tests``): the fraction of the tests a program passes, run in
  the restricted sandbox (:mod:`kdtrain.judge.sandbox`), 0 when it does not compile;
- ``tool_call`` (``name``, ``arguments``): 1 when the response is one call that validates against
  the registry and matches the expected call BFCL-style (:func:`kdtrain.gates.scenarios.args_match`), else 0;
- ``tool_arguments`` (same keys): the fraction of the tool's required arguments given with the expected value;
- ``exact`` (``expected``): 1 when the answer is the expected number (the last one stated) or
  names the expected capital and no other, else 0.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from kdtrain.data.calls import read_calls
from kdtrain.data.scenario_cases import contains, normalise, numbers
from kdtrain.data.validate import check_call
from kdtrain.gates.scenarios import args_match, same_value
from kdtrain.judge.sandbox import Candidate, run_all

# Countries whose capital is also the seat of government (so padded answers saying so stay true).
CAPITALS = (("Kenya", "Nairobi"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Portugal", "Lisbon"),
            ("France", "Paris"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"),
            ("Poland", "Warsaw"), ("Thailand", "Bangkok"), ("Ireland", "Dublin"), ("Argentina", "Buenos Aires"),
            ("Austria", "Vienna"), ("Ghana", "Accra"))


def exact_matches(text: str, expected: str) -> bool:
    try:
        value = float(expected)
    except ValueError:
        others = [c for _, c in CAPITALS if normalise(c) != normalise(expected)]
        return contains(text, expected) and not any(contains(text, c) for c in others)
    stated = numbers(normalise(text))
    return bool(stated) and abs(stated[-1] - value) < 1e-9


def judge_call(text: str, name: str, expected: dict, registry) -> dict[str, Any]:
    """What the registry says of a response meant to call ``name`` with ``expected``."""
    calls = read_calls(0, text, set(registry.names))
    if len(calls) != 1:
        return {"valid": False, "matches": False, "problem": f"expected one tool call, found {len(calls)}"}
    call = calls[0]
    findings = check_call(call, registry)
    matches = not findings and call.tool == name and args_match(call.arguments, expected, registry.tool(name).parameters)
    problem = (findings[0].detail if findings else None if matches
               else f"expected {name} with {json.dumps(expected)}, found {call.tool} with {json.dumps(call.arguments)}")
    return {"valid": not findings, "matches": matches, "problem": problem, "arguments": call.arguments}


def present_fraction(arguments: dict, expected: dict, required: Sequence[str]) -> float:
    """The fraction of the required arguments given with the expected value."""
    return sum(k in arguments and same_value(arguments[k], expected[k]) for k in required) / len(required)


def measure(check: Mapping[str, Any], texts: Sequence[str], registry) -> list[tuple[float, dict]]:
    """Each text's metric and the evidence behind it, under ``check``."""
    kind = check["kind"]
    if kind == "unit_tests":
        tests = tuple((tuple(args), expected) for args, expected in check["tests"])
        runs = run_all([Candidate(text, check["function"], tests) for text in texts])
        return [(r.fraction if r.compiles else 0.0, {"check": kind, **r.to_json()}) for r in runs]
    if kind in ("tool_call", "tool_arguments"):
        found = []
        for text in texts:
            evidence = judge_call(text, check["name"], check["arguments"], registry)
            given = evidence.pop("arguments", {})
            required = registry.tool(check["name"]).parameters["required"]
            metric = float(evidence["matches"]) if kind == "tool_call" else present_fraction(given, check["arguments"], required)
            found.append((metric, {"check": kind, **evidence}))
        return found
    if kind == "exact":
        return [(float(ok), {"check": kind, "matches": ok}) for ok in (exact_matches(t, check["expected"]) for t in texts)]
    raise ValueError(f"objective check: expected a kind among unit_tests, tool_call, tool_arguments, exact, found {kind!r}")
