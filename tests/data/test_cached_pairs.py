"""`data=cached` pairs for transcoders: `data.target=STORE` gives (x, y) of the same rows, `data.layers` gives
(x [B, L, d_in], y [B, L, d_out]) from a multi-site cache, and stores that do not hold the same rows are refused
on opening with one line naming what differs."""

import numpy as np
import pytest

from sae.data import open_batch_source
from sae.data.cached import CachedConfig, StoreBatches
from sae.data.loader import JoinedStore, StoreLoader
from sae.data.store import Store, StoreError, StoreWriter
from sae.errors import ConfigError

N, D_IN, D_OUT, SHARD = 1000, 6, 4, 100
IN_SITE, OUT_SITE = "ln2.hook_normalized", "hook_mlp_out"


def inputs(n: int = N, layer: int = 0) -> np.ndarray:
    """Row r holds r in column 0 (exact in float32), the layer in column 1, and a function of r after."""
    index = np.arange(n, dtype=np.float64)[:, None]
    rows = (3 * np.sin(0.37 * index + np.arange(D_IN))).astype(np.float32)
    rows[:, 0], rows[:, 1] = index[:, 0], layer
    return rows


def targets_of(x: np.ndarray) -> np.ndarray:
    """y = 2·x[:, :D_OUT] + (row index): the relation every pair must satisfy (float32, exact to recompute)."""
    x = np.asarray(x, np.float32)
    return 2 * x[..., :D_OUT] + x[..., :1]


def tokens(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    return 1000 + np.arange(n), np.arange(n) % 50


def write(path, rows, shard_rows=SHARD, dtype="float32", hook_name=None, toks=None, chunk=64):
    provenance = {"source": "test", **({"hook_name": hook_name, "model": "m"} if hook_name else {})}
    with StoreWriter(path, rows.shape[1], dtype, shard_rows, provenance=provenance, with_tokens=toks is not None) as w:
        for start in range(0, len(rows), chunk):
            part = slice(start, start + chunk)
            if toks is None:
                w.append(rows[part])
            else:
                w.append(rows[part], tokens=toks[0][part], positions=toks[1][part])
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(x store, y store): N rows in shards of SHARD, with token ids, at blocks.0's input and output sites."""
    root = tmp_path_factory.mktemp("pair")
    x = inputs()
    x_path = write(root / f"blocks.0.{IN_SITE}", x, hook_name=f"blocks.0.{IN_SITE}", toks=tokens())
    y_path = write(root / f"blocks.0.{OUT_SITE}", targets_of(x), hook_name=f"blocks.0.{OUT_SITE}", toks=tokens())
    return str(x_path), str(y_path)


@pytest.fixture(scope="module")
def multi_site(tmp_path_factory):
    """A multi-site cache of layers 0..2 (and a stray layer 4 past the gap at 3)."""
    root = tmp_path_factory.mktemp("multi")
    for layer in (0, 1, 2, 4):
        x = inputs(layer=layer)
        write(root / f"blocks.{layer}.{IN_SITE}", x, hook_name=f"blocks.{layer}.{IN_SITE}", toks=tokens())
        write(root / f"blocks.{layer}.{OUT_SITE}", targets_of(x), hook_name=f"blocks.{layer}.{OUT_SITE}", toks=tokens())
    return str(root)


def config(path, **kwargs) -> CachedConfig:
    return CachedConfig(path=str(path), mixing_rows=300, eval_tokens=100, **kwargs)


def stream(source, batch_size, n_batches, seed=0, start_batch=0):
    return [
        tuple(np.asarray(a) for a in b) if isinstance(b, tuple) else np.asarray(b)
        for b in source.train_batches(batch_size, n_batches, seed, start_batch)
    ]


def assert_pairs(x, y):
    assert x.shape[:-1] == y.shape[:-1] and x.shape[-1] == D_IN and y.shape[-1] == D_OUT
    np.testing.assert_array_equal(y, targets_of(x))


def test_target_gives_pairs_of_the_same_rows(pair):
    x_path, y_path = pair
    source = open_batch_source(config(x_path, target=y_path), 60, 0)
    assert isinstance(source, StoreBatches)
    assert (source.d_in, source.d_out, source.n_layers) == (D_IN, D_OUT, None)
    assert source.hook_names == [f"blocks.0.{IN_SITE}"] and source.hook_names_out == [f"blocks.0.{OUT_SITE}"]
    assert [s.path for s in source.input_stores] == [source.store.path] and len(source.target_stores) == 1
    assert source.ground_truth is None and source.ground_truth_in is None
    epoch = stream(source, 60, 15)  # the 900 training rows, once each
    for x, y in epoch:
        assert x.shape == (60, D_IN) and y.shape == (60, D_OUT)
        assert_pairs(x, y)
    np.testing.assert_array_equal(np.sort(np.concatenate([x for x, _ in epoch])[:, 0]), np.arange(900))
    held_out = list(source.eval_batches(64))
    x_eval = np.concatenate([np.asarray(x) for x, _ in held_out])
    np.testing.assert_array_equal(x_eval, inputs()[900:])
    for x, y in held_out:
        assert_pairs(np.asarray(x), np.asarray(y))
    x, y = source.sample(200, seed=5)
    assert x.dtype == y.dtype == np.float32
    assert_pairs(np.asarray(x), np.asarray(y))
    assert len(np.unique(np.asarray(x)[:, 0])) == 200 and np.asarray(x)[:, 0].max() < 900


def test_x_stream_is_the_plain_sources_and_resumes(pair):
    x_path, y_path = pair
    plain = open_batch_source(config(x_path), 64, 0)
    assert (plain.d_out, plain.n_layers, plain.target_stores, plain.hook_names_out) == (None, None, [], [])
    assert plain.input_stores == [plain.store] and plain.hook_names == [f"blocks.0.{IN_SITE}"]
    sae_stream = stream(plain, 64, 20, seed=3)  # crosses into the second epoch
    assert all(isinstance(b, np.ndarray) for b in sae_stream)
    pairs = open_batch_source(config(x_path, target=y_path), 64, 0)
    pair_stream = stream(pairs, 64, 20, seed=3)
    for batch, (x, y) in zip(sae_stream, pair_stream, strict=True):
        np.testing.assert_array_equal(batch, x)
        assert_pairs(x, y)
    resumed = stream(pairs, 64, 20, seed=3, start_batch=13)
    assert len(resumed) == 7
    for (x, y), (x0, y0) in zip(resumed, pair_stream[13:], strict=True):
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(np.asarray(plain.sample(50, 1)), np.asarray(pairs.sample(50, 1)[0]))


def test_joined_store_serves_two_processes_disjoint_pairs(pair):
    joined = JoinedStore([Store(p) for p in pair])
    assert joined.d_in == D_IN + D_OUT and joined.n_rows == N
    parts = []
    for p in (0, 1):
        with StoreLoader(joined, 50, seed=0, mixing_rows=300, process_index=p, process_count=2) as loader:
            rows = np.concatenate([b for _, b in zip(range(10), loader)])
        assert_pairs(rows[:, :D_IN], rows[:, D_IN:])
        parts.append(rows[:, 0].astype(int))
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(N))


