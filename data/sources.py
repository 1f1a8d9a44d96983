"""`open_corpus`: any source (token files, text, several of them, local or
fsspec URLs) as one `Corpus`.

Each path is a local path, an fsspec URL (``file://``, ``memory://``,
``s3://`` ...) or a glob of either (``data/*.bin``; matches sorted by name;
``*.docs.npy`` and metadata ``*.json`` sidecars, and hidden names that
the pattern does not spell out, are left out of glob matches).  Files are
concatenated in the order given, each starting a new document.  The
kind follows the suffix: ``.bin``/``.npy`` token files
(`loom.data.token_files`), ``.txt``/``.jsonl``/``.parquet`` text
(`loom.data.text`, tokenised at open, in memory: prepare big corpora once
with ``loom data prepare``).
"""
from __future__ import annotations

import logging
import os

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from .corpus import SCAN_CHUNK, Corpus
from .streams import ConcatTokens, Part, eod_starts
from .text import TEXT_KINDS, tokenize_file
from .token_files import open_token_file
from .tokenizers import load_tokenizer, tokenizer_identity

log = logging.getLogger("loom.data")
TOKEN_KINDS = (".bin", ".npy")
_MAGIC = set("*?[")


def kind_of(path: str) -> str | None:
    return next((k for k in TOKEN_KINDS + TEXT_KINDS if path.endswith(k)), None)


def expand(paths) -> list[tuple]:
    """``[(fs, path, display, local)]`` for every file that ``paths`` (a
    string or `os.PathLike`, or a list of them) names, in order.  Raises FileNotFoundError for
    a missing file or a glob that matches nothing, ValueError for a
    directory or an unknown suffix."""
    specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not specs:
        raise ValueError("no data paths given")
    out = []
    for spec in specs:
        spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec  # pathlib.Path
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"data path {spec!r} must be a non-empty string")
        fs, path = fsspec.core.url_to_fs(spec)
        local = isinstance(fs, LocalFileSystem)
        if _MAGIC & set(path):
            found = sorted(p for p in fs.glob(path) if fs.isfile(p))
            found = [p for p in found if not p.endswith(".docs.npy") and not p.endswith(".json")
                     and not _hidden_match(path, p)]
            if not found:
                raise FileNotFoundError(f"{spec}: no file matches this pattern")
            out += [(fs, p, p if local else fs.unstrip_protocol(p), local) for p in found]
        elif fs.isdir(path):
            raise ValueError(f"{spec} is a directory: name its files or a glob such as {spec.rstrip('/')}/*.bin")
        elif not fs.isfile(path):
            if fs.exists(path):  # a device, a pipe, a socket: nothing with a size to read by ranges
                raise ValueError(f"{spec} is not a regular file; give a file (or a glob of files)")
            raise FileNotFoundError(f"{spec}: no such file")
        else:
            out.append((fs, path, spec, local))
    for _, path, display, _ in out:
        if kind_of(path) is None:
            raise ValueError(f"{display}: unknown kind of file; loom reads token files "
                             f"({', '.join(TOKEN_KINDS)}) and text ({', '.join(TEXT_KINDS)})")
    return out


def _hidden_match(pattern: str, match: str) -> bool:
    """Whether a glob reached ``match`` through a hidden name (``.x``) that
    the pattern does not spell out: as in a shell, ``*`` and ``**`` skip
    them (a killed prepare's ``.X.prepare-*`` folder of partial parts)."""
    parts = pattern.split("/")
    fixed = next((i for i, part in enumerate(parts) if _MAGIC & set(part)), len(parts))
    if any(part.startswith(".") for part in parts[fixed:]):
        return False
    return any(part.startswith(".") for part in match.split("/")[fixed:])


def _same_tokenizer(a: dict, b: dict) -> bool:
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return a.get("name") == b.get("name") and not a.get("sha256") and not b.get("sha256")


