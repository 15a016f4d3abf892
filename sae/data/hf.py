"""`sae-cache source=hf`: activations of a Hugging Face checkpoint (sae/models/) at one or more sites.

Text comes from `corpus` (a directory of text files, by default the Python standard library; a .txt; a
.jsonl): its documents in an order shuffled by the cache's `seed`, tokenized by the checkpoint's
tokenizer.json into one stream, each followed by the model's end-of-text token. The stream is cut in
order into sequences of n_ctx tokens, each wrapped in the
tokenizer's own template (BERT: [CLS] … [SEP]; Llama: BOS …) or, when it has none, led by the model's
BOS when its config names one (GPT-2: <|endoftext|>, as TransformerLens does); the in-house LM has
neither. The template's positions are left out of the store unless keep_bos=true (their norms are
outliers). Row r is position `positions[r]` of sequence r // rows_per_sequence; one forward pass fills
every site's store in the same row order, so two sites of a store pair are (input, target) rows.

The manifest's provenance records the model directory, its model_type, the site (`hook_name`), the
tokenizer and corpus, so `sae-train` can splice an SAE back in (`store_loss_recovered`: loss recovered
for a causal LM, embedding cosine for an encoder, on the corpus's held-out documents) and `sae-inspect`
can show the examples' text (`vocab.json`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from sae.config import CorpusConfig, MeshConfig
from sae.data.sources import ROW_SOURCES, Chunk, RowSourceEntry
from sae.errors import DataError, require
from sae.lm.text import Corpus, CorpusError, find_corpus
from sae.models.base import SITE_NAMES, ModelError, shard, site_names
from sae.models.loading import DTYPES, load
from sae.models.splice import embedding_cosine, loss_recovered, replacement_loss
from sae.models.tokenizer import Tokenizer
from sae.parallel import make_mesh


@dataclasses.dataclass
class HFRowsConfig:
    """`source=hf`: a Hugging Face checkpoint's activations at `sites` over `corpus` (top-level key)."""

    name: str = "hf"
    path: str = "???"  # the checkpoint directory: config.json, model.safetensors(.index.json), tokenizer.json
    sites: list[str] = dataclasses.field(default_factory=lambda: ["blocks.0.hook_resid_post"])  # hook names
    n_rows: int = 1_000_000  # rows per site, rounded up to whole sequences
    n_ctx: int | None = None  # tokens per sequence, template included; null: the model's positions, ≤ 1024
    batch_size: int = 32  # sequences per forward pass
    keep_bos: bool = False  # keep the template's positions (BOS; BERT's [CLS] and [SEP]) in the store
    dtype: str = "float32"  # the model's weights and compute: float32 | bfloat16 | float16
    model_shards: int = 1  # devices the weights are split over (a model that does not fit one device)
    split: str = "train"  # train | val: which of the corpus's documents

    def check(self) -> None:
        require(bool(self.path) and self.path != "???", "source.path must name a Hugging Face checkpoint directory")
        require(len(self.sites) > 0, "source.sites must name at least one site (e.g. [blocks.0.hook_resid_post])")
        require(len(set(self.sites)) == len(self.sites), f"source.sites={list(self.sites)} names a site twice")
        require(self.n_rows > 0, f"source.n_rows={self.n_rows} must be > 0")
        require(self.n_ctx is None or self.n_ctx >= 2, f"source.n_ctx={self.n_ctx} must be ≥ 2")
        require(self.batch_size > 0, f"source.batch_size={self.batch_size} must be > 0")
        require(self.dtype in DTYPES, f"source.dtype={self.dtype!r} is not one of {list(DTYPES)}")
        require(self.model_shards >= 1, f"source.model_shards={self.model_shards} must be ≥ 1")
        require(self.split in ("train", "val"), f"source.split={self.split!r} is not one of ['train', 'val']")


