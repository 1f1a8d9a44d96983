"""A corpus: one stream of token ids cut into documents.

Every source (token files, text, the built-in default) becomes a `Corpus`;
sampling (`loom.data.sampling`) only needs ``len``, `read` and the document
starts.  The tokens stay where they are (a memory map, an in-memory array, a
remote file read by ranges): a `Corpus` reads only the windows asked for.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .streams import ConcatTokens

log = logging.getLogger("loom.data")

SCAN_CHUNK = 1 << 22  # tokens per chunk when a whole corpus is scanned (max id, counts)


class Corpus:
    """Token ids ``0 .. len(tokens) - 1`` of one or more documents.

    ``tokens``: anything with ``len()`` whose slices ``tokens[a:b]`` are
    integer numpy arrays (an ``np.ndarray``, an ``np.memmap``, a reader of a
    remote file).  ``doc_starts``: the offsets where documents start, int64,
    strictly increasing, the first 0 (added when missing), all below
    ``len(tokens)``; None: the whole stream is one document.
    ``vocab_size``: the tokenizer's vocabulary, when known.  ``num_bytes``:
    the UTF-8 bytes of the text the tokens came from, when known (for bits
    per byte).  ``max_token``: the largest token id, when a source knows it
    without reading the tokens (prepare's metadata; text tokenised in
    memory); kept as ``max_token_bound``, an upper bound on every id (a
    `slice` keeps its parent's, which may be larger than its own ids).
    ``name``: what error messages call it.

    Raises ValueError when the document starts do not fit the tokens."""

    def __init__(self, tokens, doc_starts=None, *, name: str = "corpus", vocab_size: int | None = None,
                 num_bytes: int | None = None, max_token: int | None = None):
        self.tokens, self.name = tokens, name
        self.vocab_size, self.num_bytes = vocab_size, num_bytes
        if max_token is not None and (not isinstance(max_token, (int, np.integer)) or max_token < -1):
            raise ValueError(f"{name}: max_token={max_token!r} must be a token id (an integer >= -1)")
        self.max_token_bound = None if max_token is None else int(max_token)
        n = len(tokens)
        starts = np.zeros(1, dtype=np.int64) if doc_starts is None else \
            np.asarray(doc_starts, dtype=np.int64).reshape(-1)
        if len(starts) and np.all(np.diff(starts) >= 0):
            # an end sentinel (offset n) and empty documents (repeated offsets) are tolerated
            starts = np.unique(starts[starts < n]) if starts[-1] <= n else starts
        if n and (len(starts) == 0 or starts[0] != 0):
            starts = np.concatenate([np.zeros(1, dtype=np.int64), starts])
        if n == 0:
            starts = np.zeros(0, dtype=np.int64)
        if len(starts) and (np.any(np.diff(starts) <= 0) or starts[0] < 0 or starts[-1] >= n):
            bad = _first_bad_start(starts, n)
            raise ValueError(f"{name}: the document index does not match the tokens: {bad} "
                             f"(offsets must increase strictly from 0 and stay below the {n} tokens)")
        self.doc_starts = starts

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)

    def doc_lengths(self) -> np.ndarray:
        """Tokens per document, int64 ``[num_documents]``."""
        return np.diff(np.append(self.doc_starts, len(self)))

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens ``[start, start + count)`` as int64.  Raises ValueError when
        the range leaves the corpus."""
        if start < 0 or count < 0 or start + count > len(self):
            raise ValueError(f"{self.name}: tokens [{start}, {start + count}) are outside its {len(self)} tokens")
        return np.array(self.tokens[start:start + count], dtype=np.int64)  # a copy: never a view of the file

    def read_windows(self, starts, length: int) -> np.ndarray:
        """Tokens ``[a, a + length)`` for every ``a`` in ``starts``, int64
        ``[len(starts), length]`` (one gather when the tokens are an array or
        a memory map).  Raises ValueError when a window leaves the corpus."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if len(starts) and (starts.min() < 0 or starts.max() + length > len(self)):
            bad = int(starts[(starts < 0) | (starts + length > len(self))][0])
            raise ValueError(f"{self.name}: tokens [{bad}, {bad + length}) are outside its {len(self)} tokens")
        if isinstance(self.tokens, np.ndarray):  # np.memmap included: read only the windows' pages
            return self.tokens[starts[:, None] + np.arange(length)].astype(np.int64)
        if isinstance(self.tokens, _Window) and isinstance(self.tokens.tokens, np.ndarray):
            return self.tokens.tokens[self.tokens.start + starts[:, None] + np.arange(length)].astype(np.int64)
        return np.stack([self.read(int(a), length) for a in starts]) if len(starts) else \
            np.empty((0, length), dtype=np.int64)

    def documents_in(self, starts, length: int) -> list[np.ndarray]:
        """For each window ``[a, a + length)``: the offsets (relative to ``a``)
        of the documents that start inside it after its first token."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        lo = np.searchsorted(self.doc_starts, starts, side="right")
        hi = np.searchsorted(self.doc_starts, starts + length, side="left")
        return [self.doc_starts[i:j] - a for i, j, a in zip(lo.tolist(), hi.tolist(), starts.tolist())]

    def slice(self, start: int, stop: int, name: str | None = None) -> "Corpus":
        """Tokens ``[start, stop)`` as a corpus of their own (a view, no copy);
        a document cut at ``start`` starts there."""
        inner = self.doc_starts[(self.doc_starts >= start) & (self.doc_starts < stop)] - start
        num_bytes = None if self.num_bytes is None or not len(self) else \
            round(self.num_bytes * (stop - start) / len(self))
        return Corpus(_Window(self.tokens, start, stop), inner, name=name or f"{self.name}[{start}:{stop}]",
                      vocab_size=self.vocab_size, num_bytes=num_bytes, max_token=self.max_token_bound)

    def split(self, val_fraction: float) -> tuple["Corpus", "Corpus | None"]:
        """(train, validation): the last ``val_fraction`` of the tokens, cut at
        the document start nearest to that point, held out (None for 0).
        Raises ValueError when the fraction is outside [0, 1) or leaves either
        part without a document."""
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        if val_fraction == 0:
            return self, None
        target = len(self) * (1 - val_fraction)
        inner = self.doc_starts[1:]
        if len(inner):
            cut = int(inner[np.argmin(np.abs(inner - target))])
        else:  # one document: cut it (its two parts are the only documents there are)
            cut = int(round(target))
        if not 0 < cut < len(self):
            raise ValueError(f"{self.name}: {len(self)} tokens are too few to hold out a validation split of "
                             f"{val_fraction:g}")
        return self.slice(0, cut, f"{self.name} (train)"), self.slice(cut, len(self), f"{self.name} (val)")

    def scan(self):
        """``(offset, chunk)`` over the whole corpus in chunks (never all of it in memory)."""
        for a in range(0, len(self), SCAN_CHUNK):
            yield a, self.read(a, min(SCAN_CHUNK, len(self) - a))

    @property
    def local(self) -> bool:
        """Whether the tokens are in memory or memory-mapped (``np.ndarray``,
        ``np.memmap``, windows and concatenations of them): a whole scan
        is cheap.  False for remote files read by ranges and anything else."""
        return _is_local(self.tokens)

    def source_offset(self, offset: int) -> int:
        """Where token ``offset`` of this corpus is in the corpus it was
        sliced from (itself when it is not a slice)."""
        tokens = self.tokens
        while isinstance(tokens, _Window):
            offset, tokens = offset + tokens.start, tokens.tokens
        return offset

    def where(self, offset: int) -> str:
        """How messages name token ``offset``: ``offset N`` (and its offset
        in the whole corpus when this is a slice)."""
        whole = self.source_offset(offset)
        return f"offset {offset}" if whole == offset else f"offset {offset} (offset {whole} of the whole corpus)"

    def check_vocab(self, vocab: int) -> None:
        """Raise ValueError naming the first token id outside ``[0, vocab)``
        and where it is; return None when every id is inside.

        In memory or memory-mapped tokens (`local`) are scanned chunk by
        chunk (cheap, exact).  Other (remote) tokens are not read when
        ``max_token_bound`` says every id is below ``vocab`` (metadata is
        trusted here; `TokenWindows`/`DocumentDraws` given ``vocab`` check
        every batch they read); without such a bound the whole corpus is
        downloaded and scanned, with a warning through the
        ``loom.data`` logger."""
        bound = self.max_token_bound
        if not self.local:
            if bound is not None and bound < vocab:
                log.debug("%s: metadata bounds its token ids by %d < vocab %d; not scanned", self.name, bound, vocab)
                return
            log.warning("%s: checking its token ids against --vocab %d reads the whole corpus (%d tokens) "
                        "from remote storage%s", self.name, vocab, len(self),
                        "" if bound is None else f" (its metadata's max_token {bound} is not below it)")
        for offset, chunk in self.scan():
            i = first_outside(chunk, vocab)
            if i is not None:
                if not self.local and bound is not None and bound >= int(chunk[i]):
                    need = bound + 1  # an upper bound on what the ids need; no second download
                else:
                    need = self.max_token() + 1
                if self.vocab_size is not None and self.vocab_size > need:  # ids a part not scanned may use
                    need = f"{self.vocab_size} (its tokenizer's vocabulary)"
                raise ValueError(f"{self.name}: token id {int(chunk[i])} at {self.where(offset + i)} is outside "
                                 f"the model's vocabulary [0, {vocab}): raise --vocab to at least "
                                 f"{need}, or use the tokenizer the corpus was made with")

    def max_token(self) -> int:
        """The largest token id (-1 for an empty corpus)."""
        return max((int(chunk.max()) for _, chunk in self.scan() if len(chunk)), default=-1)

    def token_counts(self, vocab: int) -> np.ndarray:
        """How often each id ``0 .. vocab - 1`` occurs, int64 ``[vocab]``."""
        counts = np.zeros(vocab, dtype=np.int64)
        for _, chunk in self.scan():
            counts += np.bincount(chunk, minlength=vocab)[:vocab]
        return counts

    def unigram_entropy(self, vocab: int) -> "Entropy":
        """The order-0 entropy of the tokens: what a model that knows only
        each id's frequency would pay per token."""
        counts = self.token_counts(vocab)
        p = counts[counts > 0] / max(1, counts.sum())
        bits = float(-(p * np.log2(p)).sum())
        per_byte = None if not self.num_bytes else bits * len(self) / self.num_bytes
        return Entropy(bits, per_byte)


@dataclass(frozen=True)
class Entropy:
    bits_per_token: float
    bits_per_byte: float | None  # None when the corpus does not know its text's bytes

    @property
    def nats_per_token(self) -> float:
        return self.bits_per_token * math.log(2)


class _Window:
    """Tokens ``[start, stop)`` of another token sequence, sliceable like it."""

    def __init__(self, tokens, start: int, stop: int):
        self.tokens, self.start, self.stop = tokens, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, item):
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("token windows are read by contiguous slices")
        a, b, _ = item.indices(len(self))
        return self.tokens[self.start + a:self.start + max(a, b)]


