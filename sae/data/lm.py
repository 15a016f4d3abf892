"""`sae-cache source=lm`: one site's activations of an lm-train model over its corpus, with token ids.

Rows come in sequences: ceil(n_rows / n_ctx) non-overlapping n_ctx-token windows of the chosen split,
in the order `tiled_windows(tokens, n_ctx, n, seed)` gives (a seeded permutation of the windows), each
window's positions 0 … n_ctx − 1 in order, so row r is position r mod n_ctx of sequence r // n_ctx and
its context is rows r − position … r (the store's token ids). The manifest's provenance records the LM
run directory and checkpoint step, the site, the tokenizer, the corpus and split, so evaluation finds
the LM again from the store (`sae.lm.splice.lm_eval_data`); `vocab.json` (a string per token id) lets
`sae-inspect` show the examples' text.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

from sae.data.model_source import capture_site, model_chunks
from sae.data.sources import ROW_SOURCES, Chunk, RowSourceEntry
from sae.errors import DataError, require
from sae.lm.model import resolve_site
from sae.lm.splice import store_loss_recovered
from sae.lm.text import CorpusError, tiled_windows
from sae.lm.train import CHECKPOINTS, corpus_of, load_lm


@dataclasses.dataclass
class LMRowsConfig:
    """`source=lm`: activations at one site of an `lm-train` run, with token ids and positions."""

    name: str = "lm"
    checkpoint: str = "???"  # the lm-train run directory (lm_config.json + checkpoints/)
    site: str = "mlp_post"  # a site name (one of sae.lm.config.SITES; blocks/<layer>/<site> when n_layers > 1)
    split: str = "train"  # train | val: which files' text
    n_rows: int = 1_000_000  # tokens cached, rounded up to whole sequences of the LM's n_ctx
    batch_size: int = 64  # sequences per forward pass

    def check(self) -> None:
        require(bool(self.checkpoint), "source.checkpoint must name an lm-train run directory")
        require(self.split in ("train", "val"), f"source.split={self.split!r} is not one of ['train', 'val']")
        require(self.n_rows > 0, f"source.n_rows={self.n_rows} must be > 0")
        require(self.batch_size > 0, f"source.batch_size={self.batch_size} must be > 0")


class LMRows:
    """`source=lm`: the activations at `cfg.site` of the LM in `cfg.checkpoint`, with token ids and positions."""

    with_tokens = True
    ground_truth = None

    def __init__(self, cfg: LMRowsConfig, chunk_rows: int = 0, seed: int = 0):
        run = Path(cfg.checkpoint).expanduser().absolute()
        try:
            self.model, self.tokenizer, lm_config = load_lm(run)
        except FileNotFoundError as err:
            raise DataError(f"source.checkpoint={cfg.checkpoint!r}: {err}") from None
        try:
            self.site = resolve_site(cfg.site, self.model.cfg.n_layers)
        except ValueError as err:
            raise DataError(f"source.site={cfg.site!r}: {err}") from None
        if cfg.split not in ("train", "val"):
            raise DataError(f"source.split={cfg.split!r} is not one of ['train', 'val']")
        if cfg.batch_size <= 0:
            raise DataError(f"source.batch_size={cfg.batch_size} must be > 0")
        n_ctx = self.model.cfg.n_ctx
        self.n_sequences = math.ceil(cfg.n_rows / n_ctx)
        try:
            tokens = corpus_of(lm_config).tokens(cfg.split, self.tokenizer)
            self.windows = tiled_windows(tokens, n_ctx, self.n_sequences, seed)
        except CorpusError as err:
            raise DataError(f"source.n_rows={cfg.n_rows} (source.split={cfg.split}): {err}") from None
        self.batch_size = cfg.batch_size
        self.n_rows = self.n_sequences * n_ctx
        self.resume_unit = n_ctx  # shards of whole sequences
        name = self.site.rsplit("/", 1)[-1]
        self.d_in = self.model.cfg.d_mlp if name in ("mlp_pre", "mlp_post") else self.model.cfg.d_model
        steps = sorted(int(p.name) for p in (run / CHECKPOINTS).iterdir() if p.name.isdigit())
        self.provenance = {
            "source": "lm",
            "model": str(run),
            "model_step": steps[-1] if steps else None,
            "site": self.site,
            "tokenizer": self.tokenizer.to_dict(),
            "context_length": n_ctx,
            "rows_per_sequence": n_ctx,
            "dataset": {**lm_config["corpus"], "split": cfg.split},
            "n_sequences": self.n_sequences,
            "lm_model": lm_config["model"],
            "config": dataclasses.asdict(cfg),
            "seed": seed,
        }

    def chunks(self, start: int) -> Iterator[Chunk]:
        batches = (self.windows[i : i + self.batch_size] for i in range(0, len(self.windows), self.batch_size))
        return model_chunks(capture_site(self.model, self.site), batches, start, self.n_sequences)

    def files(self) -> dict[str, str]:
        return {"vocab.json": json.dumps(self.tokenizer.token_strings())}  # token strings for sae-inspect


ROW_SOURCES.register("lm", RowSourceEntry(LMRowsConfig, LMRows, loss_recovered=store_loss_recovered))
