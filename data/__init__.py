"""loom.data: token sources, tokenizers and deterministic document-aware batches.

A `Corpus` is a stream of token ids cut into documents (token files,
memory-mapped; text corpora tokenised on load; the built-in default text).
`TokenWindows` samples fixed-length training windows from it as a pure
function of (seed, step, index), with the document boundaries inside each
window (``cu_seqlens``); `DocumentDraws` draws whole documents for
variable-length (hybrid data parallel) batches.
"""
from .corpus import Corpus, Entropy
from .sampling import DocumentDraws, SamplePosition, TokenWindows, permute

__all__ = ["Corpus", "DocumentDraws", "Entropy", "SamplePosition", "TokenWindows", "permute"]