def template(tokenizer: Tokenizer, bos_id: int | None) -> tuple[list[int], list[int]]:
    """(prefix, suffix) token ids the tokenizer wraps a text in; [bos], [] when it adds none but the model
    has a BOS."""
    plain, special = tokenizer.encode("a"), tokenizer.encode("a", special=True)
    for i in range(len(special) - len(plain) + 1):
        if list(special[i : i + len(plain)]) == list(plain):
            prefix, suffix = [int(t) for t in special[:i]], [int(t) for t in special[i + len(plain) :]]
            break
    else:
        prefix, suffix = [], []
    if not prefix and not suffix and bos_id is not None:
        prefix = [bos_id]
    return prefix, suffix


def document_order(n: int, seed: int) -> np.ndarray:
    """The order documents are read in: a permutation of range(n) by `seed` (a corpus sorted by path, such as
    the stdlib, is clustered by package: a store of its first rows would be too)."""
    return np.random.default_rng(seed).permutation(n)


def sequences(
    corpus: Corpus,
    split: str,
    tokenizer: Tokenizer,
    prefix: list[int],
    suffix: list[int],
    n_ctx: int,
    n: int,
    seed: int = 0,
) -> np.ndarray:
    """The first n sequences [n, n_ctx] int32: the split's documents in `document_order(…, seed)`, tokenized
    into one stream, cut in order into n_ctx − |prefix| − |suffix| tokens, each wrapped in prefix … suffix.
    Documents are tokenized only as far as needed."""
    body = n_ctx - len(prefix) - len(suffix)
    if body < 1:
        raise DataError(f"source.n_ctx={n_ctx} leaves no room for text inside the template {prefix} … {suffix}")
    sep = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    texts, parts, have = corpus.texts(split), [], 0
    texts = [texts[i] for i in document_order(len(texts), seed)]
    for i in range(0, len(texts), 256):
        for ids in tokenizer.encode_batch(texts[i : i + 256]):
            parts += [ids] if sep is None else [ids, np.array([sep], np.int32)]
            have += len(ids) + (sep is not None)
        if have >= n * body:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    if len(stream) < n * body:
        raise CorpusError(
            f"the {split} split of corpus '{corpus.root}' holds {len(stream):,} tokens: {len(stream) // body:,} "
            f"sequences of {n_ctx}, fewer than the {n:,} asked for (lower source.n_rows or give more text)"
        )
    body_ids = stream[: n * body].reshape(n, body)
    wrap = [np.broadcast_to(np.asarray(p, np.int32), (n, len(p))) for p in (prefix, suffix)]
    return np.concatenate([wrap[0], body_ids, wrap[1]], axis=1).astype(np.int32)


def model_name(path: Path) -> str:
    """What SAELens calls the model: the checkpoint folder's name (an lm-train run's `<run>/hf`: the run's)."""
    return path.parent.name if path.name == "hf" and (path.parent / "lm_config.json").is_file() else path.name


def _checked_sites(sites: list[str], n_layers: int) -> list[str]:
    valid = site_names(n_layers)
    for site in sites:
        if site not in valid:
            raise DataError(
                f"source.sites: {site!r} is not a site of this model; its sites are blocks.<0..{n_layers - 1}>."
                f"{{{', '.join(SITE_NAMES)}}}"
            )
    return list(sites)


