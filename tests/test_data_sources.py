"""open_corpus: every source kind to the right tokens and document starts; clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from loom.data import ByteTokenizer, HFTokenizer, load_tokenizer, open_corpus
from loom.data.streams import ConcatTokens, RangeReader

from data_fixtures import make_tokenizer


def docs_of(corpus) -> list[list[int]]:
    return [corpus.read(int(s), int(n)).tolist() for s, n in zip(corpus.doc_starts, corpus.doc_lengths())]


def byte_docs(*texts) -> list[list[int]]:
    return [list(t.encode("utf-8")) for t in texts]


def write_tokens(path, tokens, dtype="uint16", docs=None, meta=None):
    arr = np.asarray(tokens, dtype=dtype)
    if str(path).endswith(".npy"):
        np.save(path, arr)
    else:
        arr.tofile(path)
    stem = str(path)[:-4]
    if docs is not None:
        np.save(stem + ".docs.npy", np.asarray(docs, dtype=np.int64))
    if meta is not None:
        with open(stem + ".json", "w") as fh:
            json.dump(meta, fh)
    return arr


def meta_for(arr, docs, **over):
    m = {"format": "loom-tokens", "version": 1, "dtype": arr.dtype.name, "tokens": len(arr), "documents": docs,
         "vocab_size": 1000, "tokenizer": {"name": "t.json", "sha256": "ab"}, "bytes": 3 * len(arr),
         "max_token": int(arr.max())}
    m.update(over)
    return m


# ---- token files -------------------------------------------------------------------------------

def test_bin_with_sidecars_is_memory_mapped(tmp_path):
    arr = (np.arange(700) % 600).astype(np.uint32)
    write_tokens(tmp_path / "c.bin", arr, "uint32", docs=[0, 100, 450], meta=meta_for(arr, 3))
    c = open_corpus(str(tmp_path / "c.bin"))
    assert isinstance(c.tokens, np.memmap) and c.tokens.dtype == np.uint32
    assert c.doc_starts.tolist() == [0, 100, 450]
    assert c.read(0, 700).tolist() == arr.tolist() and c.read(0, 3).dtype == np.int64
    assert (c.vocab_size, c.num_bytes) == (1000, 2100)


def test_bin_default_uint16_and_token_dtype(tmp_path):
    arr = write_tokens(tmp_path / "raw.bin", [5, 6, 7, 8], "uint32")
    assert open_corpus(str(tmp_path / "raw.bin"), token_dtype="uint32").read(0, 4).tolist() == [5, 6, 7, 8]
    as16 = open_corpus(str(tmp_path / "raw.bin"))  # nanoGPT's default: uint16
    assert len(as16) == 8 and as16.read(0, 8).tolist() == arr.view(np.uint16).tolist()
    assert as16.vocab_size is None and as16.num_bytes is None and as16.doc_starts.tolist() == [0]


def test_npy_memmap_and_signed_tokens(tmp_path):
    write_tokens(tmp_path / "a.npy", [3, 1, 4, 1, 5], "int64", docs=[0, 2, 5])  # end offset tolerated
    c = open_corpus(str(tmp_path / "a.npy"))
    assert isinstance(c.tokens, np.memmap)
    assert docs_of(c) == [[3, 1], [4, 1, 5]]
    write_tokens(tmp_path / "neg.npy", [3, -1, 4], "int32")
    with pytest.raises(ValueError, match=r"neg.npy: token id -1 at offset 1 is negative"):
        open_corpus(str(tmp_path / "neg.npy"))


def test_npy_refuses_objects_floats_and_2d(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([1, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj.npy: dtype object holds Python objects"):
        open_corpus(str(tmp_path / "obj.npy"))
    np.save(tmp_path / "f.npy", np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"f.npy: dtype float32 cannot hold token ids"):
        open_corpus(str(tmp_path / "f.npy"))
    np.save(tmp_path / "m.npy", np.ones((2, 3), dtype=np.uint16))
    with pytest.raises(ValueError, match=r"m.npy: shape \(2, 3\); a token file is one flat array"):
        open_corpus(str(tmp_path / "m.npy"))


def test_eod_token_marks_documents(tmp_path):
    write_tokens(tmp_path / "e.bin", [1, 2, 0, 3, 0, 0, 4, 5, 0])
    c = open_corpus(str(tmp_path / "e.bin"), eod_token=0)
    assert docs_of(c) == [[1, 2, 0], [3, 0], [0], [4, 5, 0]]
    assert open_corpus(str(tmp_path / "e.bin")).num_documents == 1


def test_eod_scan_is_chunked(tmp_path, monkeypatch):
    import loom.data.sources as sources
    monkeypatch.setattr(sources, "SCAN_CHUNK", 3)  # boundaries across chunk edges
    write_tokens(tmp_path / "e.bin", [1, 9, 2, 9, 9, 3, 4, 9, 5, 6])
    c = open_corpus(str(tmp_path / "e.bin"), eod_token=9)
    assert c.doc_starts.tolist() == [0, 2, 4, 5, 8]


def test_globs_and_several_files_concatenate(tmp_path):
    write_tokens(tmp_path / "p2.bin", [20, 21, 22], docs=[0, 2])
    write_tokens(tmp_path / "p1.bin", [10, 11])
    write_tokens(tmp_path / "p3.npy", [30], "uint32")
    c = open_corpus(str(tmp_path / "p*.bin"))  # sorted; the .docs.npy sidecar is not a match
    assert isinstance(c.tokens, ConcatTokens)
    assert docs_of(c) == [[10, 11], [20, 21], [22]]
    c = open_corpus([str(tmp_path / "p3.npy"), str(tmp_path / "p*.bin")])  # order given; mixed dtypes
    assert c.read(0, 6).tolist() == [30, 10, 11, 20, 21, 22]  # a read across file boundaries
    assert c.doc_starts.tolist() == [0, 1, 3, 5]


def test_doc_index_argument(tmp_path):
    write_tokens(tmp_path / "t.bin", range(10))
    np.save(tmp_path / "idx.npy", np.array([0, 4, 7]))
    c = open_corpus(str(tmp_path / "t.bin"), doc_index=str(tmp_path / "idx.npy"))
    assert c.doc_starts.tolist() == [0, 4, 7]
    write_tokens(tmp_path / "u.bin", range(3))
    with pytest.raises(ValueError, match=r"doc_index=.* needs exactly one token file"):
        open_corpus([str(tmp_path / "t.bin"), str(tmp_path / "u.bin")], doc_index=str(tmp_path / "idx.npy"))


def test_doc_index_mismatch_names_the_index(tmp_path):
    write_tokens(tmp_path / "t.bin", range(10), docs=[0, 4, 12])
    with pytest.raises(ValueError, match=r"document index .*t.docs.npy does not match .*t.bin: offset 12 is "
                                         r"beyond the last token \(9\)"):
        open_corpus(str(tmp_path / "t.bin"))
    np.save(tmp_path / "t.docs.npy", np.array([0, 6, 3]))
    with pytest.raises(ValueError, match=r"t.docs.npy does not match .*offset 3 follows 6"):
        open_corpus(str(tmp_path / "t.bin"))
    np.save(tmp_path / "t.docs.npy", np.array([0.0, 5.0]))
    with pytest.raises(ValueError, match=r"t.docs.npy: must be a flat integer array"):
        open_corpus(str(tmp_path / "t.bin"))


def test_metadata_is_checked(tmp_path):
    arr = write_tokens(tmp_path / "m.bin", range(10), docs=[0, 5])
    write_tokens(tmp_path / "m.bin", arr, meta=meta_for(arr, 2, tokens=12))
    with pytest.raises(ValueError, match=r"m.json: metadata says 12 tokens, file .*m.bin holds 10"):
        open_corpus(str(tmp_path / "m.bin"))
    write_tokens(tmp_path / "m.bin", arr, meta=meta_for(arr, 2, dtype="uint32"))  # 20 bytes = 5 uint32
    with pytest.raises(ValueError, match=r"metadata says 10 tokens, file .*m.bin holds 5"):
        open_corpus(str(tmp_path / "m.bin"))
    write_tokens(tmp_path / "m.bin", arr, meta=meta_for(arr, 3))
    with pytest.raises(ValueError, match=r"holds 2 documents but the metadata says 3"):
        open_corpus(str(tmp_path / "m.bin"))
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m.json: metadata is not valid JSON"):
        open_corpus(str(tmp_path / "m.bin"))
    (tmp_path / "m.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"m.json: not loom-tokens metadata"):
        open_corpus(str(tmp_path / "m.bin"))
    write_tokens(tmp_path / "m.bin", arr, meta=meta_for(arr, 2))
    with pytest.raises(ValueError, match=r"m.bin: its metadata says uint16 but token_dtype is uint32"):
        open_corpus(str(tmp_path / "m.bin"), token_dtype="uint32")
    with pytest.raises(ValueError, match=r"m.bin was made by tokenizer 't.json' but the tokenizer given by 'byte'"):
        open_corpus(str(tmp_path / "m.bin"), tokenizer="byte")


def test_odd_bin_size_missing_file_empty_corpus(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=r"odd.bin: 3 bytes is not a whole number of uint16 tokens"):
        open_corpus(str(tmp_path / "odd.bin"))
    with pytest.raises(FileNotFoundError, match=r"nope.bin: no such file"):
        open_corpus(str(tmp_path / "nope.bin"))
    with pytest.raises(FileNotFoundError, match=r"no file matches"):
        open_corpus(str(tmp_path / "none*.bin"))
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n\n\n\t\n")
    with pytest.raises(ValueError, match=r"corpus .*empty.bin \(\+1 more files\) is empty"):
        open_corpus([str(tmp_path / "empty.bin"), str(tmp_path / "blank.txt")])
    with pytest.raises(ValueError, match=r"x.csv: unknown kind of file"):
        (tmp_path / "x.csv").write_text("a")
        open_corpus(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match=r"is a directory"):
        open_corpus(str(tmp_path))


def test_memory_url_token_files_are_read_by_ranges(mem):
    fs, root = mem
    arr = np.arange(1000, dtype=np.uint16) * 7
    with fs.open(f"{root}/r.npy", "wb") as fh:
        np.save(fh, arr)
    with fs.open(f"{root}/r.docs.npy", "wb") as fh:
        np.save(fh, np.array([0, 300], dtype=np.int64))
    fs.pipe(f"{root}/s.bin", np.array([1, 2, 3], dtype=np.uint16).tobytes())
    c = open_corpus(f"memory://{root}/r.npy")
    assert isinstance(c.tokens, RangeReader) and c.doc_starts.tolist() == [0, 300]
    assert c.read(295, 10).tolist() == arr[295:305].tolist()
    c = open_corpus([f"memory://{root}/*.npy", f"memory://{root}/s.bin"])  # glob on fsspec: sidecar left out
    assert len(c) == 1003 and c.read(998, 5).tolist() == [6986, 6993, 1, 2, 3]
    assert c.doc_starts.tolist() == [0, 300, 1000]
    import pickle
    again = pickle.loads(pickle.dumps(open_corpus(f"memory://{root}/r.npy").tokens))
    assert again[10:12].tolist() == [70, 77]


# ---- text --------------------------------------------------------------------------------------

TXT = "first doc\nline two\n\none blank line keeps it\n\n\nsecond doc\n \t\n\n\nthird\n"


def test_txt_blank_line_rule(tmp_path):
    (tmp_path / "a.txt").write_text(TXT)
    c = open_corpus(str(tmp_path / "a.txt"))
    assert docs_of(c) == byte_docs("first doc\nline two\n\none blank line keeps it\n", "second doc\n", "third\n")
    assert c.num_bytes == len(c) and c.vocab_size == 256 and c.tokens.dtype == np.uint16


def test_jsonl_and_bad_lines(tmp_path):
    rows = [{"text": "alpha", "id": 1}, {"text": "  "}, {"text": "béta"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    c = open_corpus(str(tmp_path / "a.jsonl"))
    assert docs_of(c) == byte_docs("alpha", "béta") and c.num_bytes == 5 + 5
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert docs_of(open_corpus(str(tmp_path / "b.jsonl"), text_field="body")) == byte_docs("x")
    with pytest.raises(ValueError, match=r"b.jsonl:1: no 'text' field \(fields: 'body'\)"):
        open_corpus(str(tmp_path / "b.jsonl"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "ok"}) + "\n\n{broken\n")
    with pytest.raises(ValueError, match=r"c.jsonl:3: not valid JSON"):
        open_corpus(str(tmp_path / "c.jsonl"))
    (tmp_path / "d.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'text' is a int, not a string"):
        open_corpus(str(tmp_path / "d.jsonl"))


def test_parquet_and_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"content": ["one", None, "", "two three"], "n": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    c = open_corpus(str(tmp_path / "a.parquet"), text_field="content")
    assert docs_of(c) == byte_docs("one", "two three")
    with pytest.raises(ValueError, match=r"a.parquet: no column 'text' \(columns: content, n\)"):
        open_corpus(str(tmp_path / "a.parquet"))
    with pytest.raises(ValueError, match=r"column 'n' holds int64, not strings"):
        open_corpus(str(tmp_path / "a.parquet"), text_field="n")


def test_memory_url_text(mem):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    fs, root = mem
    fs.pipe(f"{root}/a.txt", TXT.encode())
    fs.pipe(f"{root}/b.jsonl", b'{"text": "jj"}\n')
    with fs.open(f"{root}/c.parquet", "wb") as fh:
        pq.write_table(pa.table({"text": ["pq"]}), fh)
    c = open_corpus([f"memory://{root}/a.txt", f"memory://{root}/b.jsonl", f"memory://{root}/c.parquet"])
    assert docs_of(c)[-2:] == byte_docs("jj", "pq") and c.num_documents == 5


def test_text_and_tokens_together(tmp_path):
    (tmp_path / "a.txt").write_text("hi")
    write_tokens(tmp_path / "b.bin", [1, 2])
    c = open_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.bin")])
    assert docs_of(c) == [[104, 105], [1, 2]]
    assert c.vocab_size is None and c.num_bytes is None  # the raw .bin does not know them


# ---- tokenizers --------------------------------------------------------------------------------

def test_hf_tokenizer_end_to_end(tmp_path):
    pytest.importorskip("tokenizers")
    path = make_tokenizer(tmp_path)
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 12 and len(tok.sha256) == 64
    ids = tok.encode("the cat sat")
    assert ids.dtype == np.int64 and tok.decode(ids) == "the cat sat"
    assert [x.tolist() for x in tok.encode_batch(["the dog", "zebra"])] == \
        [tok.encode("the dog").tolist(), [0]]  # unknown word -> [UNK] (id 0)
    (tmp_path / "t.jsonl").write_text('{"text": "the cat"}\n{"text": "a dog"}\n')
    c = open_corpus(str(tmp_path / "t.jsonl"), tokenizer=path)
    assert docs_of(c) == [tok.encode("the cat").tolist(), tok.encode("a dog").tolist()]
    assert c.vocab_size == 12 and c.num_bytes == 12


def test_load_tokenizer_errors(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer) and isinstance(load_tokenizer("byte"), ByteTokenizer)
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(ValueError, match=r"tokenizer file .*bad.json.* does not load: "):
        load_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"local tokenizer.json"):
        load_tokenizer("hf://gpt2/tokenizer.json")


def test_missing_tokenizers_package_says_what_to_install(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers":
            raise ImportError("No module named 'tokenizers'")
        return real(name, *args, **kwargs)

    (tmp_path / "t.json").write_text("{}")
    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ValueError, match=r"pip install 'loom-train\[data\]'"):
        HFTokenizer(str(tmp_path / "t.json"))


def test_a_utf8_byte_order_mark_is_not_text(tmp_path):
    from loom.data import open_corpus
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffHello.\n".encode("utf-8"))
    corpus = open_corpus(str(path))
    assert bytes(corpus.read(0, len(corpus)).tolist()) == b"Hello.\n"
