"""`sae-train data=cached`: training from an activation store reaches the same recovery bar as training
on the generator directly, and evaluates on the store's held-out tail."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from sae.data import DataError, open_batch_source
from sae.data.cached import CachedConfig
from sae.data.store import StoreWriter
from sae.data.synthetic import SyntheticBatches
from sae.export import load_sae
from sae.training import train


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    """450k float16 rows of the test-sized synthetic data in shards of 32768, with the ground truth."""
    cfg = small_config("topk")
    source = SyntheticBatches(cfg.data, 0, 0)
    path = tmp_path_factory.mktemp("store") / "s"
    path.mkdir()
    np.save(path / "ground_truth.npy", np.asarray(source.ground_truth))
    with StoreWriter(path, cfg.data.d_in, "float16", 32768, provenance={"ground_truth": "ground_truth.npy"}) as w:
        for i in range(55):
            w.append(np.asarray(source.sample(8192, seed=i)))
    return path


def test_trains_from_a_store_and_recovers_the_features(synthetic_store, tmp_path):
    cfg = small_config("topk", total_tokens=400_000, k=3)
    cfg.data = CachedConfig(path=str(synthetic_store), mixing_rows=131072, eval_tokens=8192)
    metrics = train(cfg, tmp_path / "run")
    assert metrics["mmcs"] >= 0.9, metrics
    store = open_batch_source(cfg.data, 1024, 0).store
    held_out = np.asarray(store.read_rows(store.n_rows - 8192, store.n_rows), np.float32)
    x_hat = np.asarray(load_sae(tmp_path / "run" / "sae")(jnp.asarray(held_out)))
    fvu = np.sum((held_out - x_hat) ** 2) / np.sum((held_out - held_out.mean(0)) ** 2)
    assert fvu == pytest.approx(metrics["fvu"], rel=1e-3)


def test_a_missing_store_is_named(tmp_path):
    with pytest.raises(DataError, match="not an activation store"):
        open_batch_source(CachedConfig(path=str(tmp_path)), 1024, 0)
