"""Text with no downloads, its tokenizer, and [batch, n_ctx] token windows (NumPy).

The corpus is a directory of text files, by default the Python standard library's own source
(`sysconfig.get_paths()["stdlib"]`, *.py, skipping site-packages and test directories): it exists on
every machine with Python. Files are taken in sorted order of their relative paths; a file belongs to
the validation split when the BLAKE2b hash of its relative path, read as a fraction in [0, 1), is below
val_fraction, so the split is by file, deterministic, and stable when files are added or removed.

Tokenizers (the `tokenizers` library, saved as tokenizer.json beside the model). `bpe` (the default):
byte-level BPE with 1024 tokens trained on the training files (GPT-2's pre-tokenizer), about 2.5 bytes
per token on the stdlib validation files; its tokens (`self`, ` return`, an indentation run) read as
units in the feature browser. `bytes`: the same with no merges (EOT and the 256 bytes). Both encode any
text and decode exactly. A `.txt` or `.jsonl` corpus (`sae-cache source=hf`) splits into documents the
same way, by a hash of each document's id.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from sae.config import CorpusConfig
from sae.errors import DataError
from sae.lm.config import LMCorpusConfig
from sae.models.tokenizer import Tokenizer


class CorpusError(DataError):
    """A corpus that cannot be used; the message names the path or field."""


EOT = "<|endoftext|>"  # ends each document (token 0)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (Sennrich et al. 2016, as GPT-2: its pre-tokenizer regex and byte alphabet) trained on
    `texts` with the `tokenizers` library: EOT = 0, the 256 bytes, then vocab_size − 257 merges (fewer when
    the text runs out of pairs). vocab_size = 257 gives the bytes alone."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok, bos_id=None, eos_id=tok.token_to_id(EOT))


def build_tokenizer(cfg: LMCorpusConfig, corpus: Corpus) -> Tokenizer:
    """The tokenizer cfg.tokenizer names: bytes, or a BPE of cfg.bpe_vocab_size trained on the training files."""
    if cfg.tokenizer == "bpe":
        return train_tokenizer(corpus.texts("train"), cfg.bpe_vocab_size)
    return train_tokenizer([], 257)


def token_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Bytes per token id: [vocab_size] int64 (EOT: 0)."""
    return np.array(
        [0 if i == tokenizer.eos_id else len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], np.int64
    )


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Whether a document (by its id: a '/'-separated relative path, or 'file:line') is held out:
    BLAKE2b(id) / 2⁶⁴ < val_fraction."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


@dataclass(frozen=True)
class Corpus:
    """The documents of a corpus, split into train and validation by a hash of their ids.

    root: a directory (each matching file is a document, its id the relative path), a `.jsonl` file (each
    line's "text" is a document, id 'name:line') or a `.txt` file (paragraphs separated by blank lines,
    id 'name:paragraph'). `inline` holds the texts of a file corpus (a directory's are read when asked).
    header: a first line put before each text, `{id}` replaced by the document's id ('# Lib/{id}': its path).
    """

    root: Path
    docs: tuple[str, ...]
    val_fraction: float
    inline: tuple[str, ...] | None = None
    header: str = ""

    def split(self, name: str) -> list[str]:
        """The document ids of split 'train' or 'val', in corpus order."""
        if name not in ("train", "val"):
            raise CorpusError(f"split={name!r} is not one of ['train', 'val']")
        return [d for d in self.docs if is_validation(d, self.val_fraction) == (name == "val")]

    def texts(self, name: str) -> list[str]:
        """The text of each document of a split (CorpusError naming a file that is not UTF-8 text)."""
        keep = set(self.split(name))
        if self.inline is not None:
            texts = [(d, t) for d, t in zip(self.docs, self.inline) if d in keep]
        else:
            texts = [(d, read_text_file(self.root / d).decode("utf-8")) for d in self.docs if d in keep]
        return [self.header.replace("{id}", d) + "\n" + t for d, t in texts] if self.header else [t for _, t in texts]

    def tokens(self, name: str, tokenizer: Tokenizer) -> np.ndarray:
        """The split as one token stream [n_tokens] (int32): each document's tokens followed by the
        tokenizer's end-of-text token (its BOS when it has no EOS; nothing when it has neither)."""
        texts = self.texts(name)
        if not texts:
            raise CorpusError(
                f"the {name} split of '{self.root}' holds no documents "
                f"(corpus.val_fraction={self.val_fraction}, {len(self.docs)} documents)"
            )
        sep = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
        end = np.array([] if sep is None else [sep], np.int32)
        return np.concatenate([part for ids in tokenizer.encode_batch(texts) for part in (ids, end)])

    def describe(self) -> dict:
        """Provenance: root, document counts, characters per split, and the Python version (whose stdlib it
        may be)."""
        sizes = {s: sum(len(t) for t in self.texts(s)) for s in ("train", "val")}
        return {
            "root": str(self.root),
            "files": len(self.docs),
            "train_files": len(self.split("train")),
            "val_files": len(self.split("val")),
            "train_chars": sizes["train"],
            "val_chars": sizes["val"],
            "python": sys.version.split()[0],
        }


