"""Directions from contrast against NumPy references computed from each example's own (unpadded) forward;
pca_diff's sign and axis; save / load; monitoring projections; bad inputs."""

import numpy as np
import pytest
from hf_oracle import tiny_gpt2

from sae.errors import DataError
from sae.models import load
from sae.steer.directions import Direction, Example, contrast, pca_diff, pooled_activations, projection

SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(tiny_gpt2(tmp_path_factory.mktemp("m")))[0]


def examples(seed: int, n: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(0, 320, int(rng.integers(4, 12))), int(rng.integers(1, 3))) for _ in range(n)]


def reference(model, site, items, pooling) -> np.ndarray:
    """Each example alone through the model, pooled in NumPy."""
    rows = []
    for e in items:
        acts = np.asarray(model(e.tokens[None], capture=[site])[1][site][0], np.float64)
        r = e.response_start
        rows.append(
            {"response_mean": acts[r:], "last": acts[-1:], "prompt_mean": acts[:r], "mean": acts}[pooling].mean(0)
        )
    return np.stack(rows)


@pytest.mark.parametrize("pooling", ["response_mean", "last", "prompt_mean", "mean"])
def test_pooled_activations_equal_each_example_alone(model, pooling):
    items = examples(0, 5)
    got = pooled_activations(model, SITES, items, pooling, batch_size=2)
    for site in SITES:
        np.testing.assert_allclose(got[site], reference(model, site, items, pooling), atol=1e-5)


def test_mean_difference_and_pca_diff(model, tmp_path):
    pos, neg = examples(1, 6), examples(2, 6)
    d = contrast(model, SITES, pos, neg, "response_mean", source={"positive": "A.txt"})
    for i, site in enumerate(SITES):
        want = reference(model, site, pos, "response_mean").mean(0) - reference(model, site, neg, "response_mean").mean(
            0
        )
        np.testing.assert_allclose(d.vectors[i], want, atol=1e-5)
    p = contrast(model, SITES, pos, neg, "last", method="pca_diff")
    diff = reference(model, SITES[0], pos, "last") - reference(model, SITES[0], neg, "last")
    _, _, vt = np.linalg.svd(diff - diff.mean(0))
    assert abs(abs(p.vectors[0] @ vt[0]) - 1) < 1e-4 and (diff @ p.vectors[0]).mean() >= 0
    again = Direction.load(d.save(tmp_path / "dir"))
    np.testing.assert_array_equal(again.vectors, d.vectors.astype(np.float32))
    assert again.sites == SITES and again.pooling == "response_mean" and again.source == {"positive": "A.txt"}
    acts = np.random.default_rng(3).normal(size=(7, 32))
    v = d.vector(SITES[0])
    np.testing.assert_allclose(projection(acts, v), acts @ v / np.linalg.norm(v), rtol=1e-5)


def test_bad_contrasts_name_the_problem(model, tmp_path):
    with pytest.raises(DataError, match="at least one example"):
        pooled_activations(model, SITES, [], "mean")
    with pytest.raises(DataError, match="pooling='max' is not one of"):
        pooled_activations(model, SITES, examples(0, 1), "max")
    with pytest.raises(DataError, match="response_start=0 leaves nothing to pool"):
        pooled_activations(model, SITES, [Example(np.arange(4), 0)], "prompt_mean")
    with pytest.raises(DataError, match="3 positive and 2 negative"):
        pca_diff(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(DataError, match="has no direction.safetensors"):
        Direction.load(tmp_path)
