"""A checkpoint's tokenizer: `tokenizer.json` read by the `tokenizers` library, with the model's BOS/EOS ids."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from sae.models.base import ModelError

TOKENIZER = "tokenizer.json"


class Tokenizer:
    """text <-> token ids. bos_id / eos_id: from the model's config.json (None when it has none)."""

    def __init__(self, tokenizer: HFTokenizer, bos_id: int | None = None, eos_id: int | None = None):
        # A tokenizer.json may carry padding and truncation (all-MiniLM-L6-v2's: pad and cut to 128); as
        # transformers does by default, encode whole texts without either, so no [PAD] ids join the tokens.
        tokenizer.no_padding()
        tokenizer.no_truncation()
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

    @functools.cached_property
    def decoder(self) -> dict:
        """tokenizer.json's decoder: {"type": "ByteLevel"} for byte-level BPE (GPT-2, Llama 3, Qwen2, ours),
        {"type": "WordPiece", "prefix": "##"} for BERT, …"""
        return json.loads(self.tokenizer.to_str()).get("decoder") or {}

    @property
    def byte_level(self) -> bool:
        """Whether tokens are strings over GPT-2's byte alphabet."""
        return self.decoder.get("type") == "ByteLevel"

    @functools.cached_property
    def special(self) -> set[int]:
        return {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for in running text (a special token: its text). WordPiece pieces read
        as byte-level ones do: a word-initial piece with its leading space, a `##` continuation without."""
        piece = self.tokenizer.id_to_token(token)
        if piece is None:
            return b""
        if self.byte_level and all(c in BYTE_OF for c in piece):
            return bytes(BYTE_OF[c] for c in piece)
        if self.decoder.get("type") == "WordPiece" and token not in self.special:
            prefix = self.decoder.get("prefix", "##")
            return (piece[len(prefix) :] if piece.startswith(prefix) else " " + piece).encode("utf-8")
        return self.tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")

    def token_strings(self) -> list[str]:
        """A display string per token id (bytes that are not whole UTF-8 as \\xNN): the store's vocab.json."""
        return [self.token_bytes(i).decode("utf-8", "backslashreplace") for i in range(self.vocab_size)]

    def to_dict(self) -> dict:
        return {"kind": "tokenizers", "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id}


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's reversible map of bytes to printable characters (`bytes_to_unicode`), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_OF = _byte_alphabet()
