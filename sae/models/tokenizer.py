"""A checkpoint's tokenizer: `tokenizer.json` read by the `tokenizers` library, with the model's BOS/EOS ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from sae.models.base import ModelError

TOKENIZER = "tokenizer.json"


class Tokenizer:
    """text <-> token ids. bos_id / eos_id: from the model's config.json (None when it has none)."""

    def __init__(self, tokenizer: HFTokenizer, bos_id: int | None = None, eos_id: int | None = None):
        self.tokenizer, self.bos_id, self.eos_id = tokenizer, bos_id, eos_id

    @classmethod
    def from_dir(cls, path: str | Path, bos_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
        file = Path(path) / TOKENIZER
        if not file.is_file():
            raise ModelError(f"'{path}' has no {TOKENIZER} (the tokenizer, in the `tokenizers` library's format)")
        try:
            return cls(HFTokenizer.from_file(str(file)), bos_id, eos_id)
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            raise ModelError(f"{file} is not a readable tokenizer ({err})") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, special: bool = False) -> np.ndarray:
        """text -> token ids [n] int32; `special` adds the tokenizer's own template (BERT's [CLS] … [SEP])."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=special).ids, np.int32)

    def encode_batch(self, texts: list[str], special: bool = False) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self.tokenizer.encode_batch(texts, add_special_tokens=special)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def token_strings(self) -> list[str]:
        """A display string per token id (its decoded text; a piece that is not whole UTF-8 shows as
        replacement characters): the store's vocab.json, for sae-inspect."""
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]

    def to_dict(self) -> dict:
        return {"kind": "tokenizers", "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id}
