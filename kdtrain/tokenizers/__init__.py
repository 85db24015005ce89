"""Tokenizer suite: loading (one interface for transformers and runtime tokenizers),
meaning fingerprints, and vocab migration (teacher -> student with new tags)."""

from kdtrain.tokenizers.fingerprint import tokenizer_fingerprint, vocab_sha256
from kdtrain.tokenizers.load import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "tokenizer_fingerprint", "vocab_sha256"]