def open_corpus(paths, *, tokenizer=None, text_field: str = "text", eod_token: int | None = None,
                token_dtype=None, doc_index: str | None = None) -> Corpus:
    """Every file ``paths`` names, end to end, as one `Corpus`.

    ``tokenizer``: for text files (None: `ByteTokenizer`; a path: a
    ``tokenizer.json``); given explicitly, token files whose metadata names
    another tokenizer are refused.  ``text_field``: the JSON field / parquet
    column holding the text.  ``eod_token``: every token equal to it ends a
    document (found by a chunked scan).  ``token_dtype``: of ``.bin`` files
    without metadata (default uint16).  ``doc_index``: a document index for
    the one token file given (instead of its ``X.docs.npy`` sidecar).

    ``vocab_size`` / ``num_bytes`` / ``max_token_bound`` of the result:
    known when every file knows them (the tokenizer's vocabulary; prepare's
    metadata; text tokenised here knows its largest id exactly).  Single
    local token file: ``corpus.tokens`` is its `np.memmap`.

    Raises FileNotFoundError (missing file, empty glob) or ValueError
    naming the file and what to change (bad header, dtype, size, metadata,
    document index, text line, tokenizer; files made by different
    tokenizers; an empty corpus)."""
    files = expand(paths)
    if doc_index is not None and (len(files) != 1 or kind_of(files[0][1]) not in TOKEN_KINDS):
        raise ValueError(f"doc_index={doc_index!r} needs exactly one token file (.bin/.npy); got "
                         f"{len(files)} file(s): index each file with its own X.docs.npy sidecar")
    if eod_token is not None and (not isinstance(eod_token, (int, np.integer)) or eod_token < 0):
        raise ValueError(f"eod_token={eod_token!r} must be a token id (an integer >= 0)")
    needs_text = any(kind_of(p) in TEXT_KINDS for _, p, _, _ in files)
    tok = load_tokenizer(tokenizer) if (needs_text or tokenizer is not None) else None
    index_fs = index_path = None
    if doc_index is not None:
        index_fs, index_path = fsspec.core.url_to_fs(doc_index)
        if not index_fs.isfile(index_path):
            raise FileNotFoundError(f"document index {doc_index}: no such file")
    parts: list[Part] = []
    for fs, path, display, local in files:
        if kind_of(path) in TOKEN_KINDS:
            part = open_token_file(fs, path, display, local=local, token_dtype=token_dtype,
                                   doc_index=index_path, index_fs=index_fs)
        else:
            part = tokenize_file(fs, path, display, tok, text_field)
        if eod_token is not None and len(part.tokens):
            found = eod_starts(part.tokens, int(eod_token), SCAN_CHUNK)
            if not len(found) and int(np.asarray(part.tokens[len(part.tokens) - 1:])[0]) != eod_token:
                log.warning("%s: --eod-token %d never occurs (is it the id your tokenizer ends documents with?)",
                            display, eod_token)
            part.starts = np.union1d(part.starts, found)
        if not len(part.tokens):
            log.warning("%s holds no tokens; skipped", display)
            continue
        parts.append(part)
    name = files[0][2] if len(files) == 1 else f"{files[0][2]} (+{len(files) - 1} more files)"
    if not parts:
        raise ValueError(f"corpus {name} is empty: no tokens in {len(files)} file(s) (blank text, empty token "
                         "files); check the paths and --text-field")
    known = [p for p in parts if p.tokenizer]
    if tokenizer is not None:
        known.insert(0, Part("the tokenizer given", None, None, tokenizer=tokenizer_identity(tok)))
    for p in known[1:]:
        if not _same_tokenizer(known[0].tokenizer, p.tokenizer):
            raise ValueError(f"{p.name} was made by tokenizer {p.tokenizer['name']!r} but {known[0].name} by "
                             f"{known[0].tokenizer['name']!r}: their ids mean different things; "
                             "use one tokenizer (re-prepare) for all files")
    tokens = parts[0].tokens if len(parts) == 1 else ConcatTokens([p.tokens for p in parts])
    offsets = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
    starts = np.concatenate([p.starts + o for p, o in zip(parts, offsets)]).astype(np.int64)
    vocabs, nbytes = [p.vocab_size for p in parts], [p.num_bytes for p in parts]
    vocab = max(vocabs) if all(v is not None for v in vocabs) else None
    num_bytes = sum(nbytes) if all(b is not None for b in nbytes) else None
    maxes = [p.max_token for p in parts]
    max_token = max(maxes) if all(m is not None for m in maxes) else None
    return Corpus(tokens, starts, name=name, vocab_size=vocab, num_bytes=num_bytes, max_token=max_token)
