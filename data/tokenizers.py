"""Tokenizers: text to token ids.

`ByteTokenizer` (the default) maps text to its UTF-8 bytes: vocabulary 256,
nothing to download, every token one byte (so a loss per token is a loss per
byte).  Any tokenizer here has ``name``, ``vocab_size``, ``encode(text) ->
np.ndarray`` and ``encode_batch(texts) -> list[np.ndarray]`` (int64 ids).
"""
from __future__ import annotations

import hashlib
import os

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


class HFTokenizer:
    """A Hugging Face `tokenizers` file (``tokenizer.json``), local only: no
    hub, no download.  ``vocab_size`` counts the added tokens; `encode`
    adds no special tokens (documents are cut by the document index, not
    by BOS/EOS ids).  ``sha256``: of the file's bytes (recorded by
    ``loom data prepare`` so that a token file names what made it).

    Raises ValueError when the `tokenizers` package is missing (``pip
    install 'loom-train[data]'``), when ``path`` is a URL, or when the
    file does not load (its path and the library's reason)."""

    def __init__(self, path: str):
        path = os.fspath(path)
        if "://" in path:
            raise ValueError(f"tokenizer {path!r}: give a local tokenizer.json file (no URLs, no hub names)")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path!r} does not exist (give a local tokenizer.json, or 'byte')")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ValueError(f"tokenizer {path!r} needs the 'tokenizers' package: "
                             "pip install 'loom-train[data]'") from exc
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as exc:  # noqa: BLE001 - the library raises its own Exception types
            raise ValueError(f"tokenizer file {path!r} does not load: {exc}") from exc
        with open(path, "rb") as fh:
            self.sha256 = hashlib.sha256(fh.read()).hexdigest()
        self.path = path
        self.name = os.path.basename(path)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __reduce__(self):  # reload from the file in another process (prepare's workers)
        return (HFTokenizer, (self.path,))


def load_tokenizer(spec=None):
    """The tokenizer ``spec`` names: None, ``""`` or ``"byte"`` ->
    `ByteTokenizer`; a path -> `HFTokenizer` (a ``tokenizer.json``); an
    object with ``encode``/``encode_batch``/``vocab_size`` is returned as is.
    Raises ValueError as `HFTokenizer` does."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "byte")):
        return ByteTokenizer()
    if isinstance(spec, (str, os.PathLike)):
        return HFTokenizer(spec)
    if all(hasattr(spec, a) for a in ("encode", "encode_batch", "vocab_size")):
        return spec
    raise ValueError(f"tokenizer {spec!r}: give None/'byte' or the path of a tokenizer.json")


def tokenizer_identity(tok) -> dict:
    """What metadata records of a tokenizer: ``{"name", "sha256"}`` (sha256
    None for the byte tokenizer, which has no file)."""
    return {"name": getattr(tok, "name", type(tok).__name__), "sha256": getattr(tok, "sha256", None)}
