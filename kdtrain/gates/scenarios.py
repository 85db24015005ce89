"""Teacher, student and baseline on the held-out scenario cases (:mod:`kdtrain.data.scenario_cases`),
judged on what they achieve rather than on string equality with the reference.

Each case runs as an agent loop. A round asks a model for the next assistant turn of every
unfinished case at once (one batched ``turns`` call). A turn with a ``<tool_call>`` is read as
the runtime reads it (:func:`kdtrain.data.calls.read_calls`) and compared with the case's next
expected step: a call that matches gets the step's recorded result as a ``tool`` message; any
other gets ``{"error": ...}``, the chain is failed, and the loop goes on until the model
answers (a turn without a call) or ``max_rounds`` is spent.

Metrics, per case and model (:data:`METRICS` says which apply to which scenario):

- ``tool_call_valid``: the case made a call, and every call is one closed block of one JSON
  object ``{name, arguments}`` naming the expected step's tool, whose arguments validate
  against that tool's registry schema (:func:`kdtrain.data.validate.check_call`);
- ``args_match`` (BFCL's AST checker, in spirit): the case made a call, and every call names the
  expected tool, passes its required parameters and no unknown ones, with values of the schema's
  types, equal to the reference's: strings after :func:`normalise` (NFKC, case, whitespace),
  numbers as numbers, an omitted parameter only where the schema's ``default`` is the reference's;
- ``chain_complete``: the model answered, every expected step was matched in order with no call
  refused on the way, and every result the reference itself uses is used. A result is used when
  one of its values (:func:`result_values`) that neither the prompt nor the step's own arguments
  already state appears in a later call's arguments or in the final answer (:func:`contains`);
- ``code_valid``: exactly one call, to ``run_code``, whose program parses and calls at least one
  registry tool, only registry tools, by name with keyword arguments only (``from_`` for
  ``from``), that the schema knows, all required ones present, literal values valid;
- ``halt_ok``: the final turn is an answer (no call) closed by the EOS, not empty, and at most
  ``(1 + halt_tolerance)`` x the reference answer's length in the model's own tokenizer;
- ``answer_correct``: the final turn is an answer whose visible part (after ``</think>``)
  contains every fact of the case.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kdcontracts.models.tokens import Message
from kdtrain.data.calls import CODE_TOOL, OPEN, Call, code_calls, read_calls
from kdtrain.data.scenario_cases import (SCENARIOS, ScenarioCase, ScenarioCases, contains, normalise, result_values,
                                         scalars, visible)
from kdtrain.data.validate import check_call

METRICS: dict[str, tuple[str, ...]] = {
    "tool_chain": ("tool_call_valid", "args_match", "chain_complete", "answer_correct"),
    "code_mode": ("tool_call_valid", "code_valid", "chain_complete"),
    "long_reasoning": ("halt_ok", "answer_correct"),
    "plain": ("halt_ok", "answer_correct"),
}
_ABSENT = object()  # a parameter neither given nor defaulted


def _type_ok(value: Any, schema: dict) -> bool:
    kind = schema.get("type")
    if kind is None and "enum" in schema:
        return any(type(value) is type(option) for option in schema["enum"])
    if isinstance(value, bool):
        return kind == "boolean"
    return {"string": isinstance(value, str), "number": isinstance(value, (int, float)),
            "integer": isinstance(value, int) or (isinstance(value, float) and value.is_integer()),
            "array": isinstance(value, list), "object": isinstance(value, dict)}.get(kind, kind is None)


def same_value(found: Any, expected: Any) -> bool:
    """BFCL-style equality: strings after :func:`normalise`, numbers as numbers, containers item by item."""
    if isinstance(found, bool) or isinstance(expected, bool):
        return found is expected
    if isinstance(found, (int, float)) and isinstance(expected, (int, float)):
        return abs(found - expected) <= 1e-9 * max(1.0, abs(expected))
    if isinstance(found, str) and isinstance(expected, str):
        return normalise(found) == normalise(expected)
    if isinstance(found, list) and isinstance(expected, list):
        return len(found) == len(expected) and all(map(same_value, found, expected))
    if isinstance(found, dict) and isinstance(expected, dict):
        return found.keys() == expected.keys() and all(same_value(found[k], expected[k]) for k in found)
    return found is expected


def args_match(arguments: dict, expected: dict, schema: dict) -> bool:
    """Whether a call's ``arguments`` are the ``expected`` ones under the tool's JSON ``schema``."""
    properties, required = schema.get("properties", {}), schema.get("required", [])
    if any(k not in properties for k in arguments) or any(k not in arguments for k in required):
        return False
    if not all(_type_ok(v, properties[k]) for k, v in arguments.items()):
        return False
    for key in set(arguments) | set(expected):
        default = properties[key].get("default", _ABSENT) if key in properties else _ABSENT
        found, wanted = arguments.get(key, default), expected.get(key, default)
        if (found is _ABSENT) != (wanted is _ABSENT) or (found is not _ABSENT and not same_value(found, wanted)):
            return False
    return True


def code_problems(call: Call, inner: Sequence[Call], registry) -> list[str]:
    """What keeps a call from being a valid ``run_code`` orchestration (nothing: an empty list)."""
    if call.tool != CODE_TOOL or call.problem is not None or not isinstance(call.arguments.get("code"), str):
        return [f"{call.where}: expected a run_code call with a code string, found {call.tool or 'an unreadable call'}"]
    problems = [f.detail for c in inner for f in check_call(c, registry)]
    problems += [f"{c.where}: {c.tool}: expected keyword arguments the schema can check, found **" for c in inner if "**" in c.opaque]
    if not any(registry.tool(c.tool) is not None for c in inner):
        problems.append(f"{call.where}: expected a program calling registry tools, found none called")
    return problems


def _tools_called(code: str, registry) -> set[str]:
    return {c.tool for c in code_calls(code, set(registry.names), "code") if registry.tool(c.tool) is not None}


def _informative(case: ScenarioCase, index: int) -> list[str]:
    """The values of step ``index``'s result that the prompt and the step's own arguments do not already state."""
    step = case.steps[index]
    known = " ".join([m.content for m in case.messages] + scalars(step.arguments))
    return [v for v in result_values(step.name, step.result) if not contains(known, v)]


def result_used(case: ScenarioCase, index: int, later_arguments: Sequence[dict], answer: str) -> bool:
    """Whether step ``index``'s result shows in a later call's arguments or in the final answer."""
    later = " ".join(s for a in later_arguments for s in scalars(a))
    return any(contains(later, v) or contains(answer, v) for v in _informative(case, index))


def _reference_uses(case: ScenarioCase) -> list[bool]:
    return [result_used(case, i, [s.arguments for s in case.steps[i + 1:]], visible(case.answer)) for i in range(len(case.steps))]


@dataclass
class Judged:
    """One call a model made, against the step it was expected to be."""

    tool: str | None
    arguments: dict
    step: int | None  # the expected step it was compared with (None: no step was left)
    valid: bool
    args_match: bool  # for a run_code step: its program calls the reference's tools
    code_problems: list[str]  # what keeps it from being a valid run_code orchestration
    matched: bool  # its recorded result was fed back
    problem: str | None


@dataclass
class Run:
    """One case's agent loop for one model."""

    case: ScenarioCase
    conversation: list[Message]
    turns: list = field(default_factory=list)
    calls: list[Judged] = field(default_factory=list)
    done: bool = False

    @property
    def next_step(self) -> int:
        return sum(c.matched for c in self.calls)