def test_layers_read_each_layers_stores(multi_site):
    source = open_batch_source(config(multi_site, layers="all"), 50, 0)
    assert (source.d_in, source.d_out, source.n_layers, source.layers) == (D_IN, D_OUT, 3, [0, 1, 2])
    assert source.hook_names == [f"blocks.{layer}.{IN_SITE}" for layer in range(3)]
    assert source.hook_names_out == [f"blocks.{layer}.{OUT_SITE}" for layer in range(3)]
    batches = stream(source, 50, 18)  # one epoch
    for x, y in batches:
        assert x.shape == (50, 3, D_IN) and y.shape == (50, 3, D_OUT)
        assert_pairs(x, y)
        np.testing.assert_array_equal(x[:, :, 1], np.broadcast_to([0, 1, 2], (50, 3)))  # x[:, l] is layer l's
        np.testing.assert_array_equal(x[:, :, 0], np.repeat(x[:, :1, 0], 3, axis=1))  # the same row in each
    np.testing.assert_array_equal(np.sort(np.concatenate([x[:, 0, 0] for x, _ in batches])), np.arange(900))
    x, y = source.sample(30, 0)
    assert x.shape == (30, 3, D_IN) and y.shape == (30, 3, D_OUT)
    x_eval, y_eval = next(source.eval_batches(100))
    np.testing.assert_array_equal(np.asarray(x_eval)[:, 2], inputs(layer=2)[900:])
    assert_pairs(np.asarray(x_eval), np.asarray(y_eval))

    listed = open_batch_source(config(multi_site, layers=[2, 0]), 50, 0)
    assert listed.layers == [0, 2] and listed.n_layers == 2
    x, _ = stream(listed, 50, 1)[0]
    np.testing.assert_array_equal(x[:, :, 1], np.broadcast_to([0, 2], (50, 2)))


