"""Hostile and broken inputs to loom.data and `loom data`: each a clear error naming the file, never a
traceback, a RecursionError, a read past the end of a file or a silently wrong corpus."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import numpy.lib.format as npformat
import pytest

from loom.data import open_corpus, prepare
from loom.launch.cli import main


def npy_with_header(path, shape, descr="<u2", data=b""):
    with open(path, "wb") as fh:
        npformat.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": shape})
        fh.write(data)


def test_npy_header_claiming_more_than_the_file_holds(tmp_path):
    path = tmp_path / "huge.npy"
    npy_with_header(path, (10**12,), data=b"\0" * 100)
    with pytest.raises(ValueError, match=r"huge\.npy: its header says 1000000000000 uint16 tokens .* holds 100 bytes"):
        open_corpus(str(path))
    npy_with_header(path, (51,), data=b"\0" * 100)  # one token short: still refused, not a short read later
    with pytest.raises(ValueError, match="truncated"):
        open_corpus(str(path))
    npy_with_header(path, (50,), data=b"\1\0" * 50)  # exact: fine
    assert open_corpus(str(path)).read(0, 50).tolist() == [1] * 50


def test_remote_npy_header_claiming_more_than_the_file_holds():
    import fsspec
    fs = fsspec.filesystem("memory")
    buf = __import__("io").BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": "<u2", "fortran_order": False, "shape": (10**9,)})
    fs.pipe("/loom-attack/y.npy", buf.getvalue() + b"\0" * 10)
    try:
        with pytest.raises(ValueError, match="y.npy: its header says"):
            open_corpus("memory://loom-attack/y.npy")  # at open, not at the first read inside a worker
    finally:
        fs.rm("/loom-attack", recursive=True)


def test_deeply_nested_json_is_a_value_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.jsonl").write_text(deep + "\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl:1: not valid JSON"):
        open_corpus(str(tmp_path / "deep.jsonl"))
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text('{"format": "loom-tokens", "version": 1, "x": ' + deep + "}")
    with pytest.raises(ValueError, match=r"t\.json: metadata is not valid JSON"):
        open_corpus(str(tmp_path / "t.bin"))


@pytest.mark.parametrize("tokenizer", [None, "hf"])
def test_lone_surrogate_in_jsonl_names_the_line(tmp_path, tokenizer):
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800 x"}\n')
    if tokenizer == "hf":
        from data_fixtures import make_tokenizer
        tokenizer = make_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"s\.jsonl:2: field 'text' holds '\\ud800' at character 4"):
        open_corpus(str(tmp_path / "s.jsonl"), tokenizer=tokenizer)


def test_damaged_parquet_page_is_a_value_error_naming_the_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["some words here"] * 50}), path, compression="none")
    raw = bytearray(path.read_bytes())
    raw[4:40] = b"\xff" * 36  # the first page header: the footer (and the schema) still read
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"d\.parquet: not a readable parquet file"):
        open_corpus(str(path))


def test_metadata_counting_documents_without_their_index(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    meta = {"format": "loom-tokens", "version": 1, "dtype": "uint16", "tokens": 100, "documents": 3}
    (tmp_path / "t.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"t\.json: metadata says 3 documents but their index .*t\.docs\.npy is "
                                         "missing"):
        open_corpus(str(tmp_path / "t.bin"))
    np.save(tmp_path / "t.docs.npy", np.array([0, 10, 50]))
    assert open_corpus(str(tmp_path / "t.bin")).num_documents == 3
    meta["documents"] = 1
    os.remove(tmp_path / "t.docs.npy")
    (tmp_path / "t.json").write_text(json.dumps(meta))
    assert open_corpus(str(tmp_path / "t.bin")).num_documents == 1  # one document needs no index


def test_metadata_vocab_beyond_any_token_file(tmp_path):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "t.bin")
    meta = {"format": "loom-tokens", "version": 1, "dtype": "uint16", "tokens": 10, "documents": 1,
            "vocab_size": 10**30}
    (tmp_path / "t.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'vocab_size' = 10{30} is more ids than any token file holds"):
        open_corpus(str(tmp_path / "t.bin"))


def test_uint64_index_beyond_int64_is_named_as_such(tmp_path):
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.docs.npy", np.array([0, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(ValueError, match=f"offset {2**64 - 1} is beyond any token file"):
        open_corpus(str(tmp_path / "t.bin"))


def test_vocab_error_suggests_the_tokenizers_vocabulary(tmp_path):
    # the split's train part uses ids up to 299, the held-out part 499: the advice is the tokenizer's 500
    arr = np.array([1, 299] * 50 + [499], dtype=np.uint16)
    arr.tofile(tmp_path / "t.bin")
    meta = {"format": "loom-tokens", "version": 1, "dtype": "uint16", "tokens": len(arr), "documents": 1,
            "vocab_size": 500}
    (tmp_path / "t.json").write_text(json.dumps(meta))
    train = open_corpus(str(tmp_path / "t.bin")).slice(0, 100)
    with pytest.raises(ValueError, match=r"raise --vocab to at least 500 \(its tokenizer's vocabulary\)"):
        train.check_vocab(256)


def test_cli_data_never_prints_a_traceback(tmp_path, capsys):
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["data", "inspect", str(tmp_path / "deep.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "deep.jsonl:1: not valid JSON" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_val_data_errors_are_named_by_their_flag(tmp_path):
    from loom.launch.config import ConfigError, JobConfig, validate
    np.arange(200, dtype=np.uint16).tofile(tmp_path / "t.bin")
    cfg = JobConfig()
    cfg.data.data, cfg.data.val_data = str(tmp_path / "t.bin"), str(tmp_path / "missing.bin")
    cfg.parallel.dp, cfg.train.seq_len, cfg.train.batch_size = 1, 16, 4
    with pytest.raises(ConfigError, match=r"--val-data: .*missing\.bin: no such file"):
        validate(cfg)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads parent pids from /proc")
def test_prepare_workers_end_when_prepare_is_killed(tmp_path):
    """kill -9 of a prepare leaves no worker waiting forever on its pool's queue, and no output."""
    import signal
    import subprocess
    import time
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("some text\n")
    marker = str(tmp_path / "started")
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
              "from data_fixtures import StallingTokenizer\n"
              "from loom.data import prepare\n"
              "if __name__ == '__main__':\n"
              f"    prepare([{str(tmp_path / 'a.txt')!r}, {str(tmp_path / 'b.txt')!r}], {str(tmp_path / 'out')!r}, "
              f"tokenizer=StallingTokenizer({marker!r}), workers=2)\n")
    (tmp_path / "run.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], cwd=tmp_path)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(workers) < 2 and time.monotonic() < deadline:  # both workers inside a file
            workers = [int(n.rsplit(".", 1)[1]) for n in os.listdir(tmp_path) if n.startswith("started.")]
            assert proc.poll() is None, "prepare ended before its workers started"
            time.sleep(0.2)
        assert len(workers) == 2, "the workers never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "workers outlived their prepare"
        assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]  # nothing that looks complete
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_a_short_held_out_split_blocks_only_a_job_that_evaluates(tmp_path):
    from loom.launch.config import ConfigError, JobConfig, validate
    np.arange(200, dtype=np.uint16).tofile(tmp_path / "t.bin")  # 5% held out: 10 tokens, under one window
    cfg = JobConfig()
    cfg.data.data, cfg.model.vocab = str(tmp_path / "t.bin"), 256
    cfg.parallel.dp, cfg.train.seq_len, cfg.train.batch_size, cfg.train.eval_every = 1, 16, 4, 5
    with pytest.raises(ConfigError, match=r"\(val\) holds 10 tokens.*held-out data of --eval-every.*--eval-every 0"):
        validate(cfg)
    cfg.train.eval_every = 0
    validate(cfg)  # nothing reads the held-out windows