def _judge(run: Run, call: Call, inner: list[Call], registry) -> Judged:
    index = run.next_step if run.next_step < len(run.case.steps) else None
    step = run.case.steps[index] if index is not None else None
    findings = [f.detail for f in check_call(call, registry)]
    if step is None:
        findings.append(f"{call.where}: {call.tool}: expected no further call (every step is done)")
    elif call.tool != step.name:
        findings.append(f"{call.where}: expected a call of the tool the task needs next, found {call.tool}")
    program = code_problems(call, inner, registry)
    if step is not None and step.name == CODE_TOOL:  # another program than the reference's will do, if it calls its tools
        needed = _tools_called(step.arguments["code"], registry)
        matched = not program and needed <= _tools_called(call.arguments["code"], registry)
        refusals = findings + program + [f"{call.where}: {call.tool}: expected a program calling the tools {sorted(needed)}"]
    else:
        matched = (step is not None and call.problem is None and call.tool == step.name
                   and args_match(call.arguments, step.arguments, registry.tool(step.name).parameters))
        refusals = findings + [f"{call.where}: {call.tool}: expected the arguments the task needs"]
    return Judged(call.tool, call.arguments, index, not findings, matched, program, matched, None if matched else refusals[0])


def advance(run: Run, turn, registry) -> None:
    """Take one model turn: answer (the case ends) or calls (each judged and answered by a tool message)."""
    run.turns.append(turn)
    run.conversation.append(Message("assistant", turn.text))
    groups: list[tuple[Call, list[Call]]] = []
    for call in read_calls(len(run.conversation) - 1, turn.text, set(registry.names)):
        if OPEN in call.where:
            groups.append((call, []))
        else:
            groups[-1][1].append(call)  # run_code's inner calls follow their block
    if not groups:
        run.done = True
        return
    for call, inner in groups:
        judged = _judge(run, call, inner, registry)
        run.calls.append(judged)
        reply = run.case.steps[judged.step].result if judged.matched else json.dumps({"error": judged.problem}, ensure_ascii=False)
        run.conversation.append(Message("tool", reply))


