"""Builders of a second, tiny model family, unlike the reference, for tests that must show a
contract is not written for SmolLM2 alone.

The reference (SmolLM2) is a GPT-2-style byte-level BPE with a ChatML template, PAD == EOS and
no BOS added. This family differs on every one of those axes, as Llama-2 / Zephyr do:

* a SentencePiece-style BPE (``▁`` for spaces, byte fallback to ``<0x00>``..``<0xFF>``);
* a BOS (``<s>``) the tokenizer adds itself with ``add_special_tokens=True``;
* PAD (``<pad>``, id 3) distinct from EOS (``</s>``, id 2);
* a Zephyr chat template (``<|user|>\\n…</s>\\n``) whose role tags are plain text.

Everything is built offline, in a test's tmp folder, in a few seconds, and deterministically:
the same inputs give the same ``tokenizer.json`` bytes and the same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[1]

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIALS = (UNK, BOS, EOS, PAD)  # ids 0, 1, 2, 3, in this order
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # ids 4..259, as Llama-2 keeps them in the model vocab
SPACE = "▁"
# What a transformers tokenizer folder may hold (copied into a teacher folder as is).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "tokenizer.model")

# Zephyr's layout (not ChatML): role tags are plain text, each turn ends with EOS then a newline.
# It emits no BOS: a caller tokenizing a rendered chat decides whether to add one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role'] + ' (only system, user and assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Text the default training set always includes: non-ASCII, JSON and indented code, so that
# common pieces of them get merges while anything unseen still falls back to bytes.
EXTRA_TEXTS = (
    "São Paulo is 18.5 °C with light rain; Reykjavík is -3.2 °C.",
    "17 × 23 = 391, and 12 × 12 = 144.",
    "Tomás García paid €1,200.50 for the flight to Zürich.",
    '{"name": "get_weather", "arguments": {"city": "São Paulo", "unit": "celsius"}}',
    '{"a": [1, 2, 3], "b": {"c": null, "d": true}, "e": "quote \\" inside"}',
    "def total(items):\n    result = 0\n    for x in items:\n        result += x\n    return result\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "<|system|>\nYou are a helpful assistant.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n",
)


def reference_texts(samples_per_scenario: int = 40, seed: int = 0) -> list[str]:
    """Message contents of the reference corpus (every scenario) plus :data:`EXTRA_TEXTS`, with the
    thinking and tool tags taken out: a base tokenizer that never saw them, so that the student's
    vocab migration adds them (as it would for a real teacher without them)."""
    import re

    from kdtrain.tokenizers.migration import TAGS

    from kdtrain.data.corpus import build_reference_corpus
    from kdtrain.data.registry import load_registry

    registry = load_registry(REPO / "contracts" / "tool_registry.json")
    corpus = build_reference_corpus(registry, samples_per_scenario, seed)
    tags = re.compile("|".join(re.escape(t) for t in TAGS))
    return [tags.sub(" ", m.content) for s in corpus.samples for m in s.messages] + list(EXTRA_TEXTS)


def _pre_tokenizer(split: bool):
    from tokenizers import pre_tokenizers

    # prepend_scheme="first": "▁" goes before the first piece of the text only, not before text
    # that follows a special/added token (transformers' non-legacy Llama conversion).
    return pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=split)


def build_tokenizer(folder: Path, texts: Iterable[str] | None = None, vocab_size: int = 1200) -> Path:
    """Train a Llama-2-style tokenizer on ``texts`` (default :func:`reference_texts`) and save
    it as a transformers folder (``tokenizer.json`` + config, loadable by ``AutoTokenizer``).

    Byte fallback: text outside the learned pieces (an emoji, CJK) encodes to byte tokens, never
    to ``<unk>``, so every string round-trips; a contract that assumes a byte-level BPE (GPT-2
    style ``Ġ``) sees different pieces here. PAD != EOS: a collator that masks ``ids == pad_id``
    must not hide a real EOS, which the reference (PAD == EOS) cannot show.

    Metaspace quirks a test may meet (Llama's too): "▁" is prepended to the text's first piece
    only, so text right after a special/added token (``<s>``, ``</s>``, an added ``<think>``)
    has no leading "▁" ("<s>Hi" -> <s> H i, but "Hi" -> ▁H i); text that already starts with a
    space gets no extra "▁" yet the decoder strips one, so "  x" decodes as " x".
    """
    from tokenizers import Tokenizer, decoders, models, processors, trainers
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    texts = reference_texts() if texts is None else list(texts)
    reserved = len(SPECIALS) + len(BYTE_TOKENS)
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must exceed the {reserved} special and byte tokens, got {vocab_size}")

    # 1. Learn pieces and merges. The trainer's special tokens would become added tokens, so the
    #    byte tokens are left out here and placed in the model vocab below.
    draft = Tokenizer(models.BPE(unk_token=UNK))
    draft.pre_tokenizer = _pre_tokenizer(split=True)  # train on words, as SentencePiece does
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=list(SPECIALS),
                                  show_progress=False, min_frequency=2)
    draft.train_from_iterator(texts, trainer=trainer)
    learned = json.loads(draft.to_str())["model"]
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in SPECIALS and t not in BYTE_TOKENS]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    # 2. The final model: specials 0..3, bytes 4..259, learned pieces after, as Llama-2 lays out.
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTE_TOKENS + tuple(pieces))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = _pre_tokenizer(split=False)  # as Llama's tokenizer.json: one piece per split
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(content=" ", left=1, right=0)])
    tokenizer.add_special_tokens(list(SPECIALS))  # already in the vocab: keeps ids 0..3
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, vocab[BOS])])

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   clean_up_tokenization_spaces=False, model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def _token_id(tokenizer, config: dict, key: str) -> int | None:
    token = config.get(key)
    token = token.get("content") if isinstance(token, dict) else token
    return None if token is None else tokenizer.token_to_id(token)


def build_teacher(folder: Path, tokenizer_folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny randomly initialised causal LM (float32) over the tokenizer in ``tokenizer_folder``,
    saved with a byte-identical copy of that tokenizer's files into ``folder``: the folder alone
    is a complete transformers model folder. Weights depend on ``seed`` only.

    ``arch``: ``"qwen2"`` (default: another family than the Llama-shaped reference student, with
    q/k/v biases), ``"llama"`` (same shapes, a same-family teacher) or ``"qwen3"`` (q/k norms).
    Other ``overrides`` are config fields (``num_hidden_layers=2``...).

    Beware, transformers >= 5: ``AutoTokenizer.from_pretrained`` on a ``model_type: qwen2``
    folder always builds ``Qwen2Tokenizer``, which keeps only vocab + merges and imposes Qwen2's
    byte-level pipeline: this SentencePiece-style tokenizer then encodes wrongly ("São" ->
    "S", "o"). Load a qwen2 teacher's tokenizer with ``PreTrainedTokenizerFast.from_pretrained``
    (or from ``tokenizer_folder``), or use ``arch="qwen3"``/``"llama"``, whose folders
    ``AutoTokenizer`` reads from ``tokenizer.json`` as written.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    arch = overrides.pop("arch", "qwen2")
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    config_class, model_class = classes[arch]

    # Read the tokenizer with the `tokenizers` library, not AutoTokenizer: tokenizer_folder may
    # itself be a qwen2 model folder (see above), and a reload + save would rewrite its files.
    tokenizer_folder = Path(tokenizer_folder)
    tokenizer = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
    tokenizer_config = json.loads((tokenizer_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), max_position_embeddings=4096,
                  tie_word_embeddings=True, bos_token_id=_token_id(tokenizer, tokenizer_config, "bos_token"),
                  eos_token_id=_token_id(tokenizer, tokenizer_config, "eos_token"),
                  pad_token_id=_token_id(tokenizer, tokenizer_config, "pad_token"))
    if arch == "qwen3":
        fields["head_dim"] = 16  # Qwen3Config defaults to 128, not hidden_size // heads
    config = config_class(**(fields | overrides))
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).is_file():
            shutil.copyfile(tokenizer_folder / name, folder / name)
    return folder
