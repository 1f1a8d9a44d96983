"""Token files: ``.bin`` (raw, headerless) and ``.npy``, with their sidecars.

For a token file ``X.bin`` or ``X.npy``:

- ``X.json`` (optional, written by ``loom data prepare``): metadata
  ``{"format": "loom-tokens", "version": 1, "dtype", "tokens", "documents",
  "vocab_size", "tokenizer": {"name", "sha256"}, "bytes", "max_token"}``,
  checked against the file (the token count must match).  It gives a ``.bin``
  its dtype and a corpus its vocabulary and text bytes (for bits per byte).
- ``X.docs.npy`` (optional): int64 offsets of the document starts (an end
  offset equal to the token count is allowed).

Token dtypes: ``uint8``, ``uint16``, ``uint32``, and ``int32``/``int64``
(scanned once at open for negative ids).  A ``.bin`` without metadata is
``token_dtype`` or ``uint16`` (the nanoGPT convention).  Nothing is ever
unpickled (``allow_pickle=False``, object and structured dtypes refused);
local files are memory-mapped, remote ones read by ranges; no sidecar path
is taken from a file's contents.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import numpy.lib.format as npformat

from .corpus import SCAN_CHUNK, Corpus
from .streams import Part, RangeReader

FORMAT, VERSION = "loom-tokens", 1
TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")
SIGNED = ("int32", "int64")
MAX_SIDECAR_BYTES = 1 << 20  # metadata is a few hundred bytes; refuse anything huge


def base_of(path: str) -> str:
    """``X`` of ``X.bin`` / ``X.npy`` (the stem the sidecars share)."""
    for ext in (".bin", ".npy"):
        if path.endswith(ext):
            return path[:-len(ext)]
    return path


def check_dtype(dtype, where: str) -> np.dtype:
    """``dtype`` as a token dtype; ValueError naming ``where`` otherwise."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise ValueError(f"{where}: dtype {dtype!r} is not a numpy dtype; tokens are one of "
                         f"{', '.join(TOKEN_DTYPES)}") from exc
    if dt.name not in TOKEN_DTYPES:
        raise ValueError(f"{where}: dtype {dt.name} cannot hold token ids; use one of {', '.join(TOKEN_DTYPES)}")
    return dt


def read_metadata(fs, meta_path: str, display: str) -> dict | None:
    """The validated metadata at ``meta_path`` (None when there is none).
    Raises ValueError naming the file when it is not loom-tokens metadata."""
    if not fs.isfile(meta_path):
        return None
    if fs.size(meta_path) > MAX_SIDECAR_BYTES:
        raise ValueError(f"{display}: metadata is over {MAX_SIDECAR_BYTES} bytes; not loom-tokens metadata "
                         "(rewrite it with `loom data prepare` or remove it)")
    try:
        meta = json.loads(fs.cat_file(meta_path))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ValueError(f"{display}: metadata is not valid JSON ({exc}); rewrite it with `loom data prepare` "
                         "or remove it") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{display}: not loom-tokens metadata (no \"format\": \"{FORMAT}\"); "
                         "rename or remove it")
    if meta.get("version") != VERSION:
        raise ValueError(f"{display}: metadata version {meta.get('version')!r}; this loom reads version {VERSION}")

    def count(key, required=True, minimum=0):
        v = meta.get(key)
        if v is None and not required:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ValueError(f"{display}: metadata field {key!r} = {v!r} must be an integer >= {minimum}")

    check_dtype(meta.get("dtype"), f"{display} (field 'dtype')")
    count("tokens")
    count("documents")
    count("vocab_size", required=False, minimum=1)
    if meta.get("vocab_size") is not None and meta["vocab_size"] > 1 << 32:
        raise ValueError(f"{display}: metadata field 'vocab_size' = {meta['vocab_size']} is more ids than any "
                         "token file holds (at most 2**32); rewrite it with `loom data prepare`")
    count("bytes", required=False)
    count("max_token", required=False, minimum=-1)
    tok = meta.get("tokenizer")
    if tok is not None and not (isinstance(tok, dict) and isinstance(tok.get("name"), str)):
        raise ValueError(f"{display}: metadata field 'tokenizer' must be {{\"name\": ..., \"sha256\": ...}}")
    if meta.get("vocab_size") and meta.get("max_token") is not None and meta["max_token"] >= meta["vocab_size"]:
        raise ValueError(f"{display}: metadata says max_token {meta['max_token']} but vocab_size "
                         f"{meta['vocab_size']}; the file was not made by that tokenizer")
    return meta


def _npy_header(fs, path: str, display: str) -> tuple[np.dtype, int, int]:
    """(dtype, token count, data offset) from an ``.npy`` header, without loading the array."""
    try:
        with fs.open(path, "rb") as fh:
            version = npformat.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = npformat.read_array_header_2_0(fh)
            else:
                raise ValueError(f".npy version {version} is not supported (1.0 and 2.0 are)")
            offset = fh.tell()
    except ValueError as exc:
        why = str(exc) if len(str(exc)) <= 200 else str(exc)[:200] + "..."  # a hostile header can be long
        raise ValueError(f"{display}: not a readable .npy token file: {why}") from exc
    if dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"{display}: dtype {dtype} holds Python objects or records, not token ids; "
                         "save a flat uint16/uint32 array")
    if len(shape) != 1:
        raise ValueError(f"{display}: shape {shape}; a token file is one flat array (reshape(-1) it)")
    dtype = check_dtype(dtype, display)
    count, size = int(shape[0]), fs.size(path)
    if count < 0:
        raise ValueError(f"{display}: its header gives a negative length {count}; rewrite it (np.save)")
    if offset + count * dtype.itemsize > size:
        raise ValueError(f"{display}: its header says {count} {dtype.name} tokens ({count * dtype.itemsize} bytes) "
                         f"but the file holds {max(0, size - offset)} bytes after the header: it is truncated or "
                         "its header is wrong; rewrite it (np.save)")
    return dtype, count, offset