def test_windows_refuse_indices_outside_the_batch_and_negative_steps():
    from loom.data import Corpus, DocumentDraws, TokenWindows
    corpus = Corpus(np.arange(200, dtype=np.uint16), [0, 50, 120])
    windows = TokenWindows(corpus, seq_len=8, batch_size=4, seed=0)
    assert windows.batch(1, range(4))[0].shape == (4, 8)
    with pytest.raises(ValueError, match=r"sample index 4 is outside the global batch \[0, 4\)"):
        windows.batch(0, range(8))  # would draw step 1's samples again
    with pytest.raises(ValueError, match="step -1 comes before the first sample"):
        windows.batch(-1, range(4))
    with pytest.raises(ValueError, match="sample index -1"):
        windows.cu_seqlens(0, [-1])
    with pytest.raises(ValueError, match="outside the global batch"):
        DocumentDraws(corpus, batch_size=2, max_len=8).documents(0, count=3)


def test_npy_headers_with_negative_or_endless_shapes(tmp_path):
    def write(name, header: str):
        h = header.encode("latin1")
        h += b" " * (64 - (10 + len(h) + 1) % 64) + b"\n"
        (tmp_path / name).write_bytes(b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + b"\0" * 20)
        return str(tmp_path / name)

    with pytest.raises(ValueError, match=r"neg\.npy: its header gives a negative length -1"):
        open_corpus(write("neg.npy", "{'descr': '<u2', 'fortran_order': False, 'shape': (-1,), }"))
    with pytest.raises(ValueError, match=r"long\.npy: not a readable \.npy token file") as err:
        open_corpus(write("long.npy", "{'descr': '<u2', 'fortran_order': False, 'shape': (" + "9" * 5000 + ",), }"))
    assert len(str(err.value)) < 400  # the hostile header is not echoed whole


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_is_not_a_missing_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(ValueError, match=r"pipe\.txt is not a regular file"):
        open_corpus(str(tmp_path / "pipe.txt"))


