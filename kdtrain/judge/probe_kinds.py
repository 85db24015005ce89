"""How each kind of probe is drawn.

Every function takes a seeded RNG and returns a probe whose outputs carry what its objective
check (:mod:`kdtrain.judge.checks`) *found*, or None when the check does not confirm what the
kind needs (a mutant that passes every test, a corruption that still validates): the builder
then draws again. Positions are shuffled, so the better or longer output is as often first as
second.

- ``code``: a correct function against one that fails to compile or fails a unit test;
- ``tool_call``: a call that validates and matches the request against invalid JSON, the
  wrong tool, a missing required argument or a wrong value;
- ``exact``: an arithmetic or capital-city answer against a wrong one;
- ``length``: two correct answers, one saying the same at length (a worked sum, a restated
  fact, a commented function);
- graded, from ``code`` (the correct program and its mutants: the fraction of tests passed) or
  ``tool_call`` (a call with 0 to 3 of its 3 required arguments).
"""

from __future__ import annotations

import random

from kdtrain.data.templates import AIRPORTS, CITIES, FIRST, LAST, USD_PER, system, tool_call
from kdtrain.judge.checks import CAPITALS, measure
from kdtrain.judge.code_tasks import DrawnTask, draw_task
from kdtrain.judge.probes import GradedProbe, Output, PairProbe

TOOLS = ("get_weather", "search_flights", "convert_currency", "send_email", "lookup_customer", "fetch_document")
GRADED_TOOLS = ("convert_currency", "send_email")  # three required arguments each: four levels
_SUBJECTS = ("Invoice", "Meeting notes", "Travel plans", "Quarterly report", "Welcome")
_BODIES = ("See you on Monday.", "The report is attached.", "Thanks for your help.", "Call me when you land.")


def _outputs(check: dict, texts: list[str], registry) -> list[Output]:
    return [Output(text=t, metric=m, evidence=e) for t, (m, e) in zip(texts, measure(check, texts, registry))]


def _pair(rng: random.Random, probe_id: str, kind: str, task: str, check: dict, good: Output, other: Output) -> PairProbe:
    swap = rng.random() < 0.5
    outputs = (other, good) if swap else (good, other)
    better = None if kind == "length" else int(swap)
    longer = 0 if len(outputs[0].text) > len(outputs[1].text) else 1
    return PairProbe(id=probe_id, kind=kind, task=task, check=check, outputs=outputs, better=better, longer=longer)


def _unit_tests(drawn: DrawnTask) -> dict:
    return {"kind": "unit_tests", "function": drawn.task.function, "tests": [[list(a), e] for a, e in drawn.tests]}


def code_pair(rng: random.Random, probe_id: str, registry) -> PairProbe | None:
    drawn = draw_task(rng)
    check = _unit_tests(drawn)
    good, bad = _outputs(check, [drawn.correct, rng.choice(drawn.mutants)], registry)
    if good.metric != 1.0 or bad.metric == 1.0:
        return None
    return _pair(rng, probe_id, "code", drawn.prompt, check, good, bad)


def code_graded(rng: random.Random, probe_id: str, registry) -> GradedProbe | None:
    drawn = draw_task(rng)
    check = _unit_tests(drawn)
    outputs = _outputs(check, [drawn.correct, *drawn.mutants], registry)
    if len({o.metric for o in outputs}) < 2:  # nothing to rank
        return None
    rng.shuffle(outputs)
    return GradedProbe(id=probe_id, kind="graded", source="code", task=drawn.prompt, check=check, outputs=tuple(outputs))


def _email(rng: random.Random) -> tuple[str, str]:
    first, last = rng.choice([n for n in FIRST if n.isascii()]), rng.choice([n for n in LAST if n.isascii()])
    return f"{first} {last}", f"{first.lower()}.{last.lower()}@example.com"


def tool_request(rng: random.Random, name: str) -> tuple[str, dict]:
    """A user request for tool ``name`` and the arguments that answer it exactly."""
    if name == "get_weather":
        city, unit = rng.choice(CITIES), rng.choice(("celsius", "fahrenheit", None))
        return f"What's the weather in {city}?" + (f" Answer in {unit}." if unit else ""), {"city": city} | ({"unit": unit} if unit else {})
    if name == "search_flights":
        to, sort, n = rng.choice(sorted(AIRPORTS)), rng.choice(("price", "duration")), rng.randint(1, 5)
        return (f"Show me up to {n} flights to {AIRPORTS[to]} ({to}), {'cheapest' if sort == 'price' else 'fastest'} first.",
                {"to": to, "sort": sort, "max_results": n})
    if name == "convert_currency":
        source, target = rng.sample(sorted(USD_PER), 2)
        amount = float(rng.choice((12.5, 40, 99.99, 250, 1200, 18000)))
        return f"Convert {amount:g} {source} to {target}.", {"amount": amount, "from": source, "to": target}
    if name == "send_email":
        person, address = _email(rng)
        subject, body = rng.choice(_SUBJECTS), rng.choice(_BODIES)
        return f'Email {person} at {address} with the subject "{subject}" saying: {body}', {"to": address, "subject": subject, "body": body}
    if name == "lookup_customer":
        customer = f"C-{rng.randint(0, 999999):06d}"
        return f"Look up customer {customer}.", {"customer_id": customer}
    document = f"DOC-{rng.randint(0, 9999):04d}"
    return f"Fetch document {document}.", {"document_id": document}


