"""What a job trains on: the `[data]` settings (each also a `loom train` flag)."""
from __future__ import annotations

from dataclasses import dataclass, field

BUILTIN = "pydoc"        # the default corpus: loom.data.builtin
SYNTHETIC = "synthetic"  # loom.parallel.SyntheticData, the learnable arithmetic task


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    data: str = _f(BUILTIN, "training data: token files (.bin/.npy, memory-mapped), text (.txt/.jsonl/.parquet, "
                            "tokenised on load), several joined by commas or a glob, paths or fsspec URLs; "
                            f"'{BUILTIN}': the Python reference documentation every installation carries "
                            f"(byte-level); '{SYNTHETIC}': a synthetic learnable task (in a job file also a list)",
                 metavar="PATH_OR_URL", joins=",")
    val_data: str = _f("", "held-out data for --eval-every (same forms as --data; default: --val-fraction of "
                           "--data)", metavar="PATH_OR_URL", joins=",")
    val_fraction: float = _f(0.05, "without --val-data: the last fraction of --data's tokens (cut at a document "
                                   "start) held out for evaluation and never trained on (0: none)")
    tokenizer: str = _f("", "text tokenizer: a Hugging Face tokenizers file (tokenizer.json, local) or 'byte' "
                            "(default: 'byte', UTF-8 bytes, vocabulary 256; prepared token files say their own)",
                        metavar="FILE")
    text_field: str = _f("text", "the text field of .jsonl records / column of .parquet files")
    eod_token: int = _f(-1, "token id that ends a document in token files (with a document index too: both "
                            "mark boundaries; -1: none)")
    token_dtype: str = _f("", "dtype of headerless .bin token files without metadata: uint16 or uint32 "
                              "(default: the file's metadata, else uint16)")
    allow_data_change: bool = _f(False, "with --resume: continue at the checkpoint's sample number even when "
                                        "it was saved drawing from other data (another corpus, --seq-len, "
                                        "--seed, --hdp, ...), instead of refusing")
    cross_document_attention: bool = _f(False, "let windows that pack several documents attend across them "
                                               "(plain causal packing) instead of within each document")

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction={self.val_fraction} must be in [0, 1)")
        if self.eod_token < -1:
            raise ValueError(f"--eod-token={self.eod_token} must be a token id >= 0 (or -1: none)")
        if self.token_dtype not in ("", "uint16", "uint32"):
            raise ValueError(f"--token-dtype={self.token_dtype!r} must be uint16 or uint32")
        if not self.data.strip():
            raise ValueError(f"--data is empty: give a path, '{BUILTIN}' or '{SYNTHETIC}'")

    @property
    def synthetic(self) -> bool:
        return self.data == SYNTHETIC

    @property
    def paths(self) -> list[str]:
        return _split(self.data)

    @property
    def val_paths(self) -> list[str]:
        return _split(self.val_data)


def _split(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]