def read_text_file(path: Path) -> bytes:
    """A corpus file's bytes; CorpusError naming it when it is binary (a NUL byte) or not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CorpusError(f"corpus.path: {path} cannot be read ({err.strerror or err})") from None
    advice = "give text files (corpus.pattern selects them)"
    nul = data.find(b"\0")
    try:
        data[: nul if nul >= 0 else len(data)].decode("utf-8")
    except UnicodeDecodeError as err:  # before the first NUL: the earlier problem is named
        byte = data[err.start]
        raise CorpusError(
            f"corpus.path: {path} is not UTF-8 text (byte 0x{byte:02x} at offset {err.start}); {advice}"
        ) from None
    if nul >= 0:
        raise CorpusError(f"corpus.path: {path} is binary, not text (a NUL byte at offset {nul}); {advice}")
    return data


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _file_documents(path: Path) -> list[tuple[str, str]]:
    """(id, text) of each document of a .jsonl or .txt corpus file."""
    text = read_text_file(path).decode("utf-8")
    if path.suffix == ".txt":
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
        return [(f"{path.name}:{i}", p) for i, p in enumerate(paragraphs) if p.strip()]
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise CorpusError(f"corpus.path: {path} line {i} is not JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f'corpus.path: {path} line {i} has no "text" string field')
        if record["text"].strip():
            docs.append((f"{path.name}:{i}", record["text"]))
    return docs


def find_corpus(cfg: CorpusConfig) -> Corpus:
    """The corpus at cfg.path: a directory's files matching cfg.pattern outside cfg.exclude directories (the
    stdlib when cfg.path is null), or the documents of a .jsonl / .txt file."""
    root = (Path(cfg.path).expanduser() if cfg.path else stdlib_dir()).absolute()
    if root.is_file():
        if root.suffix not in (".txt", ".jsonl"):
            raise CorpusError(f"corpus.path={str(root)!r} is a file but not .txt or .jsonl (or give a directory)")
        docs = _file_documents(root)
        if not docs:
            raise CorpusError(f"corpus.path={str(root)!r} holds no text")
        return Corpus(root, tuple(d for d, _ in docs), cfg.val_fraction, tuple(t for _, t in docs), cfg.header)
    if not root.is_dir():
        raise CorpusError(f"corpus.path={str(root)!r} is neither a directory nor a .txt or .jsonl file")
    exclude = set(cfg.exclude)
    skipped = lambda name: any(fnmatch.fnmatch(name, glob) for glob in exclude)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skipped(d)]
        for name in filenames:
            if fnmatch.fnmatch(name, cfg.pattern) and not skipped(name):
                path = Path(dirpath) / name
                if path.is_file():
                    files.append(path.relative_to(root).as_posix())
    if not files:
        raise CorpusError(
            f"corpus.path={str(root)!r} holds no files matching corpus.pattern={cfg.pattern!r} "
            f"outside corpus.exclude={sorted(exclude)}"
        )
    for file in files:  # before any tokenizer training: every file must be text
        read_text_file(root / file)
    return Corpus(root, tuple(sorted(files)), cfg.val_fraction, header=cfg.header)


def random_windows(tokens: np.ndarray, n_ctx: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """`batch` windows of n_ctx consecutive tokens at uniform random starts: [batch, n_ctx] int32."""
    if len(tokens) < n_ctx:
        raise CorpusError(f"a token stream of {len(tokens)} tokens is shorter than one window of {n_ctx}")
    starts = rng.integers(0, len(tokens) - n_ctx + 1, batch)
    return tokens[starts[:, None] + np.arange(n_ctx)].astype(np.int32)


def tiled_windows(tokens: np.ndarray, n_ctx: int, n: int | None = None, seed: int = 0) -> np.ndarray:
    """n non-overlapping windows [n, n_ctx] int32 (all len // n_ctx of them when n is None), in an order
    shuffled by `seed`: window i covers tokens[j·n_ctx : (j+1)·n_ctx] for the i-th j of the permutation."""
    available = len(tokens) // n_ctx
    n = available if n is None else n
    if n > available:
        raise CorpusError(f"{n} windows of {n_ctx} tokens requested; the split holds only {available}")
    order = np.random.default_rng(seed).permutation(available)[:n]
    return tokens[order[:, None] * n_ctx + np.arange(n_ctx)].astype(np.int32)
