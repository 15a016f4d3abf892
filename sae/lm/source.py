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
import time
from pathlib import Path

from sae.data.arrays import DataError
from sae.data.model_source import cache_model, capture_site
from sae.data.store import StoreWriter
from sae.lm.config import LMSourceConfig
from sae.lm.model import resolve_site
from sae.lm.text import CorpusError, tiled_windows
from sae.lm.train import CHECKPOINTS, corpus_of, load_lm


class LMCacheSource:
    """The activations at `cfg.site` of the LM in `cfg.checkpoint`, ready to be written by `write_store`."""

    def __init__(self, cfg: LMSourceConfig, seed: int = 0):
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
        name = self.site.rsplit("/", 1)[-1]
        self.d_in = self.model.cfg.d_mlp if name in ("mlp_pre", "mlp_post") else self.model.cfg.d_model
        steps = sorted(int(p.name) for p in (run / CHECKPOINTS).iterdir() if p.name.isdigit())
        self.provenance = {
            "source": "lm", "model": str(run), "model_step": steps[-1] if steps else None, "site": self.site,
            "tokenizer": self.tokenizer.to_dict(), "context_length": n_ctx, "rows_per_sequence": n_ctx,
            "dataset": {**lm_config["corpus"], "split": cfg.split}, "n_sequences": self.n_sequences,
            "lm_model": lm_config["model"], "config": dataclasses.asdict(cfg), "seed": seed,
        }

    def write_store(self, cfg) -> dict:
        """Write the store cfg.out (CacheConfig: dtype, shard_rows), resuming an interrupted run; its manifest."""
        t0 = time.perf_counter()
        provenance = json.loads(json.dumps(self.provenance))
        writer = StoreWriter(Path(cfg.out).expanduser(), self.d_in, cfg.dtype, cfg.shard_rows, provenance=provenance,
                             with_tokens=True)
        print(f"cache: {self.n_rows} rows × {self.d_in} ({self.n_sequences} sequences of {self.windows.shape[1]} "
              f"tokens) at {self.site} of '{self.provenance['model']}' into '{writer.path}' ({cfg.dtype}, "
              f"{cfg.shard_rows} rows per shard)", flush=True)
        (writer.path / "vocab.json").write_text(json.dumps(self.tokenizer.token_strings()))  # for sae-inspect
        batches = (self.windows[i : i + self.batch_size] for i in range(0, len(self.windows), self.batch_size))
        cache_model(capture_site(self.model, self.site), batches, writer, n_sequences=self.n_sequences,
                    log=lambda line: print(f"cache: {line}", flush=True))
        manifest = writer.close()
        print(f"cache: wrote {manifest['n_rows']} rows in {len(manifest['shards'])} shards to '{writer.path}' "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        return manifest
