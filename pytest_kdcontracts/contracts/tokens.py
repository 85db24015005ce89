"""``tokens.json``: special-token ids, single-token tags, round trips, fingerprints, padding
and loss masks, and the vocab-migration audit log — per tokenizer (teacher, student, runtime).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Iterator

from kdcontracts.models.tokens import Example, SpecialToken, TokensContract
from kdtrain.artifact_table import MIGRATION_AUDIT
from kdtrain.data.chat import IGNORE_INDEX
from kdtrain.tokenizers.load import TOKENIZER_ARTIFACTS
from pytest_kdcontracts.check import Check, fail


def _pieces(tok, ids: list[int]) -> str:
    return ", ".join(f"{i} {tok.decode([i])!r}" for i in ids)


def _where(tok) -> str:
    return f"tokenizer {tok.name!r} ({tok.path})"


# --- 1. ids -------------------------------------------------------------------------------

def check_special_id(c: TokensContract, token: SpecialToken, name: str, kd_tokenizers) -> None:
    tok = kd_tokenizers[name]
    expected, found = token.ids[name], tok.token_to_id(token.text)
    if found != expected:
        what = "absent from the vocabulary" if expected is None else f"id {expected}"
        fail(c.name, f"special token {token.text!r} in {_where(tok)}", what, "absent" if found is None else f"id {found}")


def check_role_id(c: TokensContract, role: str, name: str, kd_tokenizers) -> None:
    tok = kd_tokenizers[name]
    token = next((t for t in c.special_tokens if role in t.roles), None)  # None: the contract says there is no such token
    found = getattr(tok.transformers, f"{role}_token_id")
    expected = token.ids.get(name) if token else None
    if found != expected:
        fail(c.name, f"{role.upper()} of {_where(tok)}", f"{token.text!r} = id {expected}" if token else f"no {role.upper()} token",
             f"id {found} ({getattr(tok.transformers, f'{role}_token')!r})")


# --- 2. single tokens --------------------------------------------------------------------

def contexts(text: str) -> list[str]:
    return [text, f"Hello{text}world", f"Hello {text} world", f"\n{text}\n", f"{text}{text}", f'{{"a": 1}}{text}']


def check_single_token(c: TokensContract, token: SpecialToken, name: str, kd_tokenizers) -> None:
    tok, tid = kd_tokenizers[name], token.ids[name]
    alone = tok.encode(token.text).ids
    if alone != [tid]:
        fail(c.name, f"{token.text!r} alone in {_where(tok)}", f"one token [{tid}]", f"{len(alone)} token(s) [{_pieces(tok, alone)}]")
    for text in contexts(token.text)[1:]:
        ids = tok.encode(text).ids
        if ids.count(tid) != text.count(token.text):
            fail(c.name, f"{token.text!r} inside {text!r} in {_where(tok)}", f"id {tid} {text.count(token.text)} time(s)", f"[{_pieces(tok, ids)}]")


# --- 3. round trips and student/runtime identity -----------------------------------------

def check_round_trip(c: TokensContract, prompt: str, name: str, kd_tokenizers) -> None:
    tok = kd_tokenizers[name]
    text = c.prompts[prompt]
    back = tok.decode(tok.encode(text).ids)
    if back != text:
        at = next((i for i, (a, b) in enumerate(zip(back, text)) if a != b), min(len(back), len(text)))
        fail(c.name, f"decode(encode(prompt {prompt!r})) in {_where(tok)}", repr(text[max(0, at - 20): at + 20]), repr(back[max(0, at - 20): at + 20]), f"first difference at character {at}")


def check_same_ids(c: TokensContract, prompt: str, a: str, b: str, kd_tokenizers) -> None:
    ta, tb = kd_tokenizers[a], kd_tokenizers[b]
    ia, ib = ta.encode(c.prompts[prompt]).ids, tb.encode(c.prompts[prompt]).ids
    if ia != ib:
        at = next((i for i, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
        fail(c.name, f"ids of prompt {prompt!r}: {a!r} vs {b!r}", f"{a}: [{_pieces(ta, ia[at:at + 4])}] at position {at}", f"{b}: [{_pieces(tb, ib[at:at + 4])}]")


# --- 4. fingerprints ---------------------------------------------------------------------

def check_fingerprint(c: TokensContract, name: str, kd_tokenizers) -> None:
    tok = kd_tokenizers[name]
    if tok.fingerprint != c.fingerprints[name]:
        fail(c.name, f"fingerprint of {_where(tok)}", c.fingerprints[name], tok.fingerprint,
             "the tokenizer's meaning changed (vocab, merges, added tokens, normalizer, roles or chat template); "
             "if intended, update fingerprints in the contract")


# --- 5. padding mask ---------------------------------------------------------------------

def check_padding_mask(c: TokensContract, token: SpecialToken, name: str, kd_tokenizers, kd_collator) -> None:
    tok, tid, pad = kd_tokenizers[name], token.ids[name], c.pad_id(name)
    hello, world = tok.encode("Hello").ids, tok.encode(" world, and more text").ids
    sequences = [hello + [tid] + world, hello + [tid], [tid], hello + [tid] + world + world]
    batch = kd_collator(sequences, pad_id=pad)
    for row, seq in enumerate(sequences):
        mask = [int(m) for m in batch.attention_mask[row].tolist()]
        ids = [int(i) for i in batch.input_ids[row].tolist()]
        kept = [i for i, m in zip(ids, mask) if m]
        if kept != seq:
            right_padded = ids[: len(seq)] == seq
            hidden = [p for p in range(len(seq)) if seq[p] == tid and not mask[p]] if right_padded else []
            fail(c.name, f"padding mask of {token.text!r} (id {tid}, roles {list(token.roles)}) with PAD id {pad} in {_where(tok)}",
                 f"the {len(seq)} real tokens of sequence {row} unmasked, padding masked",
                 f"mask {mask}" + (f"; {token.text!r} masked at positions {hidden}" if hidden else ""),
                 "a collator must derive the mask from lengths: PAD and EOS share an id" if pad == tid else "")


# --- 6. loss masking ---------------------------------------------------------------------

def _labelled(c: TokensContract, example: Example, name: str, kd_tokenizers, kd_chat_labeler):
    tok = kd_tokenizers[name]
    rendered, ids, labels = kd_chat_labeler(tok, example.messages)
    for message, (s, e) in zip(example.messages, rendered.message_spans, strict=True):
        if rendered.text[s:e] != message.content:
            fail(c.name, f"rendering of example {example.name!r}", f"{message.role} content {message.content[:40]!r} at [{s}:{e}]", repr(rendered.text[s:e][:40]))
    return tok, rendered, ids, labels, tok.encode(rendered.text).offsets


def check_loss_mask_supervised(c: TokensContract, example: Example, name: str, kd_tokenizers, kd_chat_labeler) -> None:
    tok, rendered, ids, labels, offsets = _labelled(c, example, name, kd_tokenizers, kd_chat_labeler)
    for message, (s, e) in zip(example.messages, rendered.message_spans):
        if message.role != "assistant":
            continue
        for pos, (ts, te) in enumerate(offsets):
            if ts < e and te > s and labels[pos] == IGNORE_INDEX:
                fail(c.name, f"loss mask of example {example.name!r} in {_where(tok)}",
                     "every token of the assistant's turn (thinking, tool call tags and JSON, answer) supervised",
                     f"token {pos} {tok.decode([ids[pos]])!r} masked (ignore index) in …{rendered.text[max(s, ts - 25):te + 25]!r}…")


def check_loss_mask_unsupervised(c: TokensContract, example: Example, name: str, kd_tokenizers, kd_chat_labeler) -> None:
    tok, rendered, ids, labels, offsets = _labelled(c, example, name, kd_tokenizers, kd_chat_labeler)
    never = {t.ids.get(name) for t in c.special_tokens if not t.supervised} - {None}
    for message, (s, e) in zip(example.messages, rendered.message_spans):
        for pos, (ts, te) in enumerate(offsets):
            inside = message.role != "assistant" and s <= ts and te <= e and te > ts
            if (inside or ids[pos] in never) and labels[pos] != IGNORE_INDEX:
                fail(c.name, f"loss mask of example {example.name!r} in {_where(tok)}",
                     f"{message.role} text and unsupervised special tokens masked",
                     f"token {pos} {tok.decode([ids[pos]])!r} supervised (label {labels[pos]})")


# --- migration audit log -----------------------------------------------------------------

def _audit(kd_artifacts) -> dict:
    return json.loads(kd_artifacts.path(MIGRATION_AUDIT).read_text(encoding="utf-8"))


def check_audit_vocab(c: TokensContract, side: str, kd_tokenizers, kd_artifacts) -> None:
    name = c.migration_from if side == "from" else c.migration_to
    tok, logged = kd_tokenizers[name], _audit(kd_artifacts)[side]
    if (logged["vocab_sha256"], logged["vocab_size"]) != (tok.vocab_sha256, len(tok.vocab)):
        fail(c.name, f"migration audit log, {side!r} vocab vs {_where(tok)}", f"{logged['vocab_sha256']} ({logged['vocab_size']} tokens)", f"{tok.vocab_sha256} ({len(tok.vocab)} tokens)")


def check_audit_added(c: TokensContract, token: SpecialToken, kd_tokenizers, kd_artifacts) -> None:
    entry = next((a for a in _audit(kd_artifacts)["added_tokens"] if a["text"] == token.text), None)
    student = kd_tokenizers[c.migration_to]
    expected = token.ids[c.migration_to]
    if entry is None or entry["id"] != expected or student.token_to_id(token.text) != expected:
        fail(c.name, f"migration audit log entry for {token.text!r}", f"id {expected} (contract) = id in {_where(student)}",
             f"log: {entry and entry['id']}, tokenizer: {student.token_to_id(token.text)}")


def check_audit_samples(c: TokensContract, kd_tokenizers, kd_artifacts) -> None:
    old, new = kd_tokenizers[c.migration_from], kd_tokenizers[c.migration_to]
    for sample in _audit(kd_artifacts)["samples"]:
        for tok, key in ((old, "old_ids"), (new, "new_ids")):
            ids = tok.encode(sample["text"]).ids
            if ids != sample[key]:
                fail(c.name, f"migration audit sample {sample['text'][:40]!r}, {key}", f"{sample[key]} (logged)", f"{ids} from {_where(tok)}")


def checks(c: TokensContract) -> Iterator[Check]:
    tk, both = ("kd_tokenizers",), ("kd_tokenizers", "kd_artifacts")
    for name in c.tokenizers:
        for t in c.special_tokens:
            if name in t.ids:
                yield Check("special_id", (name, t.text), partial(check_special_id, c, t, name), tk)
        if TOKENIZER_ARTIFACTS.get(name, ("", ""))[1] == "transformers":
            for role in ("bos", "eos", "pad"):
                yield Check("role_id", (name, role), partial(check_role_id, c, role, name), tk)
        for t in c.special_tokens:
            if t.ids.get(name) is not None:
                yield Check("single_token", (name, t.text), partial(check_single_token, c, t, name), tk)
        for prompt in c.prompts:
            yield Check("round_trip", (name, prompt), partial(check_round_trip, c, prompt, name), tk)
        yield Check("fingerprint", (name,), partial(check_fingerprint, c, name), tk)
        if c.pad_id(name) is not None:
            for t in c.special_tokens:
                if t.ids.get(name) is not None and set(t.roles) != {"pad"}:
                    yield Check("padding_mask", (name, t.text), partial(check_padding_mask, c, t, name), tk + ("kd_collator",))
    if {"student", "runtime"} <= set(c.tokenizers):
        for prompt in c.prompts:
            yield Check("same_ids", ("student", "runtime", prompt), partial(check_same_ids, c, prompt, "student", "runtime"), tk)
    for name in c.supervision_tokenizers:
        for ex in c.examples:
            yield Check("loss_mask", (name, ex.name), partial(check_loss_mask_supervised, c, ex, name), tk + ("kd_chat_labeler",))
            yield Check("loss_mask_unsupervised", (name, ex.name), partial(check_loss_mask_unsupervised, c, ex, name), tk + ("kd_chat_labeler",))
    yield Check("migration_audit", ("vocab", "from"), partial(check_audit_vocab, c, "from"), both)
    yield Check("migration_audit", ("vocab", "to"), partial(check_audit_vocab, c, "to"), both)
    for t in c.special_tokens:
        if t.ids.get(c.migration_from) is None and t.ids.get(c.migration_to) is not None:
            yield Check("migration_audit", ("added", t.text), partial(check_audit_added, c, t), both)
    yield Check("migration_audit", ("samples",), partial(check_audit_samples, c), both)
