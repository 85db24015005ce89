"""The scenario evaluations (kdtrain.gates.scenarios) with scripted generators: a replay of the
references scores 1.0 everywhere; each planted fault (broken JSON, wrong types, unknown
parameters, a bad program, an answer that does not stop, an unused result) fails its metric and
only where it should; the per-case records recompute the rates. The real teacher, distilled
student and baseline run in the gates stage of every reference build (tests/test_gates.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from kdcontracts.families import load
from kdtrain.data.corpus import build_reference_corpus
from kdtrain.data.scenario_cases import build_scenario_cases
from kdtrain.gates.scenarios import METRICS, args_match, evaluate_scenarios, plot_scenarios, rates_from_cases, scenario_table
from kdtrain.runtime.generate import Turn

ROOT = Path(__file__).parents[1]
REGISTRY = load(ROOT / "contracts" / "tool_registry.json")


class Words:
    """A tokenizer counting words: enough for the scripted turns' lengths."""

    def encode(self, text):
        return SimpleNamespace(ids=text.split())


class Scripted:
    """Replays each case's reference turns; ``edit(case, n, text) -> text | Turn`` plants a fault in turn ``n``."""

    def __init__(self, cases, edit=lambda case, n, text: text, name="oracle"):
        self.name, self.tokenizer, self.edit = name, Words(), edit
        self.by_prompt = {(c.messages[0].content, c.messages[1].content): c for c in cases.cases}
        self.seen: list[list] = []

    def turns(self, conversations, max_new_tokens):
        self.seen += [list(m) for m in conversations]
        found = []
        for messages in conversations:
            case = self.by_prompt[(messages[0].content, messages[1].content)]
            n = sum(m.role == "assistant" for m in messages)
            reference = [m.content for m in case.reference if m.role == "assistant"]
            text = self.edit(case, n, reference[min(n, len(reference) - 1)])
            found.append(text if isinstance(text, Turn) else Turn(text, len(text.split()), True))
        return found


@pytest.fixture(scope="module")
def cases():
    return build_scenario_cases(REGISTRY, build_reference_corpus(REGISTRY, 2, 1234), 10, 20261130)


def _evaluate(cases, *generators, **settings):
    return evaluate_scenarios(cases, {g.name: g for g in generators}, REGISTRY, 64, progress=False, **settings)


def _outcomes(results, model, scenario, metric) -> list[bool]:
    return [r["metrics"][metric] for r in results["cases"] if r["model"] == model and r["scenario"] == scenario]