def _tool_task(registry, name: str, request: str) -> str:
    """The request and the signature of the tool it needs (a call of any other tool is wrong)."""
    signature = system(registry, (name,)).content.split("\n", 1)[1]
    return f"Tool:\n{signature}\nRequest: {request}\nRespond with one tool call."


def _broken_call(rng: random.Random, name: str, args: dict, registry) -> str:
    how = rng.choice(("invalid_json", "wrong_tool", "missing_required", "wrong_value"))
    if how == "invalid_json":
        return tool_call(name, args).replace("}}\n", "}\n", 1)
    if how == "wrong_tool":
        return tool_call(rng.choice([t for t in TOOLS if t != name]), args)
    if how == "missing_required":
        missing = rng.choice(registry.tool(name).parameters["required"])
        return tool_call(name, {k: v for k, v in args.items() if k != missing})
    return tool_call(name, tool_request(rng, name)[1])  # another request's arguments: valid, not what was asked


def tool_pair(rng: random.Random, probe_id: str, registry) -> PairProbe | None:
    name = rng.choice(TOOLS)
    request, args = tool_request(rng, name)
    check = {"kind": "tool_call", "name": name, "arguments": args}
    good, bad = _outputs(check, [tool_call(name, args), _broken_call(rng, name, args, registry)], registry)
    if good.metric != 1.0 or bad.metric != 0.0:
        return None
    return _pair(rng, probe_id, "tool_call", _tool_task(registry, name, request), check, good, bad)


def tool_graded(rng: random.Random, probe_id: str, registry) -> GradedProbe | None:
    name = rng.choice(GRADED_TOOLS)
    request, args = tool_request(rng, name)
    required = list(registry.tool(name).parameters["required"])
    kept = [set(rng.sample(required, keep)) for keep in range(len(required) + 1)]  # 0, 1, 2, 3 of the required arguments
    texts = [tool_call(name, {k: v for k, v in args.items() if k in chosen}) for chosen in kept]
    check = {"kind": "tool_arguments", "name": name, "arguments": args}
    outputs = _outputs(check, texts, registry)
    rng.shuffle(outputs)
    return GradedProbe(id=probe_id, kind="graded", source="tool_call", task=_tool_task(registry, name, request), check=check,
                       outputs=tuple(outputs))


def _arithmetic(rng: random.Random) -> tuple[str, str, str, int]:
    """(question, short answer, the same worked at length, the result): a sum, a difference or a product."""
    op = rng.choice("+-×")
    if op == "×":
        a, b = rng.randint(12, 99), rng.randint(12, 49)
        tens, ones, result = b // 10 * 10, b % 10, a * b
        worked = (f"Split {b} into {tens} and {ones}: {a} × {tens} = {a * tens} and {a} × {ones} = {a * ones}. "
                  f"Adding the two parts, {a * tens} + {a * ones} = {result}. So {a} × {b} = {result}.")
    else:
        a, b = sorted((rng.randint(11, 999), rng.randint(11, 999)), reverse=op == "-")
        result = a + b if op == "+" else a - b
        how = f"adding {b} to {a}" if op == "+" else f"subtracting {b} from {a}"
        worked = (f"Working it out by {how}, one place value at a time, the result is {result}. Checking: {result} "
                  f"{'-' if op == '+' else '+'} {b} = {a}, as it should be. So {a} {op} {b} = {result}.")
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}.", worked, result


def exact_pair(rng: random.Random, probe_id: str, registry) -> PairProbe | None:
    if rng.random() < 0.5:
        question, short, _, result = _arithmetic(rng)
        wrong = short.replace(f"= {result}.", f"= {result + rng.choice((-10, -2, -1, 1, 2, 10, 100))}.")
        expected = str(result)
    else:
        (country, expected), (_, other) = rng.sample(CAPITALS, 2)
        question, short, wrong = f"What is the capital of {country}?", f"{expected}.", f"{other}."
    check = {"kind": "exact", "expected": expected}
    good, bad = _outputs(check, [short, wrong], registry)
    if good.metric != 1.0 or bad.metric != 0.0:
        return None
    return _pair(rng, probe_id, "exact", question, check, good, bad)


def length_pair(rng: random.Random, probe_id: str, registry) -> PairProbe | None:
    source = rng.choice(("arithmetic", "capital", "code"))
    if source == "code":
        drawn = draw_task(rng)
        task, check, texts = drawn.prompt, _unit_tests(drawn), [drawn.correct, drawn.verbose]
    elif source == "arithmetic":
        task, brief, worked, result = _arithmetic(rng)
        check, texts = {"kind": "exact", "expected": str(result)}, [brief, worked]
    else:
        country, capital = rng.choice(CAPITALS)
        task, check = f"What is the capital of {country}?", {"kind": "exact", "expected": capital}
        texts = [f"{capital}.", f"The capital of {country} is {capital}. {capital} is where the government of {country} sits, "
                                f"so the answer to the question is {capital}."]
    short, long = _outputs(check, texts, registry)
    if short.metric != 1.0 or long.metric != 1.0 or len(long.text) <= len(short.text):
        return None
    return _pair(rng, probe_id, "length", task, check, short, long)


PAIR_DRAWS = {"code": code_pair, "tool_call": tool_pair, "exact": exact_pair, "length": length_pair}
GRADED_DRAWS = {"code": code_graded, "tool_call": tool_graded}
