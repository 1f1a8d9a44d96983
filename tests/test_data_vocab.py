"""The vocabulary check: the largest token id a source knows without reading,
a driver check that downloads no remote corpus whose metadata bounds its ids,
and the workers' per-batch guard that catches metadata that lies."""
import json
import logging
import uuid

import fsspec
import numpy as np
import pytest

from loom.data import Corpus, DocumentDraws, TokenWindows, open_corpus
from loom.data.builtin import pydoc_corpus
from loom.data.streams import RangeReader
from loom.launch.config import build_config, validate
from loom.launch.datasets import data_problems, open_job_data


def put_tokens(fs, stem, tokens, docs=None, max_token="true", vocab_size=None):
    """``stem``.npy (uint16) on ``fs`` with its metadata; ``max_token``: "true" (the real
    largest id), None (field left out, no metadata at all when ``docs`` is None too) or a
    number (a lie)."""
    arr = np.asarray(tokens, dtype=np.uint16)
    with fs.open(stem + ".npy", "wb") as fh:
        np.save(fh, arr)
    if docs is not None:
        with fs.open(stem + ".docs.npy", "wb") as fh:
            np.save(fh, np.asarray(docs, dtype=np.int64))
    if max_token is not None or docs is not None:
        meta = {"format": "loom-tokens", "version": 1, "dtype": "uint16", "tokens": len(arr),
                "documents": 1 if docs is None else len(docs)}
        if max_token is not None:
            meta["max_token"] = int(arr.max()) if max_token == "true" else max_token
        if vocab_size is not None:
            meta["vocab_size"] = vocab_size
        fs.pipe_file(stem + ".json", json.dumps(meta).encode())
    return arr


@pytest.fixture
def reads(monkeypatch):
    """How many ranged reads of remote token files happen (a list of (path, slice))."""
    seen = []
    real = RangeReader.__getitem__

    def counting(self, item):
        seen.append((self.path, item))
        return real(self, item)

    monkeypatch.setattr(RangeReader, "__getitem__", counting)
    return seen


# ---- 1. what a corpus knows of its largest id -----------------------------------------------------

def test_max_token_bound_comes_from_metadata_text_and_memory(tmp_path, mem):
    fs, root = mem
    put_tokens(fs, f"{root}/a", [3, 9, 4, 1])
    put_tokens(fs, f"{root}/b", [2, 17, 5])
    put_tokens(fs, f"{root}/c", [40, 1, 2], max_token=None)  # no metadata: unknown without a scan
    assert open_corpus(f"memory://{root}/a.npy").max_token_bound == 9
    both = open_corpus([f"memory://{root}/a.npy", f"memory://{root}/b.npy"])
    assert both.max_token_bound == 17 == both.max_token()
    assert open_corpus(f"memory://{root}/c.npy").max_token_bound is None
    assert open_corpus([f"memory://{root}/a.npy", f"memory://{root}/c.npy"]).max_token_bound is None
    (tmp_path / "t.txt").write_text("héllo world\n\n\nzz")  # byte-level: the largest id is the largest byte
    text = open_corpus(str(tmp_path / "t.txt"))
    assert text.max_token_bound == max("héllo world".encode() + b"zz") == text.max_token()
    mixed = open_corpus([str(tmp_path / "t.txt"), f"memory://{root}/b.npy"])
    assert mixed.max_token_bound == max(text.max_token(), 17)
    assert pydoc_corpus().max_token_bound == pydoc_corpus().max_token()
    # slices and splits pass the bound on (an upper bound of their own ids)
    train, val = both.split(0.4)
    assert train.max_token_bound == val.max_token_bound == both.slice(0, 2).max_token_bound == 17
    assert both.slice(0, 2).max_token() == 9
    # existing constructions keep working; a bad bound is named
    assert Corpus(np.arange(5)).max_token_bound is None
    assert Corpus(np.arange(5), max_token=4).max_token_bound == 4
    with pytest.raises(ValueError, match="max_token='x' must be a token id"):
        Corpus(np.arange(5), max_token="x")


def test_local_tokens_are_local_and_remote_ones_are_not(tmp_path, mem):
    fs, root = mem
    put_tokens(fs, f"{root}/r", [1, 2, 3])
    np.save(tmp_path / "l.npy", np.array([1, 2, 3], dtype=np.uint16))
    np.save(tmp_path / "m.npy", np.array([4, 5], dtype=np.uint16))
    assert open_corpus(str(tmp_path / "l.npy")).local
    assert open_corpus([str(tmp_path / "l.npy"), str(tmp_path / "m.npy")]).split(0.4)[1].local
    assert not open_corpus(f"memory://{root}/r.npy").local
    assert not open_corpus([str(tmp_path / "l.npy"), f"memory://{root}/r.npy"]).slice(0, 2).local