@pytest.mark.parametrize("output", ["out/", ".", "..", "out/.bin", ".bin"])
def test_prepare_output_that_names_a_directory(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(ValueError, match="names a directory, not a file stem"):
        prepare("a.txt", output, workers=1)
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "out"] and not os.listdir(tmp_path / "out")


def test_prepare_never_overwrites_a_json_that_is_not_its_metadata(tmp_path, monkeypatch):
    from data_fixtures import make_tokenizer
    monkeypatch.chdir(tmp_path)
    tok = make_tokenizer(tmp_path)  # tokenizer.json
    before = open(tok, "rb").read()
    (tmp_path / "a.txt").write_text("the cat sat on the mat\n")
    with pytest.raises(ValueError, match=r"tokenizer\.json exists and is not loom-tokens metadata"):
        prepare("a.txt", "tokenizer", tokenizer=tok, workers=1)  # OUTPUT.json would be the tokenizer itself
    assert open(tok, "rb").read() == before and not os.path.exists("tokenizer.bin")
    prepare("a.txt", "corpus", tokenizer=tok, workers=1)
    prepare("a.txt", "corpus.bin", workers=1)  # over an earlier prepare: fine
    assert json.load(open("corpus.json"))["tokenizer"]["name"] == "byte"


def test_tokenizer_ids_beyond_its_vocabulary_never_wrap(tmp_path):
    from data_fixtures import make_tokenizer
    path = make_tokenizer(tmp_path)
    spec = json.load(open(path))
    spec["model"]["vocab"]["cat"] = 70_000  # sparse ids: uint16 would silently wrap it to 4464
    json.dump(spec, open(path, "w"))
    (tmp_path / "a.txt").write_text("the cat sat\n")
    with pytest.raises(ValueError, match=r"a\.txt: tokenizer 'tokenizer\.json' gave id 70000, outside its vocabulary"):
        open_corpus(str(tmp_path / "a.txt"), tokenizer=path)
    with pytest.raises(ValueError, match="gave id 70000"):
        prepare(str(tmp_path / "a.txt"), str(tmp_path / "out"), tokenizer=path, workers=1)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]


def test_globs_skip_hidden_names_like_a_killed_prepares_parts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/.corpus.prepare-x")
    np.arange(40, dtype=np.uint16).tofile("data/a.bin")
    np.arange(40, dtype=np.uint16).tofile("data/.corpus.prepare-x/part-000000.bin")  # partial, unvouched
    np.arange(40, dtype=np.uint16).tofile("data/.hidden.bin")
    for pattern in ("data/*", "data/**", "data/**/*.bin", f"{tmp_path}/data/**/*.bin"):
        assert open_corpus(pattern).name.endswith("data/a.bin"), pattern
    assert len(open_corpus("data/.*.bin")) == 40  # spelled out: taken
    assert len(open_corpus("data/.corpus.prepare-x/*.bin")) == 40


def test_paths_may_be_pathlib_paths(tmp_path):
    np.arange(40, dtype=np.uint16).tofile(tmp_path / "a.bin")
    (tmp_path / "b.txt").write_text("text\n")
    assert len(open_corpus(tmp_path / "a.bin")) == len(open_corpus([tmp_path / "a.bin"])) == 40
    assert prepare(tmp_path / "b.txt", tmp_path / "out", workers=1)["tokens"] == 5


def test_an_eod_token_that_never_occurs_is_reported(tmp_path, caplog):
    np.array([5, 6, 7, 9, 5, 6], dtype=np.uint16).tofile(tmp_path / "a.bin")
    with caplog.at_level("WARNING", logger="loom.data"):
        assert open_corpus(str(tmp_path / "a.bin"), eod_token=50256).num_documents == 1
    assert "--eod-token 50256 never occurs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="loom.data"):
        assert open_corpus(str(tmp_path / "a.bin"), eod_token=9).num_documents == 2
        assert open_corpus(str(tmp_path / "a.bin"), eod_token=6).num_documents == 2  # only at the end too
    assert "never occurs" not in caplog.text


def test_prepare_starts_no_more_workers_than_files(tmp_path, monkeypatch):
    module = sys.modules["loom.data.prepare"]
    seen = []
    nothing = {"lengths": np.zeros(0, dtype=np.int64), "bytes": 0, "max_token": -1}
    monkeypatch.setattr(module, "_run", lambda jobs, workers, progress: seen.append(workers) or [nothing])
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(ValueError, match="is empty"):  # the stub tokenised nothing
        prepare(str(tmp_path / "a.txt"), str(tmp_path / "out"), workers=1000)
    assert seen == [1]
