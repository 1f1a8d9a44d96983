"""Text sources: ``.txt``, ``.jsonl`` and ``.parquet`` files, tokenised.

Documents:

- ``.txt``: the file is one document, except that a run of two or more blank
  lines (three or more newlines in a row; a line of only whitespace counts
  as blank) separates documents.  One blank line (a paragraph break) does
  not.  Each document keeps the newline that ends its last line.
- ``.jsonl``: one JSON object per line, its ``text_field`` string is a
  document; empty lines are skipped; any other line that is not such an
  object is an error naming ``file:line``.
- ``.parquet``: the ``text_field`` column (string), read by record batches
  with pyarrow (``pip install 'loom-train[data]'``); null rows are skipped.

Documents with nothing but whitespace are dropped.  Text must be UTF-8.
"""
from __future__ import annotations

import json
import re

import numpy as np

from .streams import Part
from .tokenizers import tokenizer_identity

TEXT_KINDS = (".txt", ".jsonl", ".parquet")
BATCH_DOCS = 1024  # documents tokenised per encode_batch call
_SEPARATOR = re.compile(r"(?<=\n)(?:[^\S\n]*\n){2,}")  # after a line's end: two or more blank lines


def split_txt(text: str) -> list[str]:
    """The documents of a ``.txt`` file's text (the rule in the module doc)."""
    return [d for d in _SEPARATOR.split(text) if d.strip()]


def token_dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id of a ``vocab_size`` vocabulary fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _txt(fs, path: str, display: str):
    raw = fs.cat_file(path)
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise ValueError(f"{display}: not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8") from exc
    docs = split_txt(text)
    for i in range(0, len(docs), BATCH_DOCS):
        yield docs[i:i + BATCH_DOCS]


def _jsonl(fs, path: str, display: str, field: str):
    batch = []
    with fs.open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
                raise ValueError(f"{display}:{lineno}: not valid JSON ({exc}); fix or remove that line") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{display}:{lineno}: a {type(row).__name__}, not a JSON object with a "
                                 f"{field!r} field")
            if field not in row:
                keys = ", ".join(map(repr, list(row)[:10])) or "none"
                raise ValueError(f"{display}:{lineno}: no {field!r} field (fields: {keys}); pass the right "
                                 "--text-field")
            text = row[field]
            if not isinstance(text, str):
                raise ValueError(f"{display}:{lineno}: field {field!r} is a {type(text).__name__}, not a string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\\ud800": not Unicode text
                raise ValueError(f"{display}:{lineno}: field {field!r} holds {text[exc.start]!r} at character "
                                 f"{exc.start}, a lone surrogate escape that is not text; fix or remove that "
                                 "line") from exc
            batch.append(text)
            if len(batch) == BATCH_DOCS:
                yield batch
                batch = []
    if batch:
        yield batch


def _parquet(fs, path: str, display: str, field: str):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(f"{display}: reading .parquet needs pyarrow: pip install 'loom-train[data]'") from exc
    with fs.open(path, "rb") as fh:
        try:
            pf = pq.ParquetFile(fh)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{display}: not a readable parquet file ({exc})") from exc
        schema = pf.schema_arrow
        if field not in schema.names:
            raise ValueError(f"{display}: no column {field!r} (columns: {', '.join(schema.names) or 'none'}); "
                             "pass the right --text-field")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"{display}: column {field!r} holds {kind}, not strings")
        batches = pf.iter_batches(columns=[field], batch_size=BATCH_DOCS)
        while True:
            try:  # a damaged page (or bytes that are not UTF-8) is found only when it is read
                batch = next(batches, None)
                texts = None if batch is None else batch.column(0).to_pylist()
            except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{display}: not a readable parquet file ({' '.join(str(exc).split())})") from exc
            if texts is None:
                return
            yield [t for t in texts if t is not None]


def documents(fs, path: str, display: str, text_field: str = "text"):
    """Batches (lists) of the non-blank document strings of a text file."""
    kind = next((k for k in TEXT_KINDS if path.endswith(k)), None)
    if kind == ".txt":
        batches = _txt(fs, path, display)
    elif kind == ".jsonl":
        batches = _jsonl(fs, path, display, text_field)
    elif kind == ".parquet":
        batches = _parquet(fs, path, display, text_field)
    else:
        raise ValueError(f"{display}: not a text file ({', '.join(TEXT_KINDS)})")
    for batch in batches:
        batch = [d for d in batch if d.strip()]
        if batch:
            yield batch


def encoded(fs, path: str, display: str, tokenizer, text_field: str = "text"):
    """``(ids, num_bytes)`` per batch of documents: ``ids`` a list of int64
    arrays (documents that tokenise to nothing left out), ``num_bytes`` the
    UTF-8 bytes of the documents kept."""
    vocab = int(tokenizer.vocab_size)
    for batch in documents(fs, path, display, text_field):
        ids = tokenizer.encode_batch(batch)
        kept = [(i, d) for i, d in zip(ids, batch) if len(i)]
        for i, _ in kept:  # token files hold ids below the vocabulary (uint16 up to 65536): never wrap one
            if int(i.max()) >= vocab or int(i.min()) < 0:
                bad = int(i.max()) if int(i.max()) >= vocab else int(i.min())
                raise ValueError(f"{display}: tokenizer {getattr(tokenizer, 'name', tokenizer)!r} gave id {bad}, "
                                 f"outside its vocabulary [0, {vocab}) (its ids are not dense); use a tokenizer "
                                 "whose ids are 0 .. vocab_size - 1")
        yield [i for i, _ in kept], sum(len(d.encode("utf-8")) for _, d in kept)


def tokenize_file(fs, path: str, display: str, tokenizer, text_field: str = "text") -> Part:
    """A whole text file tokenised in memory (uint16/uint32 by vocabulary)."""
    dtype = token_dtype_for(tokenizer.vocab_size)
    docs, num_bytes = [], 0
    for ids, nb in encoded(fs, path, display, tokenizer, text_field):
        docs.extend(i.astype(dtype) for i in ids)
        num_bytes += nb
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(docs) else \
        np.zeros(0, dtype=np.int64)
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=dtype)
    max_token = int(tokens.max()) if len(tokens) else -1
    return Part(display, tokens, starts, tokenizer.vocab_size, num_bytes, tokenizer_identity(tokenizer), max_token)