def case_metrics(run: Run, reference_tokens: int, halt_tolerance: float) -> dict[str, bool]:
    """The scenario's metrics of one finished (or stopped) run."""
    case, calls = run.case, run.calls
    final = run.turns[-1]
    answer = visible(final.text) if run.done else ""
    later = [[c.arguments for c in calls[i + 1:]] for i in range(len(calls))]
    used = {c.step: result_used(case, c.step, later[i], answer) for i, c in enumerate(calls) if c.matched}
    found = {
        "tool_call_valid": bool(calls) and all(c.valid for c in calls),
        "args_match": bool(calls) and all(c.args_match for c in calls),
        "chain_complete": run.done and all(c.matched for c in calls) and len(calls) == len(case.steps)
                          and all(used.get(i, False) for i, needed in enumerate(_reference_uses(case)) if needed),
        "code_valid": len(calls) == 1 and calls[0].tool == CODE_TOOL and not calls[0].code_problems,
        "halt_ok": run.done and final.stopped and final.tokens > 0 and bool(answer.strip())
                   and final.tokens <= (1 + halt_tolerance) * reference_tokens,
        "answer_correct": run.done and all(contains(answer, fact) for fact in case.facts),
    }
    return {m: found[m] for m in METRICS[case.scenario]}


def reference_tokens(generator, text: str) -> int:
    """The reference answer's length in the generator's own tokenizer (what its ``Turn.tokens`` counts)."""
    return len(generator.tokenizer.encode(text).ids)


def run_model(generator, cases: Sequence[ScenarioCase], registry, max_new_tokens: int, max_rounds: int,
              progress: bool = True) -> tuple[list[Run], list[dict]]:
    """Every case's loop for one model, all unfinished cases batched per round; the runs and each round's timing."""
    from tqdm import tqdm

    runs = [Run(c, list(c.messages)) for c in cases]
    rounds = []
    with tqdm(total=len(runs), desc=f"scenarios {generator.name}", unit="case", disable=not progress) as bar:
        for _ in range(max_rounds):
            active = [r for r in runs if not r.done]
            if not active:
                break
            start = time.perf_counter()
            turns = generator.turns([r.conversation for r in active], max_new_tokens)
            rounds.append({"cases": len(active), "seconds": round(time.perf_counter() - start, 3)})
            for run, turn in zip(active, turns):
                advance(run, turn, registry)
                bar.update(run.done)
        bar.update(sum(not r.done for r in runs))
    return runs, rounds


def record(run: Run, model: str, reference: int, halt_tolerance: float) -> dict:
    """One case's outcome for one model, as ``scenarios.json`` keeps it."""
    final = run.turns[-1]
    return {"id": run.case.id, "scenario": run.case.scenario, "model": model, "turns": [t.text for t in run.turns],
            "metrics": case_metrics(run, reference, halt_tolerance),
            "final": {"tokens": final.tokens, "stopped": final.stopped, "answered": run.done, "reference_tokens": reference},
            "problems": [c.problem for c in run.calls if c.problem]}


