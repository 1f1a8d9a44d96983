"""`prepare`: text tokenised once into a memory-mappable token file;
`inspect`: what a corpus holds.

``prepare(inputs, "out/corpus")`` writes

- ``out/corpus.bin``: the tokens, raw (uint16 when the vocabulary has at
  most 65536 ids, else uint32), documents end to end in input order;
- ``out/corpus.docs.npy``: int64 offsets of the document starts;
- ``out/corpus.json``: the metadata `loom.data.token_files` reads back.

Files are tokenised in parallel (a process pool; each worker streams its
file into a part file) and joined in input order, so the output does not
depend on ``workers``.  Everything is written under temporary names and
renamed into place, metadata last after removing any old metadata and
document index: a killed prepare leaves no ``.json`` that vouches for a
partial ``.bin`` and no old index beside a new ``.bin``.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time

import numpy as np
from fsspec.implementations.memory import MemoryFileSystem

from .corpus import Corpus
from .sources import expand, kind_of, open_corpus
from .text import TEXT_KINDS, encoded, token_dtype_for
from .token_files import FORMAT, MAX_SIDECAR_BYTES, VERSION, write_metadata
from .tokenizers import load_tokenizer, tokenizer_identity

log = logging.getLogger("loom.data")


def output_base(output: str) -> str:
    """``X`` for an output named ``X`` or ``X.bin``: the files are X.bin, X.docs.npy, X.json.
    Raises ValueError for a URL or a directory (``out/``, ``.``)."""
    output = os.fspath(output)
    if output.startswith("file://"):
        output = output[len("file://"):]
    if "://" in output:
        raise ValueError(f"output {output!r}: prepare writes local files; copy them to remote storage after")
    base = output[:-4] if output.endswith(".bin") else output
    if os.path.basename(base) in ("", ".", "..") or output.endswith(("/", os.sep)):
        raise ValueError(f"output {output!r} names a directory, not a file stem: give e.g. "
                         f"{os.path.join(output, 'corpus')!r} (writes corpus.bin, corpus.docs.npy, corpus.json)")
    return base


def _check_not_foreign(meta_path: str) -> None:
    """Raise ValueError when ``meta_path`` exists but is not loom-tokens
    metadata (a tokenizer.json, a config): prepare would overwrite it."""
    if not os.path.lexists(meta_path):
        return
    try:
        with open(meta_path, "rb") as fh:
            meta = json.loads(fh.read(MAX_SIDECAR_BYTES + 1))
        ours = isinstance(meta, dict) and meta.get("format") == FORMAT
    except (OSError, ValueError, RecursionError):
        ours = False
    if not ours or not os.path.isfile(meta_path) or os.path.islink(meta_path):
        raise ValueError(f"{meta_path} exists and is not loom-tokens metadata (a tokenizer? a config?): prepare "
                         "would overwrite it with the output's metadata; choose another OUTPUT")


def _tokenize_to_part(job) -> dict:
    """Worker: one text file streamed into ``part_path``; its document lengths, bytes and max id."""
    fs, path, display, tokenizer, text_field, part_path, dtype = job
    lengths, num_bytes, max_token = [], 0, -1
    with open(part_path, "wb") as out:
        for ids, nb in encoded(fs, path, display, tokenizer, text_field):
            for doc in ids:
                out.write(doc.astype(dtype).tobytes())
                lengths.append(len(doc))
                max_token = max(max_token, int(doc.max()))
            num_bytes += nb
    return {"lengths": np.asarray(lengths, dtype=np.int64), "bytes": num_bytes, "max_token": max_token}


def prepare(inputs, output: str, *, tokenizer=None, text_field: str = "text", workers: int | None = None,
            progress=None) -> dict:
    """Tokenise text files (``.txt``/``.jsonl``/``.parquet``, globs and
    fsspec URLs allowed) into ``OUTPUT.bin`` + ``OUTPUT.docs.npy`` +
    ``OUTPUT.json`` (local).  ``tokenizer``: None/"byte" or a
    ``tokenizer.json`` path.  ``workers``: processes (default
    min(cpus, files); 1 runs in this process, as do inputs on the
    process-local ``memory://`` filesystem).  ``progress(done_files,
    total_files, tokens_so_far)`` is called as files finish.  With
    ``workers > 1`` the pool spawns processes that import the calling
    script: call it under ``if __name__ == "__main__":``.

    Returns the metadata written.  Raises FileNotFoundError / ValueError as
    `open_corpus` does, and ValueError for a token file among the inputs or
    an empty result (nothing is written then)."""
    files = expand(inputs)
    for _, path, display, _ in files:
        if kind_of(path) not in TEXT_KINDS:
            raise ValueError(f"{display} is already tokens; prepare reads text ({', '.join(TEXT_KINDS)})")
    tok = load_tokenizer(tokenizer)
    base = output_base(output)
    _check_not_foreign(base + ".json")
    if workers is None:
        workers = min(os.cpu_count() or 1, len(files))
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be an integer >= 1")
    workers = min(workers, len(files))  # one file per worker at most: never a pool of idle processes
    if any(isinstance(fs, MemoryFileSystem) for fs, *_ in files):
        workers = 1  # memory:// lives in this process only
    dtype = token_dtype_for(tok.vocab_size)
    parent = os.path.dirname(os.path.abspath(base))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(base)}.prepare-", dir=parent)
    try:
        jobs = [(fs, path, display, tok, text_field, os.path.join(tmp, f"part-{i:06d}.bin"), dtype)
                for i, (fs, path, display, _) in enumerate(files)]
        results = _run(jobs, workers, progress)
        lengths = np.concatenate([r["lengths"] for r in results])
        total = int(lengths.sum())
        if total == 0:
            raise ValueError(f"corpus {files[0][2]}{' ...' if len(files) > 1 else ''} is empty: no text in "
                             f"{len(files)} file(s) (check the paths and --text-field); nothing written")
        bin_tmp, docs_tmp, meta_tmp = (os.path.join(tmp, n) for n in ("out.bin", "out.docs.npy", "out.json"))
        with open(bin_tmp, "wb") as out:
            for job in jobs:
                with open(job[5], "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        with open(docs_tmp, "wb") as fh:
            np.save(fh, starts, allow_pickle=False)
        meta = {"format": FORMAT, "version": VERSION, "dtype": dtype.name, "tokens": total,
                "documents": int(len(lengths)), "vocab_size": int(tok.vocab_size),
                "tokenizer": tokenizer_identity(tok), "bytes": int(sum(r["bytes"] for r in results)),
                "max_token": int(max(r["max_token"] for r in results)),
                "sources": [display for _, _, display, _ in files]}
        write_metadata(meta_tmp, meta)
        for old in (base + ".json", base + ".docs.npy"):  # the old sidecars must not describe the new
            if os.path.exists(old):                          # tokens while they move (nor the old ones after)
                os.remove(old)
        os.replace(bin_tmp, base + ".bin")
        os.replace(docs_tmp, base + ".docs.npy")
        os.replace(meta_tmp, base + ".json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s.bin: %d tokens, %d documents", base, meta["tokens"], meta["documents"])
    return meta


def _exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """Pool initializer: end this worker when ``parent`` is gone (a prepare
    killed with SIGKILL cannot shut its pool down, and a worker waiting on the
    pool's queue would wait forever)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)
    threading.Thread(target=watch, name="loom-prepare-parent-watch", daemon=True).start()


def _run(jobs, workers: int, progress) -> list[dict]:
    total, tokens = len(jobs), 0
    if workers == 1:
        results = []
        for job in jobs:
            results.append(_tokenize_to_part(job))
            tokens += int(results[-1]["lengths"].sum())
            if progress:
                progress(len(results), total, tokens)
        return results
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch / tokenizer threads
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_with_parent,
                                initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_tokenize_to_part, job) for job in jobs]
        try:
            for done, fut in enumerate(cf.as_completed(futures), 1):
                tokens += int(fut.result()["lengths"].sum())
                if progress:
                    progress(done, total, tokens)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return [f.result() for f in futures]  # input order, whatever finished first


