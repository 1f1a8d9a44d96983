"""launch.batches.StepBatches: prefetching the next step changes nothing of what a step sees."""
import numpy as np
import pytest
import torch

from loom.data import Corpus, TokenWindows
from loom.launch.batches import StepBatches


class _Mesh:  # what StepBatches and rank_batch read of a mesh
    def __init__(self, dp, dp_rank, sp=1, sp_rank=0):
        self.dp, self.dp_rank, self.sp, self.sp_rank = dp, dp_rank, sp, sp_rank


def _windows():
    tokens = np.random.default_rng(0).integers(0, 50, size=2000).astype(np.uint16)
    return TokenWindows(Corpus(tokens, [0, 30, 300, 301, 1200]), 16, 8, seed=2)


def _same(a, b):
    for (x, y, cx), (u, v, cu) in zip(a, b):
        assert torch.equal(x, u) and torch.equal(y, v)
        assert cx.keys() == cu.keys() and torch.equal(cx["cu_seqlens"], cu["cu_seqlens"])


@pytest.mark.parametrize("sp", [1, 2])
def test_prefetched_steps_equal_inline_steps(sp):
    mesh = _Mesh(dp=2, dp_rank=1, sp=sp, sp_rank=sp - 1)
    inline = StepBatches(_windows(), mesh, "zigzag", torch.device("cpu"), batch_size=8, grad_accum=2,
                         prefetch=False)
    ahead = StepBatches(_windows(), mesh, "zigzag", torch.device("cpu"), batch_size=8, grad_accum=2,
                        prefetch=True)
    try:
        for step in range(5):
            got = ahead.get(step, step + 1 if step < 4 else None)
            want = inline.get(step)
            assert len(got) == 2 and got[0][0].shape == (2, 16 // sp)
            _same(got, want)
        _same(ahead.get(2, None), inline.get(2))  # a step not prefetched (a resume) is fetched inline
    finally:
        ahead.close()
        inline.close()


def test_a_loader_error_is_raised_by_the_step_that_needs_it():
    class Broken:
        def batch(self, step, indices):
            if step == 1:
                raise ValueError("corpus went away at step 1")
            return torch.zeros(len(indices), 4, dtype=torch.long), torch.zeros(len(indices), 4, dtype=torch.long)

    batches = StepBatches(Broken(), _Mesh(1, 0), "contiguous", torch.device("cpu"), batch_size=2, prefetch=True)
    try:
        batches.get(0, 1)  # step 1 is prepared in the background: its error waits for step 1
        with pytest.raises(ValueError, match="step 1"):
            batches.get(1, 2)
    finally:
        batches.close()
