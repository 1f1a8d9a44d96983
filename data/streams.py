"""Sliceable token streams: a remote file read by ranges, several streams end to end.

`Corpus` needs only ``len(tokens)`` and contiguous slices ``tokens[a:b]``
returning integer numpy arrays.  Local files are `np.memmap`s; these two
classes cover the rest without reading anything whole.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


def _bounds(item, n: int) -> tuple[int, int]:
    if not isinstance(item, slice) or item.step not in (None, 1):
        raise TypeError("token streams are read by contiguous slices")
    a, b, _ = item.indices(n)
    return a, max(a, b)


class RangeReader:
    """``count`` tokens of ``dtype`` at byte ``offset`` of a file on an fsspec
    filesystem (s3://, memory://, ...), read by ranged reads through one
    open handle (reopened after pickling).  Slices are writable numpy
    arrays of ``dtype``; a short read raises ValueError naming the file."""

    def __init__(self, fs, path: str, offset: int, count: int, dtype, name: str | None = None):
        self.fs, self.path, self.offset, self.count = fs, path, int(offset), int(count)
        self.dtype, self.name = np.dtype(dtype), name or path
        self._fh, self._lock = None, threading.Lock()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item) -> np.ndarray:
        a, b = _bounds(item, self.count)
        want = (b - a) * self.dtype.itemsize
        if want == 0:
            return np.zeros(0, dtype=self.dtype)
        with self._lock:
            if self._fh is None:
                self._fh = self.fs.open(self.path, "rb")
            self._fh.seek(self.offset + a * self.dtype.itemsize)
            buf = self._fh.read(want)
        if len(buf) != want:
            raise ValueError(f"{self.name}: read {len(buf)} of {want} bytes at token {a}: the file is shorter "
                             "than its header or metadata says (was it truncated or rewritten while open?)")
        return np.frombuffer(bytearray(buf), dtype=self.dtype)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class ConcatTokens:
    """Token streams end to end, sliceable across their boundaries.  Slices
    have the streams' common dtype (``np.result_type``)."""

    def __init__(self, parts):
        self.parts = [p for p in parts if len(p)]
        self.bounds = np.cumsum([0] + [len(p) for p in self.parts]).astype(np.int64)
        self.dtype = np.result_type(*[_dtype(p) for p in self.parts]) if self.parts else np.dtype(np.int64)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, item) -> np.ndarray:
        a, b = _bounds(item, len(self))
        pieces = []
        i = max(0, int(np.searchsorted(self.bounds, a, side="right")) - 1)
        while a < b:
            lo, hi = int(self.bounds[i]), int(self.bounds[i + 1])
            stop = min(b, hi)
            pieces.append(np.asarray(self.parts[i][a - lo:stop - lo]))
            a, i = stop, i + 1
        if not pieces:
            return np.zeros(0, dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces).astype(self.dtype, copy=False)


def _dtype(tokens) -> np.dtype:
    dt = getattr(tokens, "dtype", None)
    return np.dtype(dt) if dt is not None else np.asarray(tokens[0:1]).dtype


@dataclass
class Part:
    """One source file as a piece of a corpus: its tokens, the document
    starts inside it (int64, relative, from 0), and what it knows of its
    tokenizer (``{"name", "sha256"}`` or None), vocabulary, text bytes and
    largest token id (``max_token``: from metadata or the tokens in memory;
    None when unknown without a scan)."""
    name: str
    tokens: object
    starts: np.ndarray
    vocab_size: int | None = None
    num_bytes: int | None = None
    tokenizer: dict | None = None
    max_token: int | None = None


def eod_starts(tokens, eod_token: int, chunk: int) -> np.ndarray:
    """Offsets that follow a token equal to ``eod_token`` (document starts),
    found chunk by chunk: int64, increasing, all below ``len(tokens)``."""
    n, found = len(tokens), []
    for a in range(0, n, chunk):
        block = np.asarray(tokens[a:min(n, a + chunk)])
        hits = np.flatnonzero(block == eod_token) + a + 1
        found.append(hits[hits < n].astype(np.int64))
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
