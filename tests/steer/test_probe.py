"""The probe's operations on a tiny random Llama (a BOS model) with a TopK SAE, as an `sae-train` run would
leave it: activations equal the SAE on the activation store's rows for the same tokens, an edit changes
nothing before it, leave-one-out equals recomputation and gradient × input a finite difference, strength 0
steers nothing, the run finds its model through its store, and bad inputs name the problem."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_oracle import TEXT, save_checkpoint, tiny_llama

from sae.architectures import FAMILIES, make_sae
from sae.cache import cache
from sae.config import CacheConfig, CorpusConfig
from sae.data.hf import HFRowsConfig
from sae.data.store import Store
from sae.errors import DataError
from sae.export import export_sae
from sae.steer.interventions import Add, Feature
from sae.steer.probe import INPUT_SITE, open_probe

SITE = "blocks.1.hook_resid_mid"
N_CTX = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, store dir, model dir): a store of SITE and a TopK SAE exported with sae-train's metadata."""
    root = tmp_path_factory.mktemp("probe")
    model = save_checkpoint(tiny_llama(N_CTX), root / "model")
    (root / "text").mkdir()
    for i in range(12):
        (root / "text" / f"d{i}.txt").write_text("".join(TEXT[i % 4 :: 2]))
    source = HFRowsConfig(path=str(model), sites=[SITE], n_rows=92, n_ctx=N_CTX, batch_size=4)
    corpus = CorpusConfig(path=str(root / "text"), pattern="*.txt", val_fraction=0.0)
    cache(CacheConfig(source=source, out=str(root / "store"), corpus=corpus, dtype="float32", shard_rows=23))
    sae = make_sae(FAMILIES["topk"].config(d_sae=64, k=6), 32)
    params = sae.init_params(jax.random.PRNGKey(0), jnp.zeros(32))
    params = {k: v + 0.05 * jax.random.normal(jax.random.PRNGKey(1), v.shape) for k, v in params.items()}
    metadata = {"hook_name": SITE, "config": {"data": {"name": "cached", "path": str(root / "store")}}}
    export_sae(root / "run" / "sae", sae, params, sae.init_buffers(), 1.0, metadata)
    return root / "run", root / "store", model


@pytest.fixture(scope="module")
def probe(run):
    return open_probe(run[0])


def test_activations_equal_the_sae_on_the_stores_rows(probe, run):
    store = Store(run[1])
    ids, positions = store.read_tokens(0, N_CTX - 1)  # the first sequence: BOS (dropped) + 23 tokens
    assert positions.tolist() == list(range(1, N_CTX))
    got = probe.activations(ids)
    want = np.asarray(probe.sae.encode(jnp.asarray(store.read_rows(0, N_CTX - 1))))
    assert got.ids.tolist() == ids.tolist() and got.truncated == 0 and (want > 0).any()
    np.testing.assert_allclose(got.codes, want, atol=1e-5, rtol=0)
    text = probe.tokenizer.decode(ids)
    np.testing.assert_allclose(probe.activations(text).codes, got.codes, atol=1e-5)  # the same text as a string
    long = probe.activations(np.tile(ids, 2))
    assert long.truncated == len(ids) and len(long.ids) == N_CTX - 1  # cut to the context, and said so


