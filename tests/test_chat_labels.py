"""Loss masking: the assistant's turn (tags, JSON, answer, closing EOS) is supervised; the rest is not."""

from __future__ import annotations

from kdcontracts.models.tokens import Message
from kdtrain.data.chat import IGNORE_INDEX, ChatFormat, supervised_labels
from kdtrain.tokenizers.load import Tokenizer

MESSAGES = (
    Message("user", "Weather in Paris?"),
    Message("assistant", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'),
    Message("tool", '{"temperature_c": 18}'),
    Message("assistant", "18 °C."),
)


def test_rendered_spans_point_at_each_message(reference_artifacts):
    rendered = ChatFormat.of(Tokenizer("student", reference_artifacts / "tokenizers/student", "transformers")).render(MESSAGES)
    assert [rendered.text[s:e] for s, e in rendered.message_spans] == [m.content for m in MESSAGES]
    assert rendered.text.endswith("18 °C.<|im_end|>\n")


def test_labels_supervise_assistant_tokens_only(reference_artifacts):
    tok = Tokenizer("student", reference_artifacts / "tokenizers/student", "transformers")
    rendered = ChatFormat.of(tok).render(MESSAGES)
    enc = tok.encode(rendered.text)
    labels = supervised_labels(enc.ids, enc.offsets, rendered.supervised_spans)
    supervised = tok.decode([i for i, label in zip(enc.ids, labels) if label != IGNORE_INDEX])
    assert supervised == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>18 °C.<|im_end|>'


def test_a_token_straddling_a_span_edge_is_supervised():
    # Offsets (0,4) and (4,8); the span starts at 3: the first token overlaps it.
    assert supervised_labels([10, 11], [(0, 4), (4, 8)], [(3, 8)]) == [10, 11]
    assert supervised_labels([10, 11], [(0, 4), (4, 8)], [(4, 8)]) == [IGNORE_INDEX, 11]


def test_another_template_is_followed_and_one_that_cannot_be_aligned_is_refused(tmp_path):
    """A Zephyr template renders its own headers and closes turns with </s>; a template that trims
    content, or does not close an assistant turn with the EOS, is an error naming the tokenizer."""
    import pytest
    from transformers import AutoTokenizer

    from kdtrain.errors import DataError
    from tiny_family import build_tokenizer

    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok"))
    rendered = ChatFormat.of(tok).render(MESSAGES)
    assert [rendered.text[s:e] for s, e in rendered.message_spans] == [m.content for m in MESSAGES]
    answers = [m.content for m in MESSAGES if m.role == "assistant"]
    assert [rendered.text[s:e] for s, e in rendered.supervised_spans] == [a + "</s>" for a in answers]
    assert rendered.text.startswith("<|user|>\nWeather in Paris?</s>\n")

    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}</s>{% endfor %}"
    with pytest.raises(DataError, match="message 0 \\(user\\) content verbatim"):
        ChatFormat.of(tok).render([Message("user", " padded "), Message("assistant", "ok")])
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    with pytest.raises(DataError, match="assistant message 1 closed by the EOS '</s>'"):
        ChatFormat.of(tok).render([Message("user", "hi"), Message("assistant", "ok")])