def test_a_replay_of_the_references_scores_one_everywhere(cases, tmp_path):
    results = _evaluate(cases, Scripted(cases))
    assert results["models"] == ["oracle"]
    assert results["scenarios"] == {s: {"oracle": {m: 1.0 for m in metrics}} for s, metrics in METRICS.items()}
    assert all(set(r["metrics"]) == set(METRICS[r["scenario"]]) and not r["problems"] for r in results["cases"])
    again = json.loads(json.dumps(results))  # plain JSON
    assert rates_from_cases(again["cases"]) == results["scenarios"]
    table = scenario_table(results)
    assert "tool_chain" in table and "chain_complete" in table and "oracle" in table and "1.00" in table
    png = plot_scenarios(results, tmp_path / "scenarios.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_rates_are_recomputed_from_the_records(cases):
    wrong = Scripted(cases, lambda case, n, text: "Unknown." if case.scenario == "plain" and int(case.id[-1]) % 2 else text, "half")
    results = _evaluate(cases, Scripted(cases), wrong)
    assert results["scenarios"]["plain"] == {"oracle": {"halt_ok": 1.0, "answer_correct": 1.0}, "half": {"halt_ok": 1.0, "answer_correct": 0.5}}
    flipped = [dict(r, metrics=dict(r["metrics"], halt_ok=False)) if r["scenario"] == "plain" else r for r in results["cases"]]
    assert rates_from_cases(flipped)["plain"]["oracle"]["halt_ok"] == 0.0


def test_invalid_tool_json_fails_validity_and_the_chain(cases):
    def broken(case, n, text):
        return text.replace("}}\n</tool_call>", "}\n</tool_call>") if case.scenario == "tool_chain" and n == 0 else text

    generator = Scripted(cases, broken, "broken")
    results = _evaluate(cases, generator)
    for metric in ("tool_call_valid", "chain_complete", "args_match"):
        assert _outcomes(results, "broken", "tool_chain", metric) == [False] * 10
    assert results["scenarios"]["code_mode"]["broken"] == {m: 1.0 for m in METRICS["code_mode"]}
    refused = [m[3].content for m in generator.seen if len(m) > 3 and m[1].content == cases.cases[0].messages[1].content]
    assert refused and json.loads(refused[0])["error"].startswith("messages[2] <tool_call> #1: ")
    record = next(r for r in results["cases"] if r["id"] == cases.cases[0].id)
    assert len(record["turns"]) >= 2 and "expected a complete JSON object" in record["problems"][0]  # the loop went on


def _edit_arguments(change):
    def edit(case, n, text):
        if case.scenario != "tool_chain" or n != 0:
            return text
        call = json.loads(text[text.index("{"):text.rindex("}") + 1])
        change(call["arguments"])
        return "<tool_call>\n" + json.dumps(call) + "\n</tool_call>"
    return edit


@pytest.mark.parametrize("change, valid", [
    (lambda a: a.update({k: str(v) for k, v in a.items() if isinstance(v, int)} or {"to": 42}), False),  # wrong types
    (lambda a: a.update(note="please"), False),  # an unknown parameter
    (lambda a: a.update({k: v + "x" for k, v in a.items() if k in ("city", "customer_id", "to")}), None),  # wrong values
])
def test_wrong_arguments_fail_args_match(cases, change, valid):
    results = _evaluate(cases, Scripted(cases, _edit_arguments(change), "wrong"))
    assert _outcomes(results, "wrong", "tool_chain", "args_match") == [False] * 10
    assert _outcomes(results, "wrong", "tool_chain", "chain_complete") == [False] * 10
    if valid is False:
        assert _outcomes(results, "wrong", "tool_chain", "tool_call_valid") == [False] * 10


def test_bfcl_normalisation_accepts_case_whitespace_and_number_forms(cases):
    weather, currency = REGISTRY.tool("get_weather").parameters, REGISTRY.tool("convert_currency").parameters
    assert args_match({"city": " paris ", "unit": "celsius"}, {"city": "Paris", "unit": "celsius"}, weather)
    assert args_match({"city": "ＰＡＲＩＳ"}, {"city": "Paris"}, weather)  # NFKC: full-width letters
    assert args_match(json.loads('{"amount": 12.50, "from": "EUR", "to": "JPY"}'), {"amount": 12.5, "from": "EUR", "to": "JPY"}, currency)
    assert args_match({"amount": 40, "from": "EUR", "to": "JPY"}, {"amount": 40.0, "from": "EUR", "to": "JPY"}, currency)
    assert not args_match({"amount": "12.5", "from": "EUR", "to": "JPY"}, {"amount": 12.5, "from": "EUR", "to": "JPY"}, currency)
    assert not args_match({"city": "Paris"}, {"city": "Paris", "unit": "celsius"}, weather)  # the schema declares no default
    assert not args_match({"amount": 12.5, "to": "JPY"}, {"amount": 12.5, "from": "EUR", "to": "JPY"}, currency)

    def lower_case(case, n, text):  # the whole loop: lower-case strings (not the codes with patterns) still complete the chain
        if "<tool_call>" not in text:
            return text.replace("12.5 ", "12.50 ")
        call = json.loads(text[text.index("{"):text.rindex("}") + 1])
        call["arguments"] = {k: v.lower() if isinstance(v, str) and k not in ("to", "from", "customer_id") else v for k, v in call["arguments"].items()}
        return "<tool_call>\n" + json.dumps(call, ensure_ascii=False) + "\n</tool_call>"

    results = _evaluate(cases, Scripted(cases, lower_case, "lower"))
    assert results["scenarios"]["tool_chain"]["lower"] == {m: 1.0 for m in METRICS["tool_chain"]}


def _program(code: str):
    def edit(case, n, text):
        if case.scenario != "code_mode" or n != 0:
            return text
        return "<tool_call>\n" + json.dumps({"name": "run_code", "arguments": {"code": code}}) + "\n</tool_call>"
    return edit


@pytest.mark.parametrize("code", [
    'w = get_forecast(city="Paris")\nprint(w)\n',  # not a registry tool
    'w = get_weather("Paris")\nprint(w)\n',  # a positional argument
    'w = get_weather(town="Paris")\nprint(w)\n',  # a keyword the schema does not know
    'r = convert_currency(amount=10, to="JPY")\nprint(r)\n',  # a required argument missing
    'print("no tools"\n',  # does not parse
    'print("no tools")\n',  # calls no tool
])
def test_a_bad_program_fails_code_valid(cases, code):
    results = _evaluate(cases, Scripted(cases, _program(code), "coder"))
    assert _outcomes(results, "coder", "code_mode", "code_valid") == [False] * 10
    assert _outcomes(results, "coder", "code_mode", "chain_complete") == [False] * 10


def test_a_good_program_other_than_the_reference_passes(cases):
    def loop(case, n, text):
        if case.scenario != "code_mode" or n != 0 or "get_weather" not in text:
            return text
        cities = [c.strip() for c in case.messages[1].content.split("Which of ")[1].split(" is warmest")[0].split(",")]
        code = f"best = None\nfor c in {cities!r}:\n    w = get_weather(city=c)\n    best = w if best is None or w['temperature'] > best['temperature'] else best\nprint(best)\n"
        return "<tool_call>\n" + json.dumps({"name": "run_code", "arguments": {"code": code}}) + "\n</tool_call>"

    results = _evaluate(cases, Scripted(cases, loop, "looper"))
    assert results["scenarios"]["code_mode"]["looper"] == {m: 1.0 for m in METRICS["code_mode"]}


@pytest.mark.parametrize("turn", [
    lambda text: Turn(text + " and so on" * 40, len(text.split()) + 120, False),  # never stops
    lambda text: Turn(" ".join([text] * 3), 3 * len(text.split()), True),  # stops, far too late
    lambda text: Turn("", 0, True),  # stops at once
])
def test_an_answer_that_does_not_stop_in_time_fails_halt_ok(cases, turn):
    results = _evaluate(cases, Scripted(cases, lambda case, n, text: turn(text) if not case.steps else text, "talker"))
    for scenario in ("plain", "long_reasoning"):
        assert _outcomes(results, "talker", scenario, "halt_ok") == [False] * 10
    assert results["scenarios"]["tool_chain"]["talker"]["chain_complete"] == 1.0


def test_halt_tolerance_is_relative_to_the_reference_length(cases):
    longer = Scripted(cases, lambda case, n, text: Turn(text, round(len(text.split()) * 1.4), True) if not case.steps else text, "longer")
    assert _evaluate(cases, longer, halt_tolerance=0.5)["scenarios"]["long_reasoning"]["longer"]["halt_ok"] == 1.0
    assert _evaluate(cases, longer, halt_tolerance=0.2)["scenarios"]["long_reasoning"]["longer"]["halt_ok"] == 0.0


def test_a_result_never_used_breaks_the_chain(cases):
    results = _evaluate(cases, Scripted(cases, lambda case, n, text: "All done." if n == len(case.steps) and case.steps else text, "ignorer"))
    assert _outcomes(results, "ignorer", "tool_chain", "tool_call_valid") == [True] * 10
    assert _outcomes(results, "ignorer", "tool_chain", "args_match") == [True] * 10
    # The reference uses every result but send_email's confirmation; lookup_customer's shows in send_email's arguments.
    chains = [c for c in cases.cases if c.scenario == "tool_chain"]
    assert _outcomes(results, "ignorer", "tool_chain", "chain_complete") == [c.steps[0].name == "lookup_customer" for c in chains]
    assert _outcomes(results, "ignorer", "tool_chain", "answer_correct") == [False] * 10
    assert _outcomes(results, "ignorer", "code_mode", "chain_complete") == [False] * 10


def test_a_model_that_never_stops_calling_ends_at_max_rounds(cases):
    generator = Scripted(cases, lambda case, n, text: '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', "caller")
    results = evaluate_scenarios(cases, {"caller": generator}, REGISTRY, 16, max_rounds=3, progress=False)
    assert all(len(r["turns"]) == 3 and not r["final"]["answered"] for r in results["cases"])
    assert all(not any(r["metrics"].values()) for r in results["cases"] if r["scenario"] != "tool_chain")
    assert [len(rounds) for rounds in [results["timing"]["caller"]["rounds"]]] == [3]
