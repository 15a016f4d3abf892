"""The activations a run is inspected on, rebuilt from the data config saved with its SAE.

Which rows: an activation store (`data=cached`) or a `.npy` (`data=arrays`) is read whole, in order
(or its first `rows`), not only its held-out tail. Inspection describes what features respond to rather
than how well the SAE generalises, and rare features need many rows: at the default held-out size
(65,536 rows) a feature of density 1e-5 fires about once, while a 1M-row store shows it ten times.
Row indices then are store rows, so token context can be read back. Generated data (synthetic, toy)
has no store: `rows` rows (262,144 by default) are drawn from a stream seeded apart from training.

A per-layer transcoder is inspected on its input store (data.path; its target store is not read). A
cross-layer transcoder's rows are its layers' input stores in a multi-site cache (`open_layer_rows`): row r
of each, side by side, x [n, L, d_in].
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from sae.data import BATCH_SOURCES, open_batch_source
from sae.data.arrays import ArraysConfig, open_activations, prefetch
from sae.data.cached import CachedConfig, check_same_rows, check_widths
from sae.data.loader import JoinedStore
from sae.data.store import Store
from sae.errors import ConfigError, DataError

GENERATED_ROWS = 262_144
_SEED_OFFSET = 1_000_003  # generated rows use stream seed + this, never the training stream


@dataclass
class Rows:
    """Rows to inspect. batches(batch_size) yields (first row index, x [≤ batch_size, d_in]) in order (a CLT's
    x [≤ batch_size, L, d_in]).

    takes[ℓ](rows) -> layer ℓ's x [len(rows), d_in] for sorted row indices (one layer but for a CLT's rows);
    tokens -> (token ids, positions) [n_rows] int32 when the rows carry token ids (stores cached from a model),
    else None.
    """

    n_rows: int
    d_in: int
    batches: Callable[[int], Iterator[tuple[int, np.ndarray]]]
    description: str
    takes: list[Callable[[np.ndarray], np.ndarray]] | None = None
    tokens: tuple[np.ndarray, np.ndarray] | None = None
    ground_truth: np.ndarray | None = None
    store_path: Path | None = None


def data_config(saved: dict, overrides: dict):
    """The run's data config (a dict from cfg.json) with `data.*` overrides, as its typed dataclass."""
    merged = {**saved, **overrides}
    name = merged.get("name")
    if name not in BATCH_SOURCES:
        raise ConfigError(f"data.name={name!r} is not one of {list(BATCH_SOURCES)}")
    schema = BATCH_SOURCES[name].schema
    fields = {f.name for f in dataclasses.fields(schema)}
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"data.{key} is not a field of data={name} (fields: {', '.join(sorted(fields))})")
    return schema(**{k: v for k, v in merged.items() if k in fields})


def _sliced(read: Callable[[int, int], np.ndarray], n_rows: int) -> Callable[[int], Iterator]:
    def batches(batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        return prefetch((s, read(s, min(s + batch_size, n_rows))) for s in range(0, n_rows, batch_size))

    return batches


def open_rows(data, rows: int | None, seed: int, batch_size: int) -> Rows:
    """The rows of a data config (see the module docstring). Raises DataError for unreadable data."""
    if isinstance(data, CachedConfig):
        store = Store(data.path)
        n = store.n_rows if rows is None else min(rows, store.n_rows)
        truth = store.provenance.get("ground_truth")
        tokens = store.read_tokens(0, n) if store.with_tokens else None
        return Rows(
            n,
            store.d_in,
            _sliced(store.read_rows, n),
            f"store '{store.path}' ({n} of {store.n_rows} rows)",
            takes=[store.take],
            tokens=tokens,
            store_path=store.path,
            ground_truth=np.load(store.path / truth) if truth else None,
        )
    if isinstance(data, ArraysConfig):
        array = open_activations(data.path)
        n = array.shape[0] if rows is None else min(rows, array.shape[0])
        return Rows(
            n,
            array.shape[1],
            _sliced(lambda a, b: np.asarray(array[a:b]), n),
            f"'{data.path}' ({n} of {array.shape[0]} rows)",
            takes=[lambda r: np.asarray(array[r])],
        )
    # any other source generates its rows: a stream apart from training's
    source = open_batch_source(data, batch_size, seed)
    n = GENERATED_ROWS if rows is None else rows

    def generated(size: int) -> Iterator[tuple[int, jax.Array]]:
        stream = source.train_batches(size, -(-n // size), seed + _SEED_OFFSET)
        for i, x in enumerate(stream):
            yield i * size, x[: n - i * size]

    truth = None if source.ground_truth is None else np.asarray(source.ground_truth)
    return Rows(n, source.d_in, generated, f"{n} generated {data.name} rows", ground_truth=truth)


def open_layer_rows(data, sites: list[str], rows: int | None) -> Rows:
    """A cross-layer transcoder's rows: the stores data.path/<site> of its layers' inputs, checked to hold the
    same rows, side by side (x [n, L, d_in]); token ids and positions from the first. DataError naming a
    missing store or the stores that differ; ConfigError for data that is not a multi-site cache."""
    if not isinstance(data, CachedConfig):
        raise ConfigError(
            f"data.name={data.name!r}: a cross-layer transcoder is inspected on its multi-site cache "
            "(data=cached data.path=CACHE_DIR)"
        )
    root = Path(data.path)
    for site in sites:
        if not (root / site).is_dir():
            raise DataError(f"data.path='{root}': '{root / site}' (the store of input site {site}) is missing")
    named = [(f"'{root / site}'", Store(root / site)) for site in sites]
    check_widths(named, "input")
    check_same_rows(named)
    joined = JoinedStore([store for _, store in named])
    first = joined.stores[0]
    n = first.n_rows if rows is None else min(rows, first.n_rows)
    shaped = lambda x: x.reshape(len(x), len(sites), first.d_in)  # noqa: E731
    return Rows(
        n,
        first.d_in,
        _sliced(lambda a, b: shaped(joined.read_rows(a, b)), n),
        f"{len(sites)} stores '{root / sites[0]}' … '{root / sites[-1]}' ({n} of {first.n_rows} rows)",
        takes=[store.take for store in joined.stores],
        tokens=first.read_tokens(0, n) if first.with_tokens else None,
        store_path=first.path,
    )


def load_vocab(path: str | Path | None, store_path: Path | None) -> list[str] | None:
    """Token strings by id from a .json list / {id: string} or a .txt (one per line); None when absent.

    With no path, `STORE/vocab.json` is used if the store has one.
    """
    if path is None:
        if store_path is None or not (store_path / "vocab.json").is_file():
            return None
        path = store_path / "vocab.json"
    path = Path(path)
    if not path.is_file():
        raise DataError(f"vocab='{path}': no such file (expected a .json list or {{id: token}}, or a .txt)")
    try:
        if path.suffix == ".txt":
            return path.read_text(encoding="utf-8").split("\n")
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"vocab='{path}': unreadable ({err})") from err
    if isinstance(vocab, dict):
        try:
            items = {int(k): str(v) for k, v in vocab.items()}
        except ValueError as err:
            raise DataError(f"vocab='{path}': keys must be token ids ({err})") from err
        out = [f"#{i}" for i in range(max(items, default=-1) + 1)]
        for i, token in items.items():
            out[i] = token
        return out
    if not isinstance(vocab, list):
        raise DataError(f"vocab='{path}': expected a list of strings or a {{id: token}} object")
    return [str(t) for t in vocab]
