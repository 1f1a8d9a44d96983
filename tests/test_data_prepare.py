"""prepare/inspect: deterministic, atomic token files that open back to the same corpus; the CLI."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from loom.data import format_inspect, inspect, open_corpus, prepare
from loom.launch.cli import main

from data_fixtures import make_tokenizer

TEXTS = {
    "a.txt": "Alpha one.\nStill alpha.\n\n\n\nBeta two.\n",
    "b.jsonl": "\n".join(json.dumps({"text": t}) for t in ["gamma", "", "délta ünïcode"]) + "\n",
    "c.txt": "the cat sat on the mat\n",
}


@pytest.fixture
def texts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, body in TEXTS.items():
        (src / name).write_text(body, encoding="utf-8")
    return src


def files_of(stem):
    return {ext: open(f"{stem}{ext}", "rb").read() for ext in (".bin", ".docs.npy", ".json")}


def same_corpus(a, b):
    assert len(a) == len(b) and a.read(0, len(a)).tolist() == b.read(0, len(b)).tolist()
    assert a.doc_starts.tolist() == b.doc_starts.tolist()
    assert (a.vocab_size, a.num_bytes) == (b.vocab_size, b.num_bytes)


@pytest.mark.timeout(120)
def test_prepare_is_deterministic_and_opens_back(texts, tmp_path):
    inputs = [str(texts / "a.txt"), str(texts / "b.jsonl"), str(texts / "c.txt")]
    calls = []
    meta = prepare(inputs, str(tmp_path / "one" / "corpus"), workers=1, progress=lambda *a: calls.append(a))
    prepare(inputs, str(tmp_path / "two" / "corpus.bin"), workers=2)  # a process pool
    assert files_of(tmp_path / "one" / "corpus") == files_of(tmp_path / "two" / "corpus")
    assert calls[-1][:2] == (3, 3) and calls[-1][2] == meta["tokens"]
    direct = open_corpus(inputs)
    prepared = open_corpus(str(tmp_path / "one" / "corpus.bin"))
    assert isinstance(prepared.tokens, np.memmap) and prepared.tokens.dtype == np.uint16
    same_corpus(prepared, direct)
    assert meta == json.loads((tmp_path / "one" / "corpus.json").read_text())
    assert {k: meta[k] for k in ("format", "version", "dtype", "tokens", "documents", "vocab_size", "bytes")} == \
        {"format": "loom-tokens", "version": 1, "dtype": "uint16", "tokens": len(direct), "documents": 5,
         "vocab_size": 256, "bytes": direct.num_bytes}
    assert meta["max_token"] == direct.max_token() and meta["tokenizer"] == {"name": "byte", "sha256": None}
    assert not [n for n in os.listdir(tmp_path / "one") if n.startswith(".")]  # no temporary left behind


def test_prepare_with_hf_tokenizer_and_glob(texts, tmp_path):
    pytest.importorskip("tokenizers")
    tok = make_tokenizer(tmp_path)
    meta = prepare(str(texts / "*.txt"), str(tmp_path / "hf"), tokenizer=tok, workers=1)
    direct = open_corpus([str(texts / "a.txt"), str(texts / "c.txt")], tokenizer=tok)
    prepared = open_corpus(str(tmp_path / "hf.bin"), tokenizer=tok)
    same_corpus(prepared, direct)
    assert meta["vocab_size"] == 12 and meta["tokenizer"]["name"] == "tokenizer.json"
    assert len(meta["tokenizer"]["sha256"]) == 64
    with pytest.raises(ValueError, match=r"hf.bin was made by tokenizer 'tokenizer.json'"):
        open_corpus(str(tmp_path / "hf.bin"), tokenizer="byte")


def test_prepare_errors_write_nothing(texts, tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n\n")
    with pytest.raises(ValueError, match=r"corpus .*blank.txt is empty"):
        prepare(str(tmp_path / "blank.txt"), str(tmp_path / "out"), workers=1)
    np.arange(4, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match=r"t.bin is already tokens"):
        prepare(str(tmp_path / "t.bin"), str(tmp_path / "out"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnope\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        prepare([str(texts / "a.txt"), str(tmp_path / "bad.jsonl")], str(tmp_path / "out"), workers=1)
    with pytest.raises(ValueError, match=r"prepare writes local files"):
        prepare(str(texts / "a.txt"), "memory://x/out")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "blank.txt", "src", "t.bin"]


def test_inspect_counts_and_histogram(tmp_path):
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.docs.npy", np.array([0, 1, 3, 7, 10], dtype=np.int64))  # lengths 1 2 4 3 10
    info = inspect(str(tmp_path / "t.bin"))
    assert (info["documents"], info["tokens"], info["max_token"], info["vocab_size"]) == (5, 20, 19, None)
    assert info["lengths"]["min"] == 1 and info["lengths"]["max"] == 10 and info["lengths"]["p50"] == 3
    assert [(b["lo"], b["hi"], b["count"]) for b in info["histogram"]] == [(1, 2, 1), (2, 4, 2), (4, 8, 1),
                                                                           (8, 16, 1)]
    text = format_inspect(info)
    assert "documents  5" in text and "[        2,         4)          2  " + "#" * 40 in text


def test_cli_prepare_and_inspect(texts, tmp_path, capsys):
    out = str(tmp_path / "cli" / "c")
    assert main(["data", "prepare", str(texts / "a.txt"), str(texts / "c.txt"), out, "--workers", "1"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}.bin (uint16)" in said and "3 documents" in said
    assert main(["data", "inspect", out + ".bin"]) == 0
    said = capsys.readouterr().out
    assert "documents  3" in said and "vocab      256" in said
    assert main(["data", "inspect", str(texts / "b.jsonl"), "--eod-token", "32"]) == 0
    assert "documents  3" in capsys.readouterr().out  # "gamma", "délta ", "ünïcode"
    assert main(["data", "inspect", str(tmp_path / "missing.bin")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("loom data inspect: error: ") and "missing.bin: no such file" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["data", "prepare", str(texts / "a.txt"), out, "--text-field", "x", "--tokenizer",
                 str(tmp_path / "nope.json")]) == 1
    assert "nope.json' does not exist" in capsys.readouterr().err


def test_prepare_killed_while_renaming_leaves_no_metadata(texts, tmp_path, monkeypatch):
    stem = str(tmp_path / "c")
    prepare(str(texts / "c.txt"), stem, workers=1)  # an older, complete output
    module = sys.modules["loom.data.prepare"]  # the module (loom.data.prepare is the function)
    real = os.replace

    def die_on_docs(src, dst):
        if dst.endswith(".docs.npy"):
            raise KeyboardInterrupt  # killed between the renames
        real(src, dst)

    monkeypatch.setattr(module.os, "replace", die_on_docs)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(texts / "a.txt"), stem, workers=1)
    monkeypatch.undo()
    assert not os.path.exists(stem + ".json")  # nothing vouches for the new .bin with the old index
    assert not os.path.exists(stem + ".docs.npy")  # whose offsets might fit it silently
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_cli_inspects_the_builtin_corpus(capsys, tmp_path, monkeypatch):
    from loom.launch.cli import main
    monkeypatch.chdir(tmp_path)  # no file named pydoc here
    assert main(["data", "inspect", "pydoc"]) == 0
    out = capsys.readouterr().out
    assert "pydoc_data.topics" in out and "documents  79" in out