class HFRows:
    """`source=hf`: rows [n, d] per site, token ids and positions; `sites` > 1 writes one store per site."""

    with_tokens = True
    ground_truth = None

    def __init__(self, cfg: HFRowsConfig, chunk_rows: int = 0, seed: int = 0, corpus: CorpusConfig | None = None):
        path = Path(cfg.path).expanduser().absolute()
        self.model, self.tokenizer = load(path, cfg.dtype)
        if cfg.model_shards > 1:
            if cfg.model_shards > jax.device_count():
                raise DataError(f"source.model_shards={cfg.model_shards} exceeds the {jax.device_count()} devices")
            self.model = shard(self.model, make_mesh(MeshConfig(data=1, model=cfg.model_shards)))
        c = self.model.config
        self.sites = _checked_sites(list(cfg.sites), c.n_layers)
        n_ctx = cfg.n_ctx if cfg.n_ctx is not None else min(c.n_ctx, 1024)
        if n_ctx > c.n_ctx:
            raise DataError(f"source.n_ctx={n_ctx} exceeds the model's {c.n_ctx} positions ({path / 'config.json'})")
        corpus_cfg = corpus or CorpusConfig()
        self.corpus = find_corpus(corpus_cfg)
        self.prefix, self.suffix = template(self.tokenizer, c.bos_token_id)
        if any(t >= c.vocab_size for t in self.prefix + self.suffix):
            raise DataError(
                f"{path / 'config.json'}: the sequences' special tokens {self.prefix + self.suffix} (bos_token_id, "
                f"the tokenizer's template) must be below vocab_size={c.vocab_size}"
            )
        self.keep = slice(0, n_ctx) if cfg.keep_bos else slice(len(self.prefix), n_ctx - len(self.suffix))
        per_seq = len(range(n_ctx)[self.keep])
        self.n_sequences = math.ceil(cfg.n_rows / per_seq)
        self.windows = sequences(
            self.corpus, cfg.split, self.tokenizer, self.prefix, self.suffix, n_ctx, self.n_sequences, seed
        )
        if self.windows.max() >= c.vocab_size:
            raise DataError(
                f"{path / 'tokenizer.json'} gives token id {int(self.windows.max())}, beyond the model's "
                f"vocab_size={c.vocab_size} ({path / 'config.json'}): the tokenizer is not this model's"
            )
        self.batch_size, self.n_rows, self.resume_unit = cfg.batch_size, self.n_sequences * per_seq, per_seq
        self.site_dims = {site: self.model.site_dim(site) for site in self.sites}
        self.d_in = self.site_dims[self.sites[0]]
        self.base_provenance = {
            "source": "hf",
            "model": str(path),
            "model_name": model_name(path),
            "model_type": c.model_type,
            "causal": c.causal,
            "sites": self.sites,
            "tokenizer": {**self.tokenizer.to_dict(), "path": str(path / "tokenizer.json")},
            "context_length": n_ctx,
            "rows_per_sequence": per_seq,
            "template": {"prefix": self.prefix, "suffix": self.suffix, "kept": cfg.keep_bos},
            "dataset": {**dataclasses.asdict(corpus_cfg), "path": str(self.corpus.root), "split": cfg.split},
            "corpus": self.corpus.describe(),
            "n_sequences": self.n_sequences,
            "config": dataclasses.asdict(cfg),
            "seed": seed,
        }
        self.provenance = self.provenance_of(self.sites[0])

    def provenance_of(self, site: str) -> dict:
        """The manifest provenance of one site's store."""
        return {**self.base_provenance, "hook_name": site, "site": site}

    def chunks(self, start: int) -> Iterator[Chunk]:
        """Rows from `start` (a multiple of rows_per_sequence): Chunk(rows {site: [n, d]}, tokens, positions).
        The next batch is dispatched before the last one's activations come to the host."""
        graphdef, state = nnx.split(self.model)
        sites, keep = self.sites, self.keep

        @jax.jit
        def acts(state, tokens):
            _, got = nnx.merge(graphdef, state)(tokens, capture=sites)
            return {s: got[s][:, keep] for s in sites}

        positions = np.arange(self.windows.shape[1])[keep].astype(np.int32)
        first = start // self.resume_unit
        pending = None
        for lo in range(first, self.n_sequences, self.batch_size):
            tokens = self.windows[lo : lo + self.batch_size]
            out = acts(state, tokens)
            for x in out.values():
                x.copy_to_host_async()
            if pending is not None:
                yield self._chunk(*pending, positions)
            pending = (out, tokens)
        if pending is not None:
            yield self._chunk(*pending, positions)

    def _chunk(self, out: dict, tokens: np.ndarray, positions: np.ndarray) -> Chunk:
        rows = {s: np.asarray(x).reshape(-1, x.shape[-1]) for s, x in out.items()}
        ids = tokens[:, self.keep].reshape(-1)
        return Chunk(rows, ids, np.tile(positions, len(tokens)))

    def files(self) -> dict[str, str]:
        return {"vocab.json": json.dumps(self.tokenizer.token_strings())}  # token strings for sae-inspect