# ---- 2. the driver's check ------------------------------------------------------------------------

def test_remote_corpus_with_a_bound_below_vocab_is_not_read(mem, reads, caplog):
    fs, root = mem
    put_tokens(fs, f"{root}/a", np.arange(1000) % 50)
    put_tokens(fs, f"{root}/b", np.arange(500) % 60)
    corpus = open_corpus(f"memory://{root}/*.npy")
    reads.clear()
    with caplog.at_level(logging.WARNING, logger="loom.data"):
        corpus.check_vocab(64)
        train, val = corpus.split(0.1)
        train.check_vocab(64)
        val.check_vocab(64)
    assert reads == [] and not caplog.records


def test_remote_corpus_without_a_bound_is_scanned_with_a_warning(mem, reads, caplog):
    fs, root = mem
    put_tokens(fs, f"{root}/a", [1, 2, 3, 70, 4, 5], max_token=None)
    corpus = open_corpus(f"memory://{root}/a.npy")
    reads.clear()
    with caplog.at_level(logging.WARNING, logger="loom.data"):
        corpus.slice(0, 3).check_vocab(64)  # every id below 64: passes, after reading all of it
    assert reads and "reads the whole corpus" in caplog.text
    with pytest.raises(ValueError, match=r"token id 70 at offset 3 is outside the model's vocabulary \[0, 64\): "
                                         r"raise --vocab to at least 71"):
        corpus.check_vocab(64)


def test_remote_bound_at_or_above_vocab_scans_and_names_the_id(mem, reads, caplog):
    fs, root = mem
    put_tokens(fs, f"{root}/a", [1] * 100 + [90] + [2] * 100)  # metadata: max_token 90 (true)
    train, val = open_corpus(f"memory://{root}/a.npy").split(0.4)  # one document: cut at token 121
    reads.clear()
    with caplog.at_level(logging.WARNING, logger="loom.data"):
        val.check_vocab(64)  # the bound (90) is its parent's: the held-out half is scanned, and is fine
    assert reads and "max_token 90 is not below it" in caplog.text
    with pytest.raises(ValueError, match=r"token id 90 at offset 100 is outside .* at least 91,"):
        train.check_vocab(64)


def test_local_corpus_is_scanned_even_when_its_metadata_lies(tmp_path):
    np.save(tmp_path / "t.npy", np.array([1, 2, 300, 4] * 10, dtype=np.uint16))
    meta = {"format": "loom-tokens", "version": 1, "dtype": "uint16", "tokens": 40, "documents": 1, "max_token": 9}
    (tmp_path / "t.json").write_text(json.dumps(meta))
    corpus = open_corpus(str(tmp_path / "t.npy"))
    assert corpus.max_token_bound == 9
    with pytest.raises(ValueError, match=r"token id 300 at offset 2 is outside .* at least 301"):
        corpus.check_vocab(256)


# ---- 3. the workers' guard ------------------------------------------------------------------------

def lying_remote_corpus(fs, root):
    """Remote tokens, all below 64 but one 200 at offset 170, whose metadata says max_token 63."""
    tokens = np.arange(400) % 64
    tokens[170] = 200
    put_tokens(fs, f"{root}/lie", tokens, docs=[0, 150, 300], max_token=63)
    return f"memory://{root}/lie.npy"


