"""Whether an answer restates a tool result: permissive patterns, not string equality.

Every positive below restates a value in words or digits that never occur in the result's
JSON; every negative is a near miss that a too-permissive pattern would accept.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdtrain.losses.integration import integrates, integration_spans


def restated(answer: str, result: object) -> list[str]:
    """The answer's text in each integration span."""
    return [answer[start:end] for start, end in integration_spans(answer, json.dumps(result))]


def test_the_documented_example_integrates_without_sharing_a_single_string():
    result = {"temperature": 18.5, "sky": "overcast"}
    answer = "18.50 °C, cloudy"
    assert not set(answer.split()) & set(json.dumps(result).split())
    assert integrates(answer, json.dumps(result)) == 1.0
    assert restated(answer, result) == ["18.50", "cloudy"]


@pytest.mark.parametrize("answer, result, span", [
    ("Skies are cloudy over Rome.", {"sky": "overcast"}, "cloudy"),
    ("It is overcast.", {"sky": "cloudy"}, "overcast"),
    ("Expect clouds all day.", {"sky": "overcast"}, "clouds"),
    ("Sunny all day.", {"sky": "clear"}, "Sunny"),
    ("Temperatures are given in °C.", {"unit": "celsius"}, "°C"),
    ("Prices are in €.", {"currency": "EUR"}, "€"),
    ("The email was delivered.", {"status": "sent"}, "delivered"),
])
def test_synonyms_restate_a_value(answer, result, span):
    assert restated(answer, result) == [span]
    assert integrates(answer, json.dumps(result)) == 1.0


@pytest.mark.parametrize("answer, span", [
    ("It is partly cloudy.", "partly cloudy"),
    ("It is cloudy, partly.", "cloudy, partly"),
    ("Clouds, partly, this morning.", "Clouds, partly"),
])
def test_a_multi_word_value_matches_in_any_order_within_a_short_window(answer, span):
    assert restated(answer, {"sky": "partly cloudy"}) == [span]


@pytest.mark.parametrize("answer", [
    "Partly sunny.",  # one word of two
    "Partly true: from here the sky looks cloudy.",  # both words, too far apart
])
def test_a_multi_word_value_needs_all_its_words_close_together(answer):
    assert restated(answer, {"sky": "partly cloudy"}) == []
    assert integrates(answer, json.dumps({"sky": "partly cloudy"})) == 0.0


@pytest.mark.parametrize("key", ["price_eur", "priceEur", "price eur"])
@pytest.mark.parametrize("answer, spans", [
    ("The price in EUR is 12.", ["price in EUR", "12"]),
    ("The price in € is 12.", ["price in €", "12"]),
    ("That is 12 euro as a price.", ["12", "euro as a price"]),
])
def test_a_variable_name_matches_the_words_it_is_made_of(key, answer, spans):
    assert restated(answer, {key: 12}) == spans


def test_a_variable_name_needs_every_word_and_two_of_them():
    assert restated("The price is 12.", {"price_eur": 12}) == ["12"]  # "eur" missing
    assert restated("The sky is blue.", {"sky": "overcast"}) == []  # a one-word key is too generic


def test_variable_names_mark_spans_but_only_values_count_as_integrated():
    answer = "The price in EUR is 13."
    assert restated(answer, {"price_eur": 12}) == ["price in EUR"]
    assert integrates(answer, json.dumps({"price_eur": 12})) == 0.0


@pytest.mark.parametrize("written, value", [
    ("66,412", 66412),  # thousands separator
    ("66\u00a0412", 66412),  # no-break space
    ("66\u202f412", 66412),  # thin space
    ("1,234.5", 1234.5),
    ("18,5", 18.5),  # decimal comma
    ("18.50", 18.5),  # trailing zero
    ("18", 18.5),  # rounded down to the precision written
    ("19", 18.5),  # rounded up
    ("412.4", 412.37),
    ("412", 412.37),
    ("-3.2", -3.2),
    ("2,5", 2.5),
])
def test_numbers_match_up_to_formatting_and_rounding(written, value):
    answer = f"The value is {written} today."
    assert restated(answer, {"value": value}) == [written]
    assert integrates(answer, json.dumps({"value": value})) == 1.0


@pytest.mark.parametrize("written, value", [
    ("17", 18.5),  # a wrong number
    ("66,413", 66412),
    ("412.3", 412.37),  # rounding to one decimal gives 412.4
    ("66.412", 66412),  # a decimal point, never a thousands separator
    ("18,500", 18.5),  # a comma before exactly three digits separates thousands
    ("1", 1.4),  # one significant digit matches too much to count
])
def test_a_different_number_does_not_match(written, value):
    answer = f"The value is {written} today."
    assert restated(answer, {"value": value}) == []
    assert integrates(answer, json.dumps({"value": value})) == 0.0


def test_numbers_inside_a_text_value_match_digits_written_plainly():
    result = {"summary": "66,412 visitors in 2023"}
    assert restated("We had 66412 visitors.", result) == ["66412", "visitors"]


@pytest.mark.parametrize("answer", ["It is sunny.", "It is rainy.", "The forecast is unchanged."])
def test_an_unrelated_word_does_not_restate_a_value(answer):
    assert restated(answer, {"sky": "overcast"}) == []
    assert integrates(answer, json.dumps({"sky": "overcast"})) == 0.0


def test_integrates_is_the_fraction_of_leaf_values_restated():
    result = json.dumps({"city": "Rome", "temperature": 18.5, "sky": "overcast", "wind_kmh": 12, "updated": True})
    fractions = [integrates(answer, result) for answer in ("Rome: 18 degrees, cloudy, wind 12.", "Rome, cloudy.", "No idea.")]
    assert np.allclose(fractions, [1.0, 0.5, 0.0])  # booleans are not values to restate
    assert integrates("Anything.", json.dumps({"ok": True})) == 1.0


def test_a_result_that_is_not_json_is_read_as_text():
    assert restated("Done: 3 messages delivered.", "Sent 3 messages.") == ["3", "messages delivered"]


def test_integration_spans_are_merged_and_sorted():
    result = {"low": 18.5, "high": 18.5, "sky": "partly cloudy"}
    assert integration_spans("Partly cloudy, 18 to 19.", json.dumps(result)) == [(0, 13), (15, 17), (21, 23)]
