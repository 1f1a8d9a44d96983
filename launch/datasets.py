"""The job's data: `[data]` settings to training and held-out sources.

`open_job_data` builds, on every rank alike, the training source (a
`loom.data.TokenWindows`; `loom.data.DocumentDraws` under ``--hdp``; or the
synthetic task) and the held-out one, all pure functions of (seed, step,
index).  `data_problems` opens the same data on the driver before any worker
starts, so a missing file, an empty corpus, a token id outside the model's
vocabulary or a corpus shorter than one window is a ConfigError there.
The driver's vocabulary check reads no remote corpus whose metadata bounds
its ids (see `Corpus.check_vocab`); the workers' sources check every batch
they read against the model's vocabulary when it is known (`known_vocab`).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

from loom.data import Corpus, DocumentDraws, TokenWindows
from loom.data.config import BUILTIN
from loom.parallel import SyntheticData


@dataclass
class JobData:
    """``train``: what steps draw from; ``heldout``: what evaluation reads (None
    without a validation split or without ``--eval-every``); ``val``: the held-out corpus (None for the
    synthetic task); ``documents``: whether batches carry ``cu_seqlens``."""
    train: object
    heldout: object | None
    val: Corpus | None = None
    documents: bool = False

    def bits_per_byte(self, loss_nats: float) -> float | None:
        """A held-out loss (nats per token) in bits per byte of the held-out
        text, when its bytes are known (always for byte-level data)."""
        if self.val is None or not self.val.num_bytes:
            return None
        return loss_nats / math.log(2) * len(self.val) / self.val.num_bytes


def open_corpora(cfg) -> tuple[Corpus, Corpus | None]:
    """(training corpus, held-out corpus or None) for a real-data job.
    Raises ValueError/FileNotFoundError naming the file."""
    d = cfg.data
    if d.paths == [BUILTIN]:
        from loom.data.builtin import pydoc_corpus
        corpus = pydoc_corpus()
    else:
        corpus = _open(d, d.paths)
    if d.val_data:
        try:
            return corpus, _open(d, d.val_paths)
        except Exception as exc:
            exc.flag = "--val-data"  # what data_problems names: the held-out files, not --data
            raise
    return corpus.split(d.val_fraction)


def _open(d, paths) -> Corpus:
    from loom.data import open_corpus
    return open_corpus(paths, tokenizer=d.tokenizer or None, text_field=d.text_field,
                       eod_token=None if d.eod_token < 0 else d.eod_token, token_dtype=d.token_dtype or None)


def open_job_data(cfg, world: int, corpora: tuple[Corpus, Corpus | None] | None = None) -> JobData:
    """The training and held-out sources of ``cfg`` (see the module doc);
    ``corpora``: `open_corpora`'s result when it is already open."""
    t = cfg.train
    if cfg.data.synthetic:
        data = SyntheticData(cfg.model.vocab, t.seq_len, t.seed)
        return JobData(data, data.heldout())
    train, val = corpora or open_corpora(cfg)
    documents = not cfg.data.cross_document_attention
    # every batch is checked against the model's vocabulary when it is known (the driver's check trusts remote
    # metadata)
    vocab = known_vocab(cfg)
    if cfg.parallel.hdp:
        from .config import varlen_options
        source = DocumentDraws(train, t.batch_size, varlen_options(cfg)["max_len"], seed=t.seed, vocab=vocab)
    else:
        source = TokenWindows(train, t.seq_len, t.batch_size, seed=t.seed, documents=documents, vocab=vocab)
    # held-out windows in a fixed spread-out order: every evaluation reads the same ones (none without eval)
    heldout = None
    if val is not None and t.eval_every:
        try:
            heldout = TokenWindows(val, t.seq_len, t.batch_size, seed=t.seed, documents=documents, vocab=vocab)
        except ValueError as exc:  # e.g. a held-out split shorter than one window
            raise ValueError(f"{exc}; it is the held-out data of --eval-every: give more (--val-fraction, "
                             f"--val-data) or --eval-every 0") from exc
    return JobData(source, heldout, val, documents)


def known_vocab(cfg) -> int | None:
    """The model's vocabulary size when the job knows it before any forward:
    loom's reference model's ``--vocab``, or a ``--hf-config`` model's
    ``vocab_size`` (read into ``[model]``); None for another ``--model``
    (it says its vocabulary only at its first forward)."""
    t = cfg.train
    return cfg.model.vocab if not t.model or t.hf_config else None


def model_vocab_problem(cfg, corpus: Corpus) -> str | None:
    try:
        corpus.check_vocab(cfg.model.vocab)
    except ValueError as exc:
        if cfg.train.hf_config:
            return (f"{exc} [this vocabulary is the vocab_size of --hf-config {cfg.train.hf_config}, which "
                    f"--vocab does not change: use a tokenizer within it]")
        return str(exc)
    return None


def data_problems(cfg, world: int) -> list[str]:
    """What stops ``cfg``'s data from training, found on the driver (empty:
    nothing).  Opens the data as the workers will."""
    if cfg.data.synthetic:
        return []
    problems = []
    try:
        train, val = open_corpora(cfg)
    except (ValueError, OSError) as exc:
        return [f"{getattr(exc, 'flag', '--data')}: {exc}"]
    except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer library's own error: a line, not a traceback
        return [f"{getattr(exc, 'flag', '--data')}: {type(exc).__name__}: {exc}"]
    if known_vocab(cfg) is not None:
        for corpus in (train, val):
            problem = corpus is not None and model_vocab_problem(cfg, corpus)
            if problem:
                problems.append(problem)
                break
    try:
        open_job_data(cfg, world, (train, val))
    except ValueError as exc:  # e.g. a corpus shorter than one window
        problems.append(f"--data: {exc}")
    if cfg.train.eval_every and val is None:
        problems.append("--eval-every needs held-out data: --val-fraction > 0 or --val-data "
                        "(or --eval-every 0)")
    return problems


def forward_takes_documents(model) -> bool:
    """Whether ``model.forward`` accepts ``cu_seqlens`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "cu_seqlens" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
