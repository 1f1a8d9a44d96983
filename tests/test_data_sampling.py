"""loom.data's corpus and sampling: pure functions of (seed, sample number)."""
import math

import numpy as np
import pytest
import torch

from loom.data import Corpus, DocumentDraws, SamplePosition, TokenWindows, permute


def _corpus(lengths, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=sum(lengths)).astype(np.uint16)
    return Corpus(tokens, np.cumsum([0] + list(lengths[:-1])), name="toy", vocab_size=vocab)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_is_a_bijection_and_keyed(n):
    p = permute(np.arange(n), n, 5, 0)
    assert sorted(p.tolist()) == list(range(n))
    if n > 8:
        assert not np.array_equal(p, permute(np.arange(n), n, 5, 1))  # another epoch, another order
        assert not np.array_equal(p, permute(np.arange(n), n, 6, 0))  # another seed, another order
    assert np.array_equal(permute([n - 1, 0], n, 5, 0), p[[n - 1, 0]])  # per index, no state
    with pytest.raises(ValueError):
        permute([n], n, 5, 0)


def test_windows_are_a_pure_function_of_step_and_index():
    c = _corpus([30, 5, 50, 17, 40])
    w = TokenWindows(c, 8, 4, seed=3)
    x, y = w.batch(2, range(4))
    x1, y1 = TokenWindows(c, 8, 4, seed=3).batch(2, [1, 3])
    assert torch.equal(x[[1, 3]], x1) and torch.equal(y[[1, 3]], y1)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert x.dtype == torch.int64 and x.shape == (4, 8)
    # every window of an epoch exactly once: windows start at multiples of seq_len
    n = w.num_windows
    assert n == (len(c) - 1) // 8
    steps = math.ceil(n / 4)
    starts = np.concatenate([w._starts(s, range(4)) for s in range(steps)])[:n]
    assert sorted(starts.tolist()) == [8 * i for i in range(n)]
    # the next epoch is another order of the same windows
    epoch2 = np.concatenate([w._starts(s, range(4)) for s in range(steps, 2 * steps)])
    assert not np.array_equal(starts[:8], epoch2[:8])


def test_cu_seqlens_are_the_documents_inside_each_row():
    c = _corpus([10, 3, 20, 1, 9, 30])
    w = TokenWindows(c, 8, 3, seed=0, shuffle=False)
    cu = w.cu_seqlens(0, range(3)).tolist()
    starts = set(c.doc_starts.tolist())
    want = [0]
    for r in range(3):
        a = 8 * r  # shuffle=False: window r starts at 8 * r
        want += [r * 8 + s - a for s in range(a + 1, a + 8) if s in starts] + [(r + 1) * 8]
    assert cu == want
    assert w.cu_seqlens(0, range(3)).dtype == torch.int64
    assert TokenWindows(c, 8, 3, documents=False).cu_seqlens(0, range(3)) is None


def test_resume_continues_at_the_saved_sample_even_with_another_batch_size():
    c = _corpus([100] * 5)
    w = TokenWindows(c, 4, 6, seed=1)
    position = w.position(5)
    assert position == SamplePosition(5, 30, 30 // w.num_windows, 30 % w.num_windows, w.fingerprint())
    # what is drawn from: the batch size is not part of it, the data, window length and seed are
    assert TokenWindows(c, 4, 3, seed=1).fingerprint() == w.fingerprint()
    assert len({w.fingerprint(), TokenWindows(c, 5, 6, seed=1).fingerprint(),
                TokenWindows(c, 4, 6, seed=2).fingerprint(), TokenWindows(c.slice(0, 400), 4, 6, seed=1).fingerprint(),
                DocumentDraws(c, 6, 4, seed=1).fingerprint()}) == 5
    resumed = TokenWindows(c, 4, 3, seed=1)  # half the batch after the resume
    resumed.resume(position.to_dict())
    x, _ = w.batch(5, range(6))
    a, _ = resumed.batch(5, range(3))
    b, _ = resumed.batch(6, range(3))
    assert torch.equal(torch.cat([a, b]), x)
    assert resumed.position(7).samples == 36


def test_document_draws_give_whole_documents_cut_at_max_len():
    c = _corpus([1, 12, 3, 40, 2])
    d = DocumentDraws(c, 4, max_len=10, seed=0)
    assert len(d.eligible) == 4  # the one-token document has nothing to predict
    docs = d.documents(0)
    lengths = sorted(len(t) for t in docs)
    assert lengths == [2, 3, 11, 11]  # 12 and 40 tokens cut to max_len + 1
    for t in docs:
        starts = c.doc_starts.tolist()
        assert any(np.array_equal(t.numpy(), c.read(s, len(t))) for s in starts)
    assert [len(t) for t in d.documents(0)] == [len(t) for t in docs]  # pure


def test_split_holds_out_the_tail_at_a_document_start():
    c = _corpus([50, 50, 50, 50])
    train, val = c.split(0.3)
    assert len(train) == 150 and len(val) == 50  # the start nearest to 140
    assert np.array_equal(val.read(0, 50), c.read(150, 50))
    assert val.doc_starts.tolist() == [0]
    assert c.split(0.0) == (c, None)
    with pytest.raises(ValueError, match="too few"):
        Corpus(np.zeros(1, dtype=np.uint16)).split(0.5)


def test_bad_document_index_and_vocab_and_short_corpus_are_named():
    tokens = np.arange(20, dtype=np.uint16)
    with pytest.raises(ValueError, match="beyond the last token"):
        Corpus(tokens, [0, 5, 25], name="t.bin")
    with pytest.raises(ValueError, match="follows"):
        Corpus(tokens, [0, 9, 5], name="t.bin")
    Corpus(tokens, [0, 5, 5, 20])  # empty documents and an end sentinel are fine
    with pytest.raises(ValueError, match=r"token id 16 at offset 16 .* raise --vocab to at least 20"):
        Corpus(tokens).check_vocab(16)
    with pytest.raises(ValueError, match="shorter than one window"):
        TokenWindows(Corpus(tokens, name="t.bin"), 20, 2)
    TokenWindows(Corpus(tokens), 19, 2)  # 20 tokens: exactly one window


def test_unigram_entropy():
    c = Corpus(np.array([0, 0, 1, 2] * 10, dtype=np.uint8), num_bytes=40)
    e = c.unigram_entropy(3)
    assert e.bits_per_token == pytest.approx(1.5)
    assert e.bits_per_byte == pytest.approx(1.5)
