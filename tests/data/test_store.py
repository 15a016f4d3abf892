"""The activation store and its loader: round trips, shuffling, resume, multi-process parts, integrity."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest
from conftest import ROOT

from sae.data.loader import StoreLoader
from sae.data.store import MANIFEST, PROGRESS, Store, StoreError, StoreWriter, checksum

D_IN = 8


def tagged_rows(start: int, stop: int) -> np.ndarray:
    """Row r holds r in column 0 (exact in float32) and a deterministic function of r after."""
    index = np.arange(start, stop, dtype=np.float64)[:, None]
    rows = (3 * np.sin(0.37 * index + np.arange(D_IN))).astype(np.float32)
    rows[:, 0] = index[:, 0]
    return rows


def write_store(path, n_rows, shard_rows, dtype="float32", chunk=37, **kwargs):
    with StoreWriter(path, D_IN, dtype, shard_rows, provenance={"source": "test"}, **kwargs) as writer:
        for start in range(0, n_rows, chunk):
            writer.append(tagged_rows(start, min(n_rows, start + chunk)))
    return Store(path)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_bit_identical(tmp_path, dtype):
    store = write_store(tmp_path / "s", 1000, 300, dtype)
    expected = tagged_rows(0, 1000).astype(
        {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    )
    assert store.n_rows == 1000 and [s.rows for s in store.shards] == [300, 300, 300, 100]
    got = store.read_rows(0, 1000)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))
    np.testing.assert_array_equal(
        np.concatenate([store.read_shard(i) for i in range(4)]).view(np.uint8), expected.view(np.uint8)
    )
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["dtype"] == dtype and manifest["d_in"] == D_IN and manifest["provenance"] == {"source": "test"}
    assert not (tmp_path / "s" / PROGRESS).exists()


def test_token_ids_round_trip(tmp_path):
    with StoreWriter(tmp_path / "s", D_IN, "float32", 64, with_tokens=True) as writer:
        for seq in range(10):
            writer.append(
                tagged_rows(seq * 16, seq * 16 + 16), tokens=np.arange(16) + 100 * seq, positions=np.arange(16)
            )
    tokens, positions = Store(tmp_path / "s").read_tokens(60, 70)
    np.testing.assert_array_equal(tokens, [312, 313, 314, 315, 400, 401, 402, 403, 404, 405])
    np.testing.assert_array_equal(positions, [12, 13, 14, 15, 0, 1, 2, 3, 4, 5])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """2000 tagged rows in 10 shards of 200."""
    return write_store(tmp_path_factory.mktemp("store") / "s", 2000, 200)


def served(loader, n_batches):
    batches = [b for _, b in zip(range(n_batches), loader)]
    loader.close()
    return np.concatenate(batches)[:, 0].astype(int)


def test_every_row_once_per_epoch_and_batches_mix_shards(store):
    rows = served(StoreLoader(store, 100, seed=1, mixing_rows=1000), 40)  # two epochs
    for epoch in (rows[:2000], rows[2000:]):
        np.testing.assert_array_equal(np.sort(epoch), np.arange(2000))
    assert not np.array_equal(rows[:2000], rows[2000:])  # epochs are reshuffled
    shards_per_batch = [len(np.unique(batch // 200)) for batch in rows.reshape(-1, 100)]
    assert min(shards_per_batch) >= 4  # a window of 5 shards: each batch draws from most of them


def test_loader_is_deterministic_and_resumes_at_a_batch(store):
    whole = served(StoreLoader(store, 64, seed=3, mixing_rows=600), 50)
    np.testing.assert_array_equal(whole, served(StoreLoader(store, 64, seed=3, mixing_rows=600), 50))
    resumed = served(StoreLoader(store, 64, seed=3, mixing_rows=600, start_batch=37), 13)
    np.testing.assert_array_equal(resumed, whole[37 * 64 :])  # crosses the epoch boundary at row 2000
    assert not np.array_equal(whole, served(StoreLoader(store, 64, seed=4, mixing_rows=600), 50))


def test_next_window_is_read_while_the_current_is_served(store):
    """After the first batch of window 0 (1000 rows) is handed out, window 1 is read without waiting for
    window 0 to be consumed; the stream is the same as without the read-ahead (the test above)."""
    requested = []

    class Recording(StoreLoader):
        def _load_window(self, epoch, w):
            requested.append((epoch, w))
            return super()._load_window(epoch, w)

    loader = Recording(store, 100, seed=1, mixing_rows=1000)
    first = next(iter(loader))
    for _ in range(500):  # the read-ahead thread starts at once; allow it time on a loaded machine
        if (0, 1) in requested:
            break
        time.sleep(0.01)
    served_rows = loader._rows_served
    loader.close()
    assert requested[:2] == [(0, 0), (0, 1)] and served_rows == 100
    np.testing.assert_array_equal(first[:, 0].astype(int), served(StoreLoader(store, 100, seed=1, mixing_rows=1000), 1))


def test_two_processes_serve_every_row_once(store):
    parts = [
        served(StoreLoader(store, 50, seed=0, mixing_rows=400, process_index=p, process_count=2), 20) for p in (0, 1)
    ]
    assert len(np.intersect1d(parts[0], parts[1])) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(2000))


def test_row_range_restricts_the_stream(store):
    rows = served(StoreLoader(store, 50, seed=0, rows=(150, 1450)), 26)
    np.testing.assert_array_equal(np.sort(rows), np.arange(150, 1450))


CORRUPTIONS = {
    "missing": (lambda d: os.remove(d / "shard_00002.npy"), "shard_00002.npy' is missing"),
    "truncated": (lambda d: _truncate(d / "shard_00001.npy"), "shard_00001.npy' is truncated"),
    "flipped_byte": (lambda d: _flip(d / "shard_00003.npy"), "shard_00003.npy' does not match its checksum"),
    "wrong_d_in": (lambda d: _edit_manifest(d, d_in=9), "has shape (200, 8); the manifest says (200, 9)"),
    "wrong_dtype": (lambda d: _edit_manifest(d, dtype="float16"), "holds float32; the manifest says float16"),
    "no_manifest": (lambda d: os.remove(d / MANIFEST), "not an activation store: no manifest.json"),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(d, **fields):
    manifest = json.loads((d / MANIFEST).read_text())
    manifest.update(fields)
    (d / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_is_named(tmp_path, name):
    write_store(tmp_path / "s", 1000, 200)
    corrupt, message = CORRUPTIONS[name]
    corrupt(tmp_path / "s")
    with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loader = StoreLoader(Store(tmp_path / "s"), 100, mixing_rows=10_000)
        served(loader, 10)


def test_nan_rows_are_refused_when_caching(tmp_path):
    writer = StoreWriter(tmp_path / "s", D_IN, "float16", 100)
    writer.append(tagged_rows(0, 250))
    bad = tagged_rows(250, 300)
    bad[7, 3] = np.nan
    with pytest.raises(StoreError, match="row 257 is NaN or Inf"):
        writer.append(bad)
    with pytest.raises(StoreError, match="row 0 is NaN or Inf .or overflows float16"):
        StoreWriter(tmp_path / "t", D_IN, "float16", 100).append(np.full((2, D_IN), 1e6, np.float32))
    assert not (tmp_path / "s" / MANIFEST).exists()  # no manifest points at incomplete data


def test_a_complete_store_is_never_overwritten(store):
    with pytest.raises(StoreError, match="already holds a complete store"):
        StoreWriter(store.path, D_IN, "float32", 200)


SLOW_WRITER = """
import os, sys, time
sys.path[:0] = sys.argv[2].split(os.pathsep)
from test_store import StoreWriter, tagged_rows
with StoreWriter(sys.argv[1], 8, "float16", 100, provenance={"source": "test"}) as writer:
    for start in range(writer.rows_written, 1000, 30):
        writer.append(tagged_rows(start, min(1000, start + 30)))
        time.sleep(0.02)
