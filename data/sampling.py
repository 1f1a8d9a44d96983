"""Deterministic sampling of training windows and documents from a `Corpus`.

Every sample is a pure function of (seed, sample number): sample number
``g`` of a run is window ``permutation_epoch(g // n)[g % n]`` of the ``n``
non-overlapping windows of the corpus (Megatron's per-epoch shuffle, without
materialising an index: the permutation is a keyed Feistel network, computed
per sample in O(1)).  With a fixed global batch the sample number of
``(step, index)`` is ``step * batch_size + index``, so every parallel layout
sees the same global batch; a resumed run continues from the sample number
its checkpoint recorded (`SamplePosition`), so it repeats the uninterrupted
run even when the batch size changed.

Windows are ``seq_len + 1`` tokens (inputs and shifted targets) starting at
multiples of ``seq_len``.  They pack documents as the corpus has them; the
document boundaries inside each window come back as ``cu_seqlens`` (the
flash-attn varlen convention over the batch flattened row-major: from 0 to
``batch * seq_len``, every row boundary included) so that attention stays
inside documents.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .corpus import Corpus, first_outside

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_ROUNDS = 4
_SMALL = 64  # permute computes up to this many indices with Python ints


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix_int(x: int) -> int:
    """`_mix` on one Python int (the same 64-bit result, without numpy's per-call cost)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=4096)  # round keys repeat for every batch of an epoch
def _key(*parts: int) -> np.uint64:
    h = 0x243F6A8885A308D3
    for part in parts:
        h = _mix_int(h ^ (int(part) & 0xFFFFFFFFFFFFFFFF))
    return np.uint64(h)


def permute(indices, n: int, *keys: int) -> np.ndarray:
    """Positions ``indices`` (ints in ``[0, n)``) of a pseudo-random
    permutation of ``range(n)`` keyed by ``keys`` (e.g. seed and epoch):
    a bijection, computed per index without building the permutation
    (a balanced Feistel network on the next even power of two, cycle-walking
    back into ``[0, n)``).  Returns int64 values in ``[0, n)``."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if n < 1 or (len(idx) and (idx.min() < 0 or idx.max() >= n)):
        raise ValueError(f"permute: indices must be in [0, {n})")
    if n == 1:
        return np.zeros_like(idx)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    round_keys = [_key(*keys, r) for r in range(_ROUNDS)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & low
        for k in round_keys:
            left, right = right, left ^ (_mix(right ^ k) & low)
        return (left << np.uint64(half)) | right

    if len(idx) <= _SMALL:  # a batch's worth: Python ints beat numpy's per-call cost
        keys_int, mask = [int(k) for k in round_keys], (1 << half) - 1

        def feistel_int(x: int) -> int:
            left, right = x >> half, x & mask
            for k in keys_int:
                left, right = right, left ^ (_mix_int(right ^ k) & mask)
            return (left << half) | right

        small = []
        for x in idx.tolist():
            x = feistel_int(x)
            while x >= n:
                x = feistel_int(x)
            small.append(x)
        return np.array(small, dtype=np.int64)
    out = feistel(idx.astype(np.uint64))
    walking = out >= np.uint64(n)
    while walking.any():  # a bijection on [0, 4^half) restricted to [0, n): at most a few walks
        out[walking] = feistel(out[walking])
        walking = out >= np.uint64(n)
    return out.astype(np.int64)


@dataclass(frozen=True)
class SamplePosition:
    """Where a run is in its data: sample number ``samples`` is the first of
    step ``step`` (``epoch``/``index`` say where that is in the corpus).
    ``fingerprint`` identifies what the samples are drawn from (`_Draws.fingerprint`:
    the corpus's size and documents, the window length, the seed), so that a
    resume can tell whether it continues the same data."""
    step: int
    samples: int
    epoch: int
    index: int
    fingerprint: int = 0

    def to_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples, "epoch": self.epoch, "index": self.index,
                "fingerprint": self.fingerprint}


class _Draws:
    """Sample numbers of (step, index): ``base + (step - base_step) * batch_size + index``."""

    def __init__(self, batch_size: int, count: int, seed: int, shuffle: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.batch_size, self.count, self.seed, self.shuffle = batch_size, count, seed, shuffle
        self.base_step, self.base_samples = 0, 0
        self._last = None

    def sample_number(self, step: int, index: int) -> int:
        return self.base_samples + (step - self.base_step) * self.batch_size + index

    def items(self, step: int, indices) -> np.ndarray:
        """The item (window or document) each sample of ``(step, indices)`` draws, int64.
        Raises ValueError for a negative step or an index outside ``[0, batch_size)`` (which
        would silently draw another step's samples)."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < self.batch_size]
        if bad:
            raise ValueError(f"sample index {bad[0]} is outside the global batch [0, {self.batch_size}) of "
                             f"step {step}: a step draws batch_size={self.batch_size} samples")
        g = np.array([self.sample_number(step, i) for i in indices], dtype=np.int64)
        if step < 0 or (len(g) and g.min() < 0):
            raise ValueError(f"step {step} comes before the first sample (steps count from 0, and from the "
                             f"resumed step {self.base_step} after resume())")
        epochs, pos = np.divmod(g, self.count)
        if not self.shuffle:
            return pos
        out = np.empty_like(pos)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = permute(pos[here], self.count, self.seed, int(epoch))
        return out

    def position(self, step: int) -> SamplePosition:
        g = self.sample_number(step, 0)
        return SamplePosition(step, g, g // self.count, g % self.count, self.fingerprint())

    def describe(self) -> tuple:
        """What the samples are drawn from (subclasses add their source)."""
        return (type(self).__name__, self.count, self.seed, self.shuffle)

    def fingerprint(self) -> int:
        """A 63-bit digest of `describe` (the same on every rank and every run
        that draws the same samples; the batch size is not part of it)."""
        digest = hashlib.sha256(repr(self.describe()).encode()).digest()
        return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF

    def _guard(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """``ids`` (int64, ``[rows, n]``, row ``r`` read from corpus offset
        ``offsets[r]``) back unchanged when every id is below ``vocab`` (or
        no ``vocab`` was given); else ValueError naming the corpus, the id,
        its offset and --vocab."""
        if self.vocab is None:
            return ids
        i = first_outside(ids, self.vocab)
        if i is None:
            return ids
        r, c = divmod(i, ids.shape[-1])
        corpus = self.corpus
        raise ValueError(f"{corpus.name}: token id {int(ids.reshape(-1)[i])} at {corpus.where(int(offsets[r]) + c)} "
                         f"is outside the model's vocabulary [0, {self.vocab}) (--vocab {self.vocab}), found in "
                         "a batch: the data changed after it was checked, or its metadata's max_token is wrong; "
                         "re-prepare the data (or fix its metadata) or raise --vocab")

    def resume(self, position: SamplePosition | dict) -> None:
        """Continue from a saved position: step ``position.step`` starts at
        sample number ``position.samples``."""
        p = position if isinstance(position, SamplePosition) else SamplePosition(**position)
        if p.samples < 0 or p.step < 0:
            raise ValueError(f"data position {p} must have step and samples >= 0")
        self.base_step, self.base_samples = p.step, p.samples
        self._last = None


class TokenWindows(_Draws):
    """Training (or held-out) windows of ``seq_len + 1`` tokens of ``corpus``.

    ``batch_size``: samples per global batch (the step's sample numbers).
    ``shuffle``: a seeded permutation per epoch (False: windows in order,
    for held-out data).  ``documents``: return document boundaries
    (`cu_seqlens`); False packs documents with plain causal attention across
    them.  ``vocab``: the model's vocabulary; every batch read is then
    checked (on the tokens already read: a max and a min) and an id outside
    ``[0, vocab)`` raises ValueError naming the corpus, the id and its
    offset (None: no check).  Raises ValueError when the corpus is shorter
    than one window."""

    def __init__(self, corpus: Corpus, seq_len: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 documents: bool = True, vocab: int | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        count = (len(corpus) - 1) // seq_len
        if count < 1:
            raise ValueError(f"{corpus.name} holds {len(corpus)} tokens: shorter than one window of "
                             f"--seq-len + 1 = {seq_len + 1} tokens (use more data or a shorter --seq-len)")
        super().__init__(batch_size, count, seed, shuffle)
        self.corpus, self.seq_len, self.documents, self.vocab = corpus, seq_len, documents, _vocab(vocab)

    def describe(self) -> tuple:
        c = self.corpus
        return super().describe() + (self.seq_len, len(c), c.num_documents)  # the samples, not the masking

    @property
    def num_windows(self) -> int:
        """Windows per epoch."""
        return self.count

    def _starts(self, step: int, indices) -> np.ndarray:
        key = (step, tuple(int(i) for i in indices))
        if self._last is None or self._last[0] != key:  # batch() and cu_seqlens() of one batch draw once
            self._last = (key, self.items(step, key[1]) * self.seq_len)
        return self._last[1]

    def batch(self, step: int, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 ``[len(indices), seq_len]``, for
        sample ``indices`` of global batch ``step``.  Raises ValueError for
        an id outside ``[0, vocab)`` when ``vocab`` was given."""
        starts = self._starts(step, indices)
        seqs = torch.from_numpy(self._guard(self.corpus.read_windows(starts, self.seq_len + 1), starts))
        return seqs[:, :-1], seqs[:, 1:]

    def cu_seqlens(self, step: int, indices) -> torch.Tensor | None:
        """Document boundaries of the inputs of ``batch(step, indices)``: int64
        ``[0, ..., len(indices) * seq_len]`` with every row boundary; None
        when ``documents`` is False."""
        if not self.documents:
            return None
        parts = [np.zeros(1, dtype=np.int64)]
        for r, inner in enumerate(self.corpus.documents_in(self._starts(step, indices), self.seq_len)):
            parts += [r * self.seq_len + inner, np.array([(r + 1) * self.seq_len], dtype=np.int64)]
        return torch.from_numpy(np.concatenate(parts))


class DocumentDraws(_Draws):
    """Whole documents of ``corpus`` for variable-length batches (hybrid data
    parallelism): sample ``g`` is document ``permutation_epoch[g % n]`` of the
    ``n`` documents with at least two tokens, its first ``max_len + 1``
    tokens (a longer document is cut there).  ``vocab``: as for
    `TokenWindows`, every document read is checked against it.  Raises
    ValueError when no document has two tokens."""

    def __init__(self, corpus: Corpus, batch_size: int, max_len: int, *, seed: int = 0, vocab: int | None = None):
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be >= 1")
        lengths = corpus.doc_lengths()
        self.eligible = np.flatnonzero(lengths >= 2)
        if not len(self.eligible):
            raise ValueError(f"{corpus.name} has no document of two or more tokens to train on")
        super().__init__(batch_size, len(self.eligible), seed, shuffle=True)
        self.corpus, self.max_len, self._lengths, self.vocab = corpus, max_len, lengths, _vocab(vocab)

    def describe(self) -> tuple:
        c = self.corpus
        return super().describe() + (self.max_len, len(c), c.num_documents)

    def documents(self, step: int, count: int | None = None) -> list[torch.Tensor]:
        """The ``count`` (default ``batch_size``) documents of step ``step``,
        each int64 ``[length + 1]`` (inputs and shifted targets), length <= max_len.
        Raises ValueError for an id outside ``[0, vocab)`` when ``vocab`` was given."""
        docs = self.eligible[self.items(step, range(self.batch_size if count is None else count))]
        out = []
        for d in docs:
            n = min(int(self._lengths[d]), self.max_len + 1)
            start = int(self.corpus.doc_starts[d])
            out.append(torch.from_numpy(self._guard(self.corpus.read(start, n)[None], np.array([start]))[0]))
        return out


def _vocab(vocab) -> int | None:
    if vocab is not None and (not isinstance(vocab, (int, np.integer)) or isinstance(vocab, bool) or vocab < 1):
        raise ValueError(f"vocab={vocab!r} must be the model's vocabulary size (an integer >= 1) or None")
    return None if vocab is None else int(vocab)
