"""Templates of the reference corpus: one builder per scenario, everything drawn from a seeded RNG.

Tool calls are written as the runtime parses them (``<tool_call>`` + one JSON object +
``</tool_call>``), tool results as ``tool`` messages, reasoning as ``<think>…</think>``.
In code mode the model writes one ``run_code`` call whose Python calls the registry's tools
as functions with keyword arguments (``from_=`` for a field named like a Python keyword).
Names, emails and customer ids are synthetic (``example.com``).
"""

from __future__ import annotations

import json
import random
from typing import Callable

from kdcontracts.models.tokens import Message

REFERENCE_TOOLS = ("get_weather", "search_flights", "convert_currency", "lookup_customer", "send_email", "fetch_document", "run_code")

CITIES = ("Paris", "Oslo", "São Paulo", "Tokyo", "Nairobi", "Reykjavík", "Mumbai", "Toronto", "Lisbon", "Seoul", "Cairo", "Denver")
SKIES = ("clear", "overcast", "light rain", "snow showers", "fog", "partly cloudy")
AIRPORTS = {"FCO": "Rome", "NRT": "Tokyo", "JFK": "New York", "LHR": "London", "SYD": "Sydney", "GRU": "São Paulo", "CPT": "Cape Town", "YVR": "Vancouver"}
AIRLINES = ("AZ", "AF", "LH", "BA", "JL", "QF", "LA", "AC")
USD_PER = {"EUR": 1.08, "USD": 1.0, "JPY": 0.0067, "GBP": 1.27, "CHF": 1.12, "BRL": 0.2, "INR": 0.012, "CAD": 0.74}
FIRST = ("Ana", "Kofi", "Mei", "Lars", "Priya", "Tomás", "Aiko", "Omar", "Zoe", "Ivan")
LAST = ("Souza", "Mensah", "Chen", "Berg", "Iyer", "García", "Tanaka", "Haddad", "Novak", "Petrov")
CAPITALS = (("Portugal", "Lisbon"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Japan", "Tokyo"), ("Peru", "Lima"))
TOPICS = ("quarterly revenue", "data retention policy", "on-call handbook", "vendor contract", "incident postmortem")
SENTENCES = (
    "Revenue grew {n}% year over year, driven by the enterprise tier.",
    "The team closed {n} incidents, {m} of them within the response target.",
    "Customer data older than {n} months is deleted unless a legal hold applies.",
    "Support costs fell by {n}% after the self-service portal launched.",
    "The vendor guarantees {n}.{m}% availability, measured monthly.",
    "Section {n} defines escalation: page the secondary after {m} minutes.",
    "Backups are encrypted at rest and restored in a drill every {n} weeks.",
    "Headcount remained flat at {n} engineers across {m} teams.",
)


def tool_call(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def _signature(tool) -> str:
    props, required = tool.parameters["properties"], tool.parameters["required"]
    args = [f"{k}{'' if k in required else '?'}: {' | '.join(map(json.dumps, v['enum'])) if 'enum' in v else v.get('type', 'any')}"
            for k, v in props.items()]
    return f"- {tool.name}({', '.join(args)}): {tool.description}"


def system(registry, names: tuple[str, ...], code_mode: bool = False) -> Message:
    lines = ["You are a helpful assistant. You can call these tools:"] + [_signature(registry.tool(n)) for n in names]
    if code_mode:
        lines.append("Prefer run_code for several calls: inside it every tool is a Python function taking keyword arguments.")
    return Message("system", "\n".join(lines))


def _weather(rng: random.Random, city: str, unit: str) -> dict:
    celsius = round(rng.uniform(-8, 34), 1)
    value = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32, 1)
    return {"city": city, "temperature": value, "unit": unit, "sky": rng.choice(SKIES)}


def _degrees(w: dict) -> str:
    return f"{w['temperature']} °{'C' if w['unit'] == 'celsius' else 'F'}"


def _flights(rng: random.Random, to: str, n: int) -> list[dict]:
    found = [{"flight": f"{rng.choice(AIRLINES)} {rng.randint(100, 999)}", "price": round(rng.uniform(180, 1400), 2),
              "currency": "EUR", "duration_min": rng.randint(95, 900)} for _ in range(n)]
    return sorted(found, key=lambda f: f["price"])


def _convert(amount: float, source: str, target: str) -> float:
    return round(amount * USD_PER[source] / USD_PER[target], 2)


def _person(rng: random.Random) -> dict:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    return {"customer_id": f"C-{rng.randint(0, 999999):06d}", "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}@example.com", "plan": rng.choice(("free", "pro", "team")),
            "open_tickets": rng.randint(0, 4)}


def single_call(rng: random.Random, registry) -> list[Message]:
    kind = rng.choice(("weather", "flights", "currency"))
    think = rng.random() < 0.5
    if kind == "weather":
        city, unit = rng.choice(CITIES), rng.choice(("celsius", "fahrenheit", None))
        ask = rng.choice(("What's the weather in {c}?", "Is it cold in {c} right now?", "How warm is it in {c} today?"))
        args = {"city": city} | ({"unit": unit} if unit else {})
        w = _weather(rng, city, unit or "celsius")
        user = ask.format(c=city) + (f" Answer in {unit}." if unit else "")
        name, result, answer = "get_weather", w, f"It is {_degrees(w)} with {w['sky']} in {city}."
    elif kind == "flights":
        to = rng.choice(sorted(AIRPORTS))
        sort, n = rng.choice(("price", "duration")), rng.randint(1, 5)
        args = {"to": to, "sort": sort, "max_results": n}
        flights = sorted(_flights(rng, to, n), key=lambda f: f[sort if sort == "price" else "duration_min"])
        user = f"Show me up to {n} flights to {AIRPORTS[to]}, {'cheapest' if sort == 'price' else 'fastest'} first."
        best = flights[0]
        name, result, answer = "search_flights", flights, f"The best option is {best['flight']} at €{best['price']} ({best['duration_min']} min)."
    else:
        source, target = rng.sample(sorted(USD_PER), 2)
        amount = float(rng.choice((12.5, 40, 99.99, 250, 1200, 18000)))
        args = {"amount": amount, "from": source, "to": target}
        result = {"amount": _convert(amount, source, target), "currency": target}
        user = rng.choice(("Convert {a} {s} to {t}.", "How much is {a} {s} in {t}?")).format(a=amount, s=source, t=target)
        name, answer = "convert_currency", f"{amount} {source} is about {result['amount']} {target}."
    thought = f"<think>This needs {name}; I have every required argument.</think>" if think else ""
    return [system(registry, (name,)), Message("user", user), Message("assistant", thought + tool_call(name, args)),
            Message("tool", json.dumps(result, ensure_ascii=False)), Message("assistant", answer)]


def multi_step(rng: random.Random, registry) -> list[Message]:
    if rng.random() < 0.5:
        to, target = rng.choice(sorted(AIRPORTS)), rng.choice(("JPY", "USD", "GBP", "BRL"))
        flights = _flights(rng, to, 3)
        price = _convert(flights[0]["price"], "EUR", target)
        return [system(registry, ("search_flights", "convert_currency")),
                Message("user", f"Find the cheapest flight to {AIRPORTS[to]} and give me the price in {target}."),
                Message("assistant", tool_call("search_flights", {"to": to, "sort": "price", "max_results": 3})),
                Message("tool", json.dumps(flights, ensure_ascii=False)),
                Message("assistant", tool_call("convert_currency", {"amount": flights[0]["price"], "from": "EUR", "to": target})),
                Message("tool", json.dumps({"amount": price, "currency": target})),
                Message("assistant", f"<think>Both calls succeeded.</think>The cheapest flight, {flights[0]['flight']}, costs about {price} {target}.")]
    a, b = rng.sample(CITIES, 2)
    wa, wb = _weather(rng, a, "celsius"), _weather(rng, b, "celsius")
    warmer = a if wa["temperature"] >= wb["temperature"] else b
    return [system(registry, ("get_weather",)), Message("user", f"Is it warmer in {a} or in {b} right now?"),
            Message("assistant", tool_call("get_weather", {"city": a, "unit": "celsius"})), Message("tool", json.dumps(wa, ensure_ascii=False)),
            Message("assistant", tool_call("get_weather", {"city": b, "unit": "celsius"})), Message("tool", json.dumps(wb, ensure_ascii=False)),
            Message("assistant", f"{warmer} is warmer: {_degrees(wa)} in {a} against {_degrees(wb)} in {b}.")]


def code_mode(rng: random.Random, registry) -> list[Message]:
    if rng.random() < 0.5:
        cities = rng.sample(CITIES, 3)
        unit = rng.choice(("celsius", "fahrenheit"))
        code = "".join(f"w{i} = get_weather(city={json.dumps(c, ensure_ascii=False)}, unit=\"{unit}\")\n" for i, c in enumerate(cities))
        code += "warmest = max([w0, w1, w2], key=lambda w: w[\"temperature\"])\nprint(warmest[\"city\"], warmest[\"temperature\"])\n"
        found = max((_weather(rng, c, unit) for c in cities), key=lambda w: w["temperature"])
        user = f"Which of {', '.join(cities)} is warmest right now, in {unit}?"
        stdout, answer = f"{found['city']} {found['temperature']}\n", f"{found['city']} is the warmest at {_degrees(found)}."
    else:
        to, target = rng.choice(sorted(AIRPORTS)), rng.choice(("JPY", "USD", "CAD", "INR"))
        n = rng.randint(3, 8)
        code = (f"flights = search_flights(to=\"{to}\", sort=\"price\", max_results={n})\n"
                "cheapest = min(flights, key=lambda f: f[\"price\"])\n"
                f"converted = convert_currency(amount=cheapest[\"price\"], from_=\"EUR\", to=\"{target}\")\n"
                "print(cheapest[\"flight\"], converted[\"amount\"])\n")
        best = _flights(rng, to, n)[0]
        price = _convert(best["price"], "EUR", target)
        user = f"Look at up to {n} flights to {AIRPORTS[to]} and tell me the cheapest in {target}."
        stdout, answer = f"{best['flight']} {price}\n", f"The cheapest is {best['flight']} at about {price} {target}."
    names = ("get_weather", "search_flights", "convert_currency", "run_code")
    return [system(registry, names, code_mode=True), Message("user", user),
            Message("assistant", "<think>Several calls: one run_code keeps them out of the context.</think>" + tool_call("run_code", {"code": code})),
            Message("tool", json.dumps({"stdout": stdout, "exit_code": 0}, ensure_ascii=False)), Message("assistant", answer)]


def large_payload(rng: random.Random, registry) -> list[Message]:
    doc, topic = f"DOC-{rng.randint(0, 9999):04d}", rng.choice(TOPICS)
    sentences, size = [], rng.randint(3000, 5000)
    while sum(len(s) + 1 for s in sentences) < size:
        sentences.append(rng.choice(SENTENCES).format(n=rng.randint(2, 60), m=rng.randint(1, 9)))
    text = " ".join(sentences)
    max_chars = rng.choice((8000, 12000, 20000))
    return [system(registry, ("fetch_document",)), Message("user", f"Summarise document {doc} ({topic}) in one sentence."),
            Message("assistant", tool_call("fetch_document", {"document_id": doc, "max_chars": max_chars})),
            Message("tool", json.dumps({"document_id": doc, "title": topic.capitalize(), "text": text})),
            Message("assistant", f"The {topic} says, among other things: {sentences[0]}")]


def pii(rng: random.Random, registry) -> list[Message]:
    person = _person(rng)
    subject = rng.choice(("Your open tickets", "Plan renewal", "Follow-up on your request"))
    body = f"Hello {person['name'].split()[0]}, you have {person['open_tickets']} open ticket(s) on the {person['plan']} plan."
    return [system(registry, ("lookup_customer", "send_email")),
            Message("user", f"Email customer {person['customer_id']} a short note about their open tickets."),
            Message("assistant", tool_call("lookup_customer", {"customer_id": person["customer_id"]})),
            Message("tool", json.dumps(person, ensure_ascii=False)),
            Message("assistant", tool_call("send_email", {"to": person["email"], "subject": subject, "body": body})),
            Message("tool", json.dumps({"status": "sent", "message_id": f"m-{rng.getrandbits(32):08x}"})),
            Message("assistant", f"Done: I emailed {person['name']} about their {person['open_tickets']} open ticket(s).")]


def plain(rng: random.Random, registry) -> list[Message]:
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    country, capital = rng.choice(CAPITALS)
    user, answer = rng.choice((
        (f"What is {a} plus {b}?", f"{a} + {b} = {a + b}."),
        (f"What is {max(a, b)} minus {min(a, b)}?", f"{max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}."),
        ("Say hi.", "Hi! How can I help?"),
        (f"What is the capital of {country}?", f"{capital}."),
    ))
    return [Message("system", "You are a helpful assistant."), Message("user", user), Message("assistant", answer)]


def plain_thinking(rng: random.Random, registry) -> list[Message]:
    a, b = rng.randint(12, 49), rng.randint(12, 49)
    tens, ones = b // 10 * 10, b % 10
    thought = f"{a}*{tens}={a * tens}, {a}*{ones}={a * ones}, so {a * b}."
    return [Message("system", "You are a helpful assistant. Think before you answer."),
            Message("user", f"What is {a} × {b}?"), Message("assistant", f"<think>{thought}</think>{a} × {b} = {a * b}.")]


BUILDERS: dict[str, Callable[[random.Random, object], list[Message]]] = {
    "single_call": single_call, "multi_step": multi_step, "code_mode": code_mode, "large_payload": large_payload,
    "pii": pii, "plain": plain, "plain_thinking": plain_thinking,
}
