"""The corpus every Python installation carries: the interpreter's reference
documentation (`pydoc_data.topics`, the text `help()` shows), one document
per topic in sorted order, UTF-8 bytes as tokens.  About 0.5 MB of English
technical prose: real text for `loom train` with no arguments and no
download."""
from __future__ import annotations

import numpy as np

from .corpus import Corpus
from .tokenizers import ByteTokenizer

NAME = "pydoc"


def pydoc_corpus() -> Corpus:
    """`pydoc_data.topics` as a byte-level `Corpus` (vocab 256).  Raises
    ValueError when this Python was built without pydoc_data."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # a stripped-down Python
        raise ValueError("the built-in corpus needs pydoc_data (part of the standard library), which this "
                         "Python lacks: pass --data PATH (or --data synthetic)") from exc
    tok = ByteTokenizer()
    docs = [tok.encode(topics[name]) for name in sorted(topics)]
    docs = [d for d in docs if len(d)]
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    tokens = np.concatenate(docs).astype(np.uint8)
    return Corpus(tokens, starts, name="pydoc_data.topics", vocab_size=tok.vocab_size, num_bytes=len(tokens),
                  max_token=int(tokens.max()))