PERCENTILES = (10, 50, 90, 99)


def inspect(paths, **open_kwargs) -> dict:
    """What the corpus ``paths`` holds: ``{"name", "files", "documents",
    "tokens", "vocab_size", "max_token", "bytes", "tokens_per_byte",
    "lengths": {"min", "mean", "p10", "p50", "p90", "p99", "max"},
    "histogram": [{"lo", "hi", "count"}]}`` (document lengths in tokens;
    bins ``[lo, hi)`` by powers of two).  ``paths`` may also be an open
    `Corpus`; else ``open_kwargs`` go to `open_corpus`, whose errors are raised."""
    corpus = paths if isinstance(paths, Corpus) else open_corpus(paths, **open_kwargs)
    lengths = corpus.doc_lengths()
    top = int(lengths.max())
    edges = [1]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2)
    counts = np.histogram(lengths, bins=edges)[0]
    return {
        "name": corpus.name, "files": 1 if isinstance(paths, Corpus) else len(expand(paths)),
        "documents": corpus.num_documents, "tokens": len(corpus),
        "vocab_size": corpus.vocab_size, "max_token": corpus.max_token(), "bytes": corpus.num_bytes,
        "tokens_per_byte": None if not corpus.num_bytes else len(corpus) / corpus.num_bytes,
        "lengths": {"min": int(lengths.min()), "mean": float(lengths.mean()),
                    **{f"p{q}": float(np.percentile(lengths, q)) for q in PERCENTILES}, "max": top},
        "histogram": [{"lo": lo, "hi": hi, "count": int(c)} for lo, hi, c in zip(edges, edges[1:], counts)],
    }


def format_inspect(info: dict, width: int = 40) -> str:
    """`inspect`'s result as text: a summary and a histogram of document lengths."""
    def num(v, fmt="{:,}"):
        return "unknown" if v is None else fmt.format(v)
    ls = info["lengths"]
    lines = [f"corpus     {info['name']} ({info['files']} file{'s' if info['files'] != 1 else ''})",
             f"documents  {num(info['documents'])}",
             f"tokens     {num(info['tokens'])}",
             f"vocab      {num(info['vocab_size'])} (max token id {info['max_token']})",
             f"bytes      {num(info['bytes'])}"
             + ("" if info["tokens_per_byte"] is None else f" ({info['tokens_per_byte']:.3f} tokens per byte)"),
             "doc length min {min} / mean {mean:.1f} / p10 {p10:g} / p50 {p50:g} / p90 {p90:g} / p99 {p99:g} / "
             "max {max} tokens".format(**ls),
             "", "document length (tokens)   documents"]
    peak = max((b["count"] for b in info["histogram"]), default=0) or 1
    for b in info["histogram"]:
        bar = "#" * (0 if not b["count"] else max(1, round(width * b["count"] / peak)))
        lines.append(f"  [{b['lo']:>9,}, {b['hi']:>9,})  {b['count']:>9,}  {bar}")
    return "\n".join(lines)