def one_line(err) -> str:
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    return str(err.value)


def test_a_missing_layer_is_named(multi_site):
    with pytest.raises(StoreError, match=rf"layer 3's store '.*blocks\.3\.{IN_SITE}' is missing") as err:
        open_batch_source(config(multi_site, layers=[1, 3]), 50, 0)
    one_line(err)
    with pytest.raises(StoreError, match=rf"blocks\.0\.{IN_SITE}' is missing"):
        open_batch_source(config(multi_site + "/nowhere", layers="all"), 50, 0)


def test_layer_inputs_of_other_widths_are_named(tmp_path):
    for layer, width in ((0, D_IN), (1, D_IN + 2)):
        write(tmp_path / f"blocks.{layer}.{IN_SITE}", np.ones((300, width), np.float32))
        write(tmp_path / f"blocks.{layer}.{OUT_SITE}", np.ones((300, D_OUT), np.float32))
    with pytest.raises(StoreError, match=rf"'.*blocks\.1\.{IN_SITE}' is 8 wide but '.*blocks\.0\.{IN_SITE}' is 6"):
        open_batch_source(config(tmp_path, layers="all"), 50, 0)


def bad_target(tmp_path, **kwargs):
    x = inputs()
    rows = kwargs.pop("rows", targets_of(x))
    return str(write(tmp_path / "y", rows, toks=kwargs.pop("toks", tokens(len(rows))), **kwargs))


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda t: bad_target(t, rows=targets_of(inputs(900))),
            r"data\.target='.*y' has 900 rows but data\.path=.* 1000",
        ),
        (
            lambda t: bad_target(t, shard_rows=150),
            r"data\.target='.*y': shard 0 '.*y/shard_00000\.npy' holds rows \[0, 150\), but shard 0 of data\.path",
        ),
        (lambda t: bad_target(t, dtype="float16"), r"data\.target='.*y' holds float16 but data\.path=.* float32"),
        (
            lambda t: bad_target(t, toks=(tokens()[0] + (np.arange(N) == 537), tokens()[1])),
            r"'.*y/shard_00005\.npy' row 37 \(row 537 of data\.target=.*\) has token id 1538 but .* has 1537",
        ),
        (
            lambda t: bad_target(t, rows=targets_of(inputs())[::-1], toks=tuple(a[::-1] for a in tokens())),
            r"'.*y/shard_00000\.npy' row 0 \(row 0 of .*\) has token id 1999 but .* has 1000: .* same order",
        ),
        (
            lambda t: bad_target(t, hook_name="blocks.0.hook_resid_pre"),
            r"data\.target='.*y' \(site blocks\.0\.hook_resid_pre\) comes before data\.path's site blocks\.0\.ln2",
        ),
    ],
    ids=["rows", "shards", "dtype", "tokens", "order", "earlier_site"],
)
def test_a_target_of_other_rows_is_refused_in_one_line(pair, tmp_path, make, message):
    target = make(tmp_path)
    with pytest.raises(StoreError, match=message) as err:
        open_batch_source(config(pair[0], target=target), 60, 0)
    one_line(err)


def test_an_earlier_layer_as_target_is_refused(pair, tmp_path):
    target = str(write(tmp_path / "y", np.ones((N, D_OUT), np.float32), hook_name=f"blocks.0.{OUT_SITE}"))
    x = str(write(tmp_path / "x", inputs(), hook_name=f"blocks.1.{IN_SITE}"))
    with pytest.raises(StoreError, match=r"comes before data\.path's site blocks\.1\."):
        open_batch_source(config(x, target=target), 60, 0)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"target": "y", "layers": "all"}, r"data\.target='y' and data\.layers='all': pick one"),
        ({"layers": "every"}, r"data\.layers='every' must be null, all, or a list"),
        ({"layers": [0, 0]}, r"data\.layers=\[0, 0\] must be"),
        ({"layers": 3}, r"data\.layers=3 must be"),
        ({"layers": "all", "input_site": "mlp_in"}, r"data\.input_site='mlp_in' is not a site"),
        ({"layers": "all", "output_site": "hook_resid_mid"}, r"data\.output_site='hook_resid_mid' does not come after"),
    ],
)
def test_bad_pair_settings_are_config_errors(fields, message, tmp_path):
    cfg = config(tmp_path, **fields)
    with pytest.raises(ConfigError, match=message):
        cfg.check()
    with pytest.raises(ConfigError, match=message):  # also when opened without the config check
        open_batch_source(cfg, 60, 0)
