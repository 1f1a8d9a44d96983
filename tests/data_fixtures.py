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