def _load_index(fs, path: str, display: str) -> np.ndarray:
    try:
        raw = fs.cat_file(path)
        starts = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"document index {display}: not a readable .npy array ({exc})") from exc
    if not isinstance(starts, np.ndarray) or starts.dtype.kind not in "iu" or starts.ndim != 1:
        raise ValueError(f"document index {display}: must be a flat integer array of document start offsets, "
                         f"not {getattr(starts, 'dtype', type(starts))} {getattr(starts, 'shape', '')}")
    if starts.dtype == np.uint64 and len(starts) and starts.max() > np.iinfo(np.int64).max:
        raise ValueError(f"document index {display}: offset {int(starts.max())} is beyond any token file; "
                         "rebuild it (`loom data prepare`)")
    return starts.astype(np.int64)


def open_token_file(fs, path: str, display: str, *, local: bool, token_dtype=None,
                    doc_index: str | None = None, index_fs=None) -> Part:
    """One token file as a `Part`: memory-mapped when ``local``, else a
    `RangeReader`.  ``doc_index``: an index file (on ``index_fs``) instead of
    the ``X.docs.npy`` sidecar.  Raises ValueError (naming the file and what
    to change) for a bad header, dtype, size, metadata or index."""
    base = base_of(path)
    meta_path = base + ".json"
    meta = read_metadata(fs, meta_path, display_sibling(display, ".json"))
    wanted = None if token_dtype is None else check_dtype(token_dtype, f"token_dtype for {display}")
    meta_dtype = None if meta is None else np.dtype(meta["dtype"])
    if path.endswith(".npy"):
        dtype, count, offset = _npy_header(fs, path, display)
        for other, what in ((meta_dtype, "its metadata"), (wanted, "token_dtype")):
            if other is not None and other != dtype:
                raise ValueError(f"{display}: holds {dtype.name} tokens but {what} says {other.name}; "
                                 "drop the token_dtype or fix the metadata")
    else:
        if meta_dtype is not None and wanted is not None and meta_dtype != wanted:
            raise ValueError(f"{display}: its metadata says {meta_dtype.name} but token_dtype is {wanted.name}; "
                             "drop --token-dtype (the metadata knows)")
        dtype = meta_dtype or wanted or np.dtype(np.uint16)
        size, offset = fs.size(path), 0
        if size % dtype.itemsize:
            raise ValueError(f"{display}: {size} bytes is not a whole number of {dtype.name} tokens "
                             f"({dtype.itemsize} bytes each): pass the dtype it was written with "
                             f"(--token-dtype) or check the file is complete")
        count = size // dtype.itemsize
    if meta is not None and meta["tokens"] != count:
        raise ValueError(f"{display_sibling(display, '.json')}: metadata says {meta['tokens']} tokens, "
                         f"file {display} holds {count}: rerun `loom data prepare` or remove the stale metadata")
    if count == 0:
        tokens = np.zeros(0, dtype=dtype)
    elif not local:
        tokens = RangeReader(fs, path, offset, count, dtype, name=display)
    elif path.endswith(".npy"):
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    else:
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    if dtype.name in SIGNED:
        for a in range(0, count, SCAN_CHUNK):
            block = np.asarray(tokens[a:min(count, a + SCAN_CHUNK)])
            if len(block) and block.min() < 0:
                i = int(np.flatnonzero(block < 0)[0])
                raise ValueError(f"{display}: token id {int(block[i])} at offset {a + i} is negative")

    if doc_index is not None:
        ifs, ipath, idisplay = index_fs, doc_index, doc_index
    else:
        ifs, ipath, idisplay = fs, base + ".docs.npy", display_sibling(display, ".docs.npy")
        if not fs.isfile(ipath):
            ipath = None
    starts = None
    if ipath is not None:
        starts = _load_index(ifs, ipath, idisplay)
        try:
            starts = Corpus(tokens, starts, name=display).doc_starts
        except ValueError as exc:
            why = str(exc).split("does not match the tokens: ", 1)[-1]
            raise ValueError(f"document index {idisplay} does not match {display}: {why}; rebuild it "
                             "(`loom data prepare`) or pass the index made for this file") from exc
        if meta is not None and count and len(starts) != meta["documents"]:
            raise ValueError(f"document index {idisplay} holds {len(starts)} documents but the metadata says "
                             f"{meta['documents']}: rerun `loom data prepare`")
    if starts is None and meta is not None and meta["documents"] > 1 and count:
        raise ValueError(f"{display_sibling(display, '.json')}: metadata says {meta['documents']} documents but "
                         f"their index {display_sibling(display, '.docs.npy')} is missing: restore it, rerun "
                         "`loom data prepare`, or remove the metadata to read the file as one document")
    if starts is None:
        starts = np.zeros(1 if count else 0, dtype=np.int64)
    meta = meta or {}
    return Part(display, tokens, starts, meta.get("vocab_size"), meta.get("bytes"), meta.get("tokenizer"),
                meta.get("max_token"))


def display_sibling(display: str, suffix: str) -> str:
    """How messages name the sidecar ``suffix`` of the token file named ``display``."""
    return base_of(display) + suffix


def write_metadata(path: str, meta: dict) -> None:
    with open(path, "w") as fh:
        json.dump(meta, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
