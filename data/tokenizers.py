"""Tokenizers: text to token ids.

`ByteTokenizer` (the default) maps text to its UTF-8 bytes: vocabulary 256,
nothing to download, every token one byte (so a loss per token is a loss per
byte).  Any tokenizer here has ``name``, ``vocab_size``, ``encode(text) ->
np.ndarray`` and ``encode_batch(texts) -> list[np.ndarray]`` (int64 ids).
"""
from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as token ids ``0..255``."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