def test_a_lying_remote_corpus_passes_the_driver_and_its_first_bad_batch_raises(mem, reads):
    fs, root = mem
    url = lying_remote_corpus(fs, root)
    overrides = dict(data=url, vocab=64, dim=16, heads=2, layers=1, seq_len=16, batch_size=4, val_fraction=0.0,
                     eval_every=0, progress=False)
    reads.clear()
    cfg = validate(build_config(overrides=overrides))  # the driver's check: trusted metadata, nothing read
    assert data_problems(cfg, 1) == [] and reads == []
    windows = open_job_data(cfg, 1).train
    assert isinstance(windows, TokenWindows) and windows.vocab == 64
    bad_window = 170 // 16  # window k holds tokens [16k, 16k + 17)
    seen_bad = False
    for step in range(windows.num_windows // 4):
        starts = windows.items(step, range(4)) * 16
        if bad_window not in (starts // 16).tolist():
            windows.batch(step, range(4))  # clean batches pass the guard
            continue
        with pytest.raises(ValueError) as info:
            windows.batch(step, range(4))
        message, seen_bad = str(info.value), True
        assert message.startswith(f"{url}: token id 200 at offset 170 is outside the model's vocabulary [0, 64)")
        assert "--vocab 64" in message and "max_token is wrong" in message
        break
    assert seen_bad
    # without a vocabulary (a user's own model), nothing is checked
    plain = TokenWindows(windows.corpus, 16, 4, seed=cfg.train.seed)
    assert int(plain.batch(step, range(4))[0].max()) == 200


def test_the_guard_names_the_offset_in_the_whole_corpus_of_a_split(mem):
    fs, root = mem
    corpus = open_corpus(lying_remote_corpus(fs, root))
    train, val = corpus.split(0.75)  # cut at the document start 150: token 170 is offset 20 of the held-out part
    assert val.source_offset(20) == 170
    windows = TokenWindows(val, 16, 2, shuffle=False, vocab=64)
    with pytest.raises(ValueError, match=r"\(val\): token id 200 at offset 20 \(offset 170 of the whole corpus\)"):
        windows.batch(0, range(2))  # windows [0, 17) and [16, 33): the second holds it


def test_document_draws_guard_every_document(mem):
    fs, root = mem
    corpus = open_corpus(lying_remote_corpus(fs, root))
    draws = DocumentDraws(corpus, 3, 200, vocab=64)  # three documents, one step holds all of them
    with pytest.raises(ValueError, match=r"token id 200 at offset 170 is outside .*--vocab 64"):
        draws.documents(0)
    assert len(DocumentDraws(corpus, 3, 200).documents(0)) == 3
    clean = DocumentDraws(Corpus(np.arange(40) % 8, [0, 20]), 2, 30, vocab=8)
    assert sorted(len(d) for d in clean.documents(0)) == [20, 20]
    with pytest.raises(ValueError, match="vocab=0 must be the model's vocabulary size"):
        DocumentDraws(corpus, 3, 200, vocab=0)
    with pytest.raises(ValueError, match="vocab=True must be"):
        TokenWindows(corpus, 16, 2, vocab=True)


def test_guard_follows_the_reference_model_not_a_users_model(tmp_path):
    np.save(tmp_path / "t.npy", (np.arange(400) % 32).astype(np.uint16))
    base = dict(data=str(tmp_path / "t.npy"), vocab=32, dim=16, heads=2, layers=1, seq_len=16, batch_size=4,
                val_fraction=0.1, eval_every=2, progress=False)
    job = open_job_data(build_config(overrides=base), 1)
    assert job.train.vocab == job.heldout.vocab == 32
    user = open_job_data(build_config(overrides={**base, "model": "my_models:make"}), 1)
    assert user.train.vocab is None and user.heldout.vocab is None
    hdp = open_job_data(build_config(overrides={**base, "hdp": True}), 1)
    assert isinstance(hdp.train, DocumentDraws) and hdp.train.vocab == 32


def test_first_outside_finds_negative_and_large_ids_in_any_layout():
    from loom.data.corpus import first_outside
    ids = np.arange(10)
    assert first_outside(ids, 10) is None and first_outside(ids, 9) == 9
    ids[3] = -1  # the one-pass unsigned view must still see a negative id
    assert first_outside(ids, 10) == 3 and first_outside(ids.astype(np.int32), 10) == 3
    assert first_outside(ids[::2], 10) is None and first_outside(ids[1::2], 10) == 1  # not contiguous
    assert first_outside(np.array([[1, 2], [3, -4]]), 5) == 3
    assert first_outside(np.arange(10, dtype=np.uint16), 5) == 5
    assert first_outside(np.zeros((0, 4), dtype=np.int64), 1) is None


def _train_on_lying_corpus():
    """In a worker (the memory filesystem is per process): the driver's checks pass, training stops at the
    first step whose batch holds the bad id; returns (problems, the error, steps that ran first)."""
    import torch.distributed as dist
    from loom.launch.train import train
    fs, root = fsspec.filesystem("memory"), f"/loomvocab-{uuid.uuid4().hex}"
    fs.mkdir(root)
    try:
        url = lying_remote_corpus(fs, root)
        cfg = validate(build_config(overrides=dict(
            data=url, vocab=64, dim=16, heads=2, layers=1, seq_len=16, batch_size=4, val_fraction=0.0,
            eval_every=0, steps=6, dtype="float64", dp=1, progress=False)), world_size=dist.get_world_size())
        windows = open_job_data(cfg, 1).train
        first_bad = next(s for s in range(6) if 170 // 16 in windows.items(s, range(4)).tolist())
        try:
            train(cfg)
        except ValueError as exc:
            return data_problems(cfg, 1), str(exc), first_bad
        return data_problems(cfg, 1), None, first_bad
    finally:
        fs.rm(root, recursive=True)


@pytest.mark.timeout(120)
def test_training_stops_at_the_batch_with_the_bad_id(distributed):
    problems, error, first_bad = distributed(_train_on_lying_corpus, 1, timeout=100)[0]
    assert problems == [] and first_bad < 6  # the bad window is drawn within the run
    assert error is not None and "token id 200 at offset 170" in error and "--vocab 64" in error