def test_an_edit_changes_nothing_before_it(probe):
    before = np.array([5, 17, 42, 8, 99, 100, 7, 3])
    after = before.copy()
    after[4] = 200
    d = probe.diff(before, after)
    assert d.match.tolist() == [0, 1, 2, 3, -1, 5, 6, 7]
    np.testing.assert_array_equal(d.delta[:4], 0.0)
    assert np.abs(d.delta[4:]).max() > 0
    np.testing.assert_allclose(d.delta[5], d.after.codes[5] - d.before.codes[5], atol=0)
    inserted = probe.diff(before, np.insert(before, 3, 250))  # an insertion shifts the rest; they stay matched
    assert inserted.match.tolist() == [0, 1, 2, -1, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(inserted.delta[:3], 0.0)


def test_leave_one_out_is_recomputation_and_grad_x_input_a_finite_difference(probe):
    ids = np.array([5, 17, 42, 8, 99, 100, 7, 3, 250, 11])
    reading = probe.activations(ids)
    position = 8
    feature = int(np.argmax(reading.codes[position]))
    assert reading.codes[position, feature] > 0
    dr = probe.drivers(ids, feature, position)
    assert dr.value == pytest.approx(reading.codes[position, feature], abs=1e-5)
    for j in range(position):
        alone = probe.activations(np.delete(ids, j)).codes[position - 1, feature]
        assert dr.leave_one_out[j] == pytest.approx(dr.value - alone, abs=1e-5)
    assert np.isnan(dr.leave_one_out[position]) and len(dr.grad_x_input) == position + 1
    # Gradient × (h − h̄) against a central difference along h − h̄ at each position (the blocks' input).
    full = np.concatenate([[1], ids])
    base = np.asarray(probe.model(jnp.full((1, len(full)), probe.baseline), capture=[INPUT_SITE])[1][INPUT_SITE])
    h = np.asarray(probe.model(jnp.asarray(full[None]), capture=[INPUT_SITE])[1][INPUT_SITE])
    eps = 1e-3
    for j in (0, 3, position):
        step = np.zeros_like(h)
        step[0, 1 + j] = h[0, 1 + j] - base[0, 1 + j]
        values = []
        for sign in (1, -1):
            nudge = {INPUT_SITE: lambda x, s=sign, d=step: x + s * eps * d}
            _, got = probe.model(jnp.asarray(full[None]), [SITE], nudge)
            values.append(float(probe.sae.encode(got[SITE][0, 1 + position])[feature]))
        assert dr.grad_x_input[j] == pytest.approx((values[0] - values[1]) / (2 * eps), abs=2e-3)


def test_strength_zero_steers_nothing_and_a_clamp_moves_the_distribution(probe):
    text = [5, 17, 42, 8]
    unchanged = [Add(SITE, np.asarray(probe.sae.params["W_dec"][3])), Feature(SITE, probe.sae, 3, "scale")]
    same = probe.generate(text, unchanged, [0.0, 1.0], max_new_tokens=6)  # α = 0 and f_3 scaled by 1
    assert same.steered == same.default
    np.testing.assert_allclose(same.next_after[1], same.next_before[1], atol=1e-6)
    clamp = Feature(SITE, probe.sae, 3, "clamp")
    pushed = probe.generate(text, [clamp], [60.0], max_new_tokens=6, temperature=1.0, seed=1)
    moved = np.abs(pushed.next_after[1] - pushed.next_before[1]).max()
    assert moved > 1e-5 or pushed.next_after[0].tolist() != pushed.next_before[0].tolist()
    assert pushed.default == probe.generate(text, [], max_new_tokens=6, temperature=1.0, seed=1).default
    sampler = probe.sampler([clamp])[0]
    probe.generate(text, [clamp], [5.0], max_new_tokens=6)
    assert sampler.jitted._cache_size() == 1  # a new strength, the same compiled step


def test_bad_inputs_name_the_problem(probe, run, tmp_path):
    with pytest.raises(DataError, match="the text is empty"):
        probe.activations("  ")
    with pytest.raises(DataError, match="feature 64 is out of range: the SAE has features 0..63"):
        probe.drivers([5, 6, 7], 64, 1)
    with pytest.raises(DataError, match="position 3 is out of range: the text has tokens 0..2"):
        probe.drivers([5, 6, 7], 1, 3)
    moved = tmp_path / "run"
    shutil.copytree(run[0], moved)
    cfg = json.loads((moved / "sae" / "cfg.json").read_text())
    cfg["metadata"]["config"]["data"]["path"] = str(tmp_path / "gone")
    (moved / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"its store could not be opened .*gone.*give the model's directory with lm="):
        open_probe(moved)
    assert open_probe(moved, lm=run[2]).site == SITE  # lm= overrides the lookup
    with pytest.raises(DataError, match="not a model directory"):
        open_probe(moved, lm=tmp_path)
