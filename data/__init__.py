"""loom.data: token sources, tokenizers and deterministic document-aware batches.

A `Corpus` is a stream of token ids cut into documents (token files,
memory-mapped; text corpora tokenised on load; the built-in default text).
`open_corpus` opens any of them (local paths, globs, fsspec URLs);
`prepare` tokenises text once into a token file.
`TokenWindows` samples fixed-length training windows from it as a pure
function of (seed, step, index), with the document boundaries inside each
window (``cu_seqlens``); `DocumentDraws` draws whole documents for
variable-length (hybrid data parallel) batches.
"""
from .corpus import Corpus, Entropy
from .prepare import format_inspect, inspect, prepare
from .sampling import DocumentDraws, SamplePosition, TokenWindows, permute
from .sources import open_corpus
from .tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "Corpus", "DocumentDraws", "Entropy", "HFTokenizer", "SamplePosition", "TokenWindows",
           "format_inspect", "inspect", "load_tokenizer", "open_corpus", "permute", "prepare"]