def rates_from_cases(cases: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """scenario -> model -> metric -> the fraction of the cases' records where it holds."""
    outcomes: dict[str, dict[str, dict[str, list[bool]]]] = {}
    for r in cases:
        by_metric = outcomes.setdefault(r["scenario"], {}).setdefault(r["model"], {})
        for metric, ok in r["metrics"].items():
            by_metric.setdefault(metric, []).append(bool(ok))
    order = [s for s in SCENARIOS if s in outcomes] + sorted(set(outcomes) - set(SCENARIOS))
    return {s: {model: {m: round(sum(v) / len(v), 6) for m, v in by_metric.items()} for model, by_metric in outcomes[s].items()}
            for s in order}


def evaluate_scenarios(cases: ScenarioCases, generators: dict, registry, max_new_tokens: int, max_rounds: int = 4,
                       progress: bool = True, halt_tolerance: float = 0.5) -> dict:
    """Every model on every case: ``{"models", "scenarios" (rates), "cases" (records), "settings", "timing"}``.

    A generator has ``name``, ``turns(conversations, max_new_tokens)`` and the ``tokenizer`` its
    turns are counted in (the generators of :mod:`kdtrain.runtime.generate`).
    """
    records, timing = [], {}
    for model, generator in generators.items():
        start = time.perf_counter()
        runs, rounds = run_model(generator, cases.cases, registry, max_new_tokens, max_rounds, progress)
        records += [record(r, model, reference_tokens(generator, r.case.answer), halt_tolerance) for r in runs]
        timing[model] = {"seconds": round(time.perf_counter() - start, 3), "rounds": rounds}
    settings = {"max_new_tokens": max_new_tokens, "max_rounds": max_rounds, "halt_tolerance": halt_tolerance,
                "cases": len(cases.cases), "cases_sha256": cases.info().sha256, **cases.settings,
                "metrics": {s: list(m) for s, m in METRICS.items()}}
    return {"models": list(generators), "scenarios": rates_from_cases(records), "cases": records, "settings": settings,
            "timing": timing}


def scenario_table(results: dict) -> str:
    """The rates as fixed-width text: one row per scenario and metric, one column per model."""
    models = results["models"]
    rows = [(s, m, [by_model.get(model, {}).get(m) for model in models])
            for s, by_model in results["scenarios"].items() for m in METRICS.get(s, sorted({k for v in by_model.values() for k in v}))]
    width = max([len("scenario")] + [len(s) for s, _, _ in rows])
    metric_width = max([len("metric")] + [len(m) for _, m, _ in rows])
    columns = [max(len(model), 6) for model in models]
    lines = [f"{'scenario':<{width}}  {'metric':<{metric_width}}  " + "  ".join(f"{m:>{w}}" for m, w in zip(models, columns))]
    for scenario, metric, values in rows:
        cells = "  ".join(f"{'-' if v is None else f'{v:.2f}':>{w}}" for v, w in zip(values, columns))
        lines.append(f"{scenario:<{width}}  {metric:<{metric_width}}  {cells}")
    return "\n".join(lines)


def plot_scenarios(results: dict, path: Path | str) -> Path:
    """One group of bars per scenario and metric, one bar per model (teacher, student, baseline)."""
    import numpy as np

    from kdtrain.plots import pyplot, save_png

    groups = [(s, m) for s, by_model in results["scenarios"].items() for m in METRICS.get(s, ())]
    models = results["models"]
    fig, ax = pyplot().subplots(figsize=(max(8, 0.9 * len(groups) + 2), 4.5))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        values = [results["scenarios"][s].get(model, {}).get(m, 0.0) for s, m in groups]
        ax.bar(np.arange(len(groups)) + i * width, values, width, label=model)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{s}\n{m}" for s, m in groups], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate over cases")
    ax.set_title(f"Scenario evaluations ({results['settings']['cases']} cases, max {results['settings']['max_new_tokens']} new tokens per turn)")
    ax.legend(fontsize=8)
    return save_png(fig, Path(path))