"""


def test_killed_cache_run_resumes_to_the_same_store(tmp_path):
    tests_dir = os.pathsep.join([os.path.join(ROOT, "tests", "data"), os.path.join(ROOT, "tests")])
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path / "s"), tests_dir], cwd=ROOT)
    deadline = time.time() + 120
    while len(list((tmp_path / "s").glob("shard_*.npy"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "s" / MANIFEST).exists()
    with pytest.raises(StoreError, match="interrupted cache run"):
        Store(tmp_path / "s")
    with pytest.raises(StoreError, match="other settings"):
        StoreWriter(tmp_path / "s", 8, "float32", 100, provenance={"source": "test"})
    subprocess.run([sys.executable, "-c", SLOW_WRITER, str(tmp_path / "s"), tests_dir], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-c", SLOW_WRITER, str(tmp_path / "u"), tests_dir], cwd=ROOT, check=True)
    resumed, uninterrupted = Store(tmp_path / "s"), Store(tmp_path / "u")
    assert resumed.shards == uninterrupted.shards  # same files, rows and checksums
    np.testing.assert_array_equal(resumed.read_rows(0, 1000), uninterrupted.read_rows(0, 1000))


def test_nan_rows_are_found_when_loading_with_check_finite(tmp_path):
    """A store whose shard holds a NaN (written by another tool, checksum consistent) fails on loading."""
    store = write_store(tmp_path / "s", 600, 200)
    shard = tmp_path / "s" / "shard_00001.npy"
    rows = np.load(shard)
    rows[42, 5] = np.nan
    np.save(shard, rows)
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    manifest["shards"][1]["checksum"] = checksum(shard)
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    served(StoreLoader(Store(tmp_path / "s"), 100, mixing_rows=10_000), 6)  # unchecked: loads
    with pytest.raises(StoreError, match="shard_00001.npy' row 42 contains NaN or Inf"):
        served(StoreLoader(Store(tmp_path / "s"), 100, mixing_rows=10_000, check_finite=True), 6)
    with pytest.raises(StoreError, match="row 42 contains NaN"):
        Store(tmp_path / "s").verify()
    with pytest.raises(StoreError, match="does not match its checksum"):
        store.verify()  # opened before the edit: the old checksum
