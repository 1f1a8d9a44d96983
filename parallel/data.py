"""A deterministic synthetic data source with a learnable task.

Each sequence is an arithmetic progression modulo ``vocab`` whose stride is one
of a few values; the model must infer the stride from context.  A bigram model
gets stuck at log(num_strides); attention solves it, so the loss falls clearly
within a hundred steps.  Every sample is a pure function of
(seed, split, step, index), so any parallel layout sees the same global batch.

``split="val"`` is the held-out stream: its samples are drawn from generators
keyed with a salt the training stream never uses, so no held-out draw is a
training draw.  (The task has only ``vocab * num_strides`` distinct
sequences of a given length, so a held-out sequence may still have the
tokens of some training sequence: held out are the draws, as with a
validation split of one distribution; real corpora bring real splits.)
"""
from __future__ import annotations

import math

import torch

_STRIDES = (1, 2, 3, 5, 7, 11, 13, 17)
_SPLIT_SALT = {"train": None, "val": 0x76616C5F686F6C64}  # "val_hold": an extra first key for held-out draws


def _generator(*keys: int) -> torch.Generator:
    h = 0x9E3779B97F4A7C15
    for key in keys:  # splitmix-style mixing of the keys into one 63-bit seed
        h = (h ^ (int(key) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


class SyntheticData:
    """``split``: "train" (the training stream) or "val" (held-out draws)."""

    def __init__(self, vocab: int, seq_len: int, seed: int = 0, num_strides: int = 4, split: str = "train"):
        if vocab < 2 or seq_len < 1:
            raise ValueError(f"vocab={vocab} must be >= 2 and seq_len={seq_len} >= 1")
        if not 1 <= num_strides <= len(_STRIDES):
            raise ValueError(f"num_strides={num_strides} must be in [1, {len(_STRIDES)}]")
        if split not in _SPLIT_SALT:
            raise ValueError(f"split={split!r} must be one of {list(_SPLIT_SALT)}")
        self.vocab, self.seq_len, self.seed, self.split = vocab, seq_len, seed, split
        self.strides = _STRIDES[:num_strides]

    def heldout(self) -> "SyntheticData":
        """The same task's held-out stream (``split="val"``)."""
        return SyntheticData(self.vocab, self.seq_len, self.seed, len(self.strides), split="val")

    def _generator(self, *keys: int) -> torch.Generator:
        salt = _SPLIT_SALT[self.split]
        return _generator(self.seed, *keys) if salt is None else _generator(salt, self.seed, *keys)

    def sample(self, step: int, index: int, length: int | None = None) -> torch.Tensor:
        """Tokens of one sequence, ``length + 1`` long (inputs and shifted targets)."""
        length = self.seq_len if length is None else length
        g = self._generator(step, index)
        start = int(torch.randint(self.vocab, (1,), generator=g))
        stride = self.strides[int(torch.randint(len(self.strides), (1,), generator=g))]
        return (start + stride * torch.arange(length + 1)) % self.vocab

    def batch(self, step: int, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [len(indices), seq_len], for global sample indices."""
        seqs = torch.stack([self.sample(step, i) for i in indices]) if len(indices) else \
            torch.empty(0, self.seq_len + 1, dtype=torch.long)
        return seqs[:, :-1], seqs[:, 1:]

    def lengths(self, step: int, count: int, *, median: int | None = None, sigma: float = 1.0,
                max_len: int | None = None) -> list[int]:
        """Long-tail (lognormal) sequence lengths for a variable-length batch."""
        median = median or max(1, self.seq_len // 4)
        max_len = max_len or self.seq_len * 4
        g = self._generator(step, -1)
        z = torch.randn(count, generator=g, dtype=torch.float64)
        return [int(min(max_len, max(1, round(median * math.exp(sigma * float(v)))))) for v in z]

    def varlen_batch(self, step: int, count: int, **length_kw) -> list[torch.Tensor]:
        """``count`` sequences of long-tail lengths, each ``length + 1`` tokens."""
        return [self.sample(step, i, n) for i, n in enumerate(self.lengths(step, count, **length_kw))]