def first_outside(ids: np.ndarray, vocab: int) -> int | None:
    """Flat index of the first id of ``ids`` outside ``[0, vocab)``, None
    when there is none (one pass on the common path: a signed array viewed
    as unsigned puts negative ids above every vocabulary)."""
    if not ids.size:
        return None
    if ids.dtype.kind == "i" and ids.flags.c_contiguous:
        inside = int(ids.view(ids.dtype.str.replace("i", "u")).max()) < vocab
    else:
        inside = int(ids.max()) < vocab and (ids.dtype.kind == "u" or int(ids.min()) >= 0)
    if inside:
        return None
    return int(np.flatnonzero((ids.reshape(-1) < 0) | (ids.reshape(-1) >= vocab))[0])


def _is_local(tokens) -> bool:
    if isinstance(tokens, np.ndarray):  # np.memmap included
        return True
    if isinstance(tokens, _Window):
        return _is_local(tokens.tokens)
    if isinstance(tokens, ConcatTokens):
        return all(_is_local(p) for p in tokens.parts)
    return False


def _first_bad_start(starts: np.ndarray, n: int) -> str:
    if starts[0] < 0:
        return f"offset {int(starts[0])} is negative"
    if starts[-1] >= n:
        return f"offset {int(starts[-1])} is beyond the last token ({n - 1})"
    i = int(np.flatnonzero(np.diff(starts) <= 0)[0])
    return f"offset {int(starts[i + 1])} follows {int(starts[i])}"
