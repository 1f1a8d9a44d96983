"""Small local inputs for the loom.data tests: a tokenizer.json trained here (no hub)."""
from __future__ import annotations

import os

WORDS = ["the cat sat on the mat", "a dog ate the bone", "the cat and the dog", "on a mat sat a cat"]


def make_tokenizer(directory) -> str:
    """A word-level tokenizer (whitespace split, [UNK]) trained on `WORDS`, saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(WORDS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOD]"]))
    path = os.path.join(str(directory), "tokenizer.json")
    tok.save(path)
    return path


class StallingTokenizer:
    """Byte-level, but its first `encode_batch` touches ``marker`` and then sleeps ``seconds``
    (a prepare worker caught mid-file); picklable, for prepare's spawned workers."""

    name, vocab_size = "stalling", 256

    def __init__(self, marker: str, seconds: float = 120.0):
        self.marker, self.seconds = marker, seconds

    def encode_batch(self, texts):
        import time

        import numpy as np
        open(f"{self.marker}.{os.getpid()}", "w").close()
        time.sleep(self.seconds)
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def encode(self, text):
        return self.encode_batch([text])[0]