def open_hf(cfg: HFRowsConfig, chunk_rows: int, seed: int, corpus: CorpusConfig | None = None) -> HFRows:
    try:
        return HFRows(cfg, chunk_rows, seed, corpus)
    except ModelError as err:
        raise DataError(f"source.path={cfg.path!r}: {err}") from None


def eval_windows(provenance: dict, model, tokenizer: Tokenizer, n_sequences: int) -> np.ndarray:
    """Up to n_sequences held-out sequences [n, n_ctx], packed as the store's were, from the corpus's
    validation documents."""
    fields = {f.name for f in dataclasses.fields(CorpusConfig)}
    corpus = find_corpus(CorpusConfig(**{k: v for k, v in provenance["dataset"].items() if k in fields}))
    t = provenance["template"]
    n_ctx = int(provenance["context_length"])
    body = n_ctx - len(t["prefix"]) - len(t["suffix"])
    available = len(np.concatenate(tokenizer.encode_batch(corpus.texts("val")) or [np.zeros(0, np.int32)]))
    n = min(n_sequences, available // body)
    if n == 0:
        raise CorpusError(f"the corpus '{corpus.root}' has no held-out text for one sequence of {n_ctx} tokens")
    return sequences(corpus, "val", tokenizer, t["prefix"], t["suffix"], n_ctx, n, provenance.get("seed", 0))


def store_loss_recovered(store, reconstruct, n_sequences: int = 256, batch_size: int = 32) -> dict:
    """The SAE `reconstruct` spliced into the store's model at its site, on held-out text: loss recovered
    (ce_loss_score, kl_div, …) for a causal LM, embedding_cosine for an encoder."""
    from sae.data.store import Store

    provenance = Store(store).provenance
    model, tokenizer = load(provenance["model"], provenance.get("config", {}).get("dtype", "float32"))
    windows = eval_windows(provenance, model, tokenizer, n_sequences)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    score = loss_recovered if model.config.causal else embedding_cosine
    return score(model, provenance["hook_name"], reconstruct, batches, _spliced(provenance, windows.shape[1]))


def store_replacement(
    store, pairs: list[tuple[str, str]], predict, n_sequences: int = 256, batch_size: int = 32
) -> dict:
    """The store's model with the output site of each (input, output) pair replaced by predict(j, inputs), on
    held-out text (`replacement_loss`): ce_loss_score, kl_div, top1_agreement, …"""
    from sae.data.store import Store

    provenance = Store(store).provenance
    model, tokenizer = load(provenance["model"], provenance.get("config", {}).get("dtype", "float32"))
    windows = eval_windows(provenance, model, tokenizer, n_sequences)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    return replacement_loss(model, pairs, predict, batches, _spliced(provenance, windows.shape[1]))


def _spliced(provenance: dict, n_ctx: int) -> np.ndarray:
    """[n_ctx] bool: the positions the store holds (without a template's BOS / suffix unless it kept them)."""
    t = provenance["template"]
    spliced = np.zeros(n_ctx, bool)
    spliced[len(t["prefix"]) : n_ctx - len(t["suffix"])] = True
    if t["kept"]:
        spliced[:] = True
    return spliced


ROW_SOURCES.register(
    "hf",
    RowSourceEntry(
        HFRowsConfig, open_hf, loss_recovered=store_loss_recovered, replacement=store_replacement, corpus=True
    ),
)
