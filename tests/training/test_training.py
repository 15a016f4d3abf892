"""End-to-end training on synthetic ground truth, and the train step's schedules and bookkeeping."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_config

from sae.architectures import make_sae
from sae.config import OptimConfig
from sae.data.arrays import ArraysConfig
from sae.data.synthetic import SyntheticBatches
from sae.export import load_sae
from sae.training import train
from sae.training.geometric_median import geometric_median
from sae.training.schedules import lr_schedule, sparsity_warmup
from sae.training.step import init_state, make_optimizer, make_train_step

# Test-sized budgets (seconds each) that the families reach MMCS ≥ 0.9 with.
RECOVERY_RUNS = {
    "topk": dict(k=3),
    "batchtopk": dict(k=3),
    "jumprelu": dict(l0_coefficient=0.3, threshold_init=0.1, bandwidth=0.05),
    "relu_april": dict(),  # the recipe as the CLI runs it: inputs normalised, λ = 1
}


@pytest.mark.parametrize("name", sorted(RECOVERY_RUNS))
def test_recovers_ground_truth_features(name, run_dir):
    """The acceptance bar: MMCS ≥ 0.9 against the planted features, and every output file written."""
    cfg = small_config(name, **RECOVERY_RUNS[name])
    metrics = train(cfg, run_dir)
    assert metrics["mmcs"] >= 0.9, metrics
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["mmcs"] == metrics["mmcs"]
    for key in ("mse", "fvu", "explained_variance", "l0", "dead_fraction", "mmcs"):
        assert np.isfinite(on_disk[key]), key
    assert on_disk["explained_variance"] == pytest.approx(1 - on_disk["fvu"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(50, 391, 50)) + [390]
    assert lines[-1]["fvu"] < lines[0]["fvu"]
    truth = np.load(run_dir / "ground_truth.npy")
    np.testing.assert_allclose(truth, np.asarray(SyntheticBatches(cfg.data, 0, cfg.seed).ground_truth))
    # The exported SAE, in raw input units, reproduces the evaluated FVU on the same held-out batches.
    loaded = load_sae(run_dir / "sae")
    assert loaded.architecture == name
    x = np.concatenate([np.asarray(b) for b in SyntheticBatches(cfg.data, 0, cfg.seed).eval_batches(1024)])
    fvu = np.sum((x - np.asarray(loaded(jnp.asarray(x)))) ** 2) / np.sum((x - x.mean(0)) ** 2)
    assert fvu == pytest.approx(metrics["fvu"], rel=1e-3)


def test_topk_l0_is_exactly_k(run_dir):
    """TopK keeps exactly k latents per token (every token here has ≥ k positive pre-activations)."""
    train(small_config("topk", total_tokens=120_000, k=5), run_dir)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {line["l0"] for line in lines} == {5.0}


def _train_with_dead_latent(aux_coefficient):
    """TopK (k=1) on x = 3·e0 + c·e1 (c ~ U[0, 1] on half the tokens). Latent 0 = e0 wins every token,
    so e1 stays in the residual. Latent 1 is dead (counter past the window); its decoder row is
    0.6·e1 + 0.8·e2, so it has positive pre-activations yet never wins the top-1."""
    cfg = small_config("topk", k=1, aux_coefficient=aux_coefficient, k_aux=1)
    cfg.sae.d_sae = 4
    sae = make_sae(cfg.sae, 8)
    eye = np.eye(8, dtype=np.float32)
    w_dec = np.stack([eye[0], 0.6 * eye[1] + 0.8 * eye[2], eye[5], eye[6]])
    params = {"W_enc": jnp.asarray(w_dec.T), "b_enc": jnp.zeros(4), "W_dec": jnp.asarray(w_dec), "b_dec": jnp.zeros(8)}
    tx, schedule = make_optimizer(OptimConfig(lr=1e-2, warmup_fraction=0, decay_fraction=0), 1e-2, 300)
    step = make_train_step(sae, tx, schedule, 300, 0.0, dead_tokens=1000)
    state = init_state(sae, params, tx, 1.0)
    state = state._replace(tokens_since_fired=jnp.asarray([0, 10**6, 10**6, 10**6], jnp.int32))
    rng = np.random.default_rng(0)
    for _ in range(300):
        c = rng.uniform(size=(256, 1)) * (rng.uniform(size=(256, 1)) < 0.5)
        state, _ = step(state, jnp.asarray(3 * eye[0] + c * eye[1], jnp.float32))
    return np.asarray(state.params["W_dec"][1]), np.asarray(state.tokens_since_fired)


def test_auxk_trains_dead_latents_on_the_residual():
    """Without AuxK a dead latent gets no gradient at all; with it, its decoder row turns to the
    direction the live latents leave unexplained (Gao et al. 2024 §A.2)."""
    row_without, counters_without = _train_with_dead_latent(0.0)
    row_with, _ = _train_with_dead_latent(1 / 32)
    np.testing.assert_array_equal(row_without, np.array([0, 0.6, 0.8, 0, 0, 0, 0, 0], np.float32))
    assert counters_without[1] >= 10**6  # still dead
    assert row_with[1] / np.linalg.norm(row_with) > 0.95, row_with


def _train_on_exact_capacity(aux_coefficient, steps=600, batch=1024, n=128, d=64, k=3):
    """TopK with as many latents as true features (n unit directions in d dims, k active per token,
    magnitudes U[0.5, 1.5]): (final dead fraction, FVU, MMCS)."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n, d)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    cfg = small_config("topk", k=k, k_aux=32, aux_coefficient=aux_coefficient)
    cfg.sae.d_sae = n
    sae = make_sae(cfg.sae, d)
    tx, schedule = make_optimizer(OptimConfig(), 2e-3, steps)
    state = init_state(sae, sae.init_params(jax.random.PRNGKey(1), jnp.zeros(d)), tx, 1.0)
    step = make_train_step(sae, tx, schedule, steps, 0.0, dead_tokens=8 * batch)
    for _ in range(steps):
        codes = (rng.random((batch, n)) < k / n) * rng.uniform(0.5, 1.5, (batch, n))
        state, metrics = step(state, jnp.asarray(codes @ features, jnp.float32))
    mmcs = np.abs(features @ np.asarray(state.params["W_dec"]).T).max(axis=1).mean()
    return float(metrics["dead_fraction"]), float(metrics["fvu"]), mmcs


@pytest.mark.slow
def test_auxk_lowers_the_dead_fraction():
    """Every latent is needed here, but some lose every top-k early on and die. Without AuxK they never
    get a gradient again (measured: 12.5% dead, MMCS 0.936, FVU 0.214); AuxK trains them on the
    residual until they win tokens again (2.3% dead), and they then recover the features the live
    latents had left out (MMCS 0.973, FVU 0.176)."""
    dead_without, fvu_without, mmcs_without = _train_on_exact_capacity(0.0)
    dead_with, fvu_with, mmcs_with = _train_on_exact_capacity(1 / 32)
    assert dead_without >= 0.05
    assert dead_with <= dead_without / 2
    assert mmcs_with > mmcs_without + 0.01 and fvu_with < fvu_without - 0.01


def test_train_step_compiles_once_and_tracks_dead_latents():
    """One compilation for many steps; counters reset where a latent fired and grow by the batch."""
    cfg = small_config("topk", k=2)
    sae = make_sae(cfg.sae, 24)
    params = sae.init_params(jax.random.PRNGKey(0), jnp.zeros(24))
    tx, schedule = make_optimizer(OptimConfig(lr=1e-3), 1e-3, 10)
    step = make_train_step(sae, tx, schedule, 10, 0.0, dead_tokens=64)
    state = init_state(sae, params, tx, 1.0)
    # Only latent 0 can fire: one input along its encoder column, which dominates every other.
    x = jnp.tile(100.0 * params["W_dec"][0], (32, 1))
    for _ in range(3):
        state, metrics = step(state, x)
    assert step._cache_size() == 1
    fired = np.asarray(state.tokens_since_fired == 0)
    assert fired[0] and fired.sum() <= 2  # k = 2 latents are kept per token; the second may be any
    assert set(np.unique(np.asarray(state.tokens_since_fired))) <= {0, 96}
    assert float(metrics["dead_fraction"]) == pytest.approx(np.mean(np.asarray(state.tokens_since_fired) >= 64))
    assert int(state.step) == 3


def test_lr_schedule_warmup_constant_decay():
    schedule = lr_schedule(1.0, n_steps=100, warmup_fraction=0.1, decay_fraction=0.2)
    values = np.array([float(schedule(s)) for s in range(100)])
    np.testing.assert_allclose(values[:10], (np.arange(10) + 1) / 10, rtol=1e-6)
    np.testing.assert_allclose(values[10:80], 1.0)
    np.testing.assert_allclose(values[80:], (100 - np.arange(80, 100)) / 20, rtol=1e-6)


def test_sparsity_warmup():
    warm = sparsity_warmup(200, 0.05)
    np.testing.assert_allclose([float(warm(s)) for s in (0, 4, 9, 10, 150)], [0.1, 0.5, 1.0, 1.0, 1.0], rtol=1e-6)
    assert float(sparsity_warmup(200, 0.0)(0)) == 1.0


def test_geometric_median_is_the_weiszfeld_fixed_point():
    """Σ_i (x_i − m)/‖x_i − m‖ = 0 at the median; it resists outliers unlike the mean."""
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(size=(200, 5)), 1000 + rng.normal(size=(20, 5))]).astype(np.float32)
    median = np.asarray(geometric_median(jnp.asarray(points)))
    diffs = points - median
    unit_sum = (diffs / np.linalg.norm(diffs, axis=1, keepdims=True)).sum(0)
    assert np.linalg.norm(unit_sum) < 1e-2 * len(points)
    assert np.linalg.norm(median) < 5 < np.linalg.norm(points.mean(0))


def test_trains_from_a_users_float16_npy(tmp_path):
    """data=arrays: a float16 [n_tokens, d_in] file, memory-mapped; the SAE learns it (FVU falls) and the
    export reproduces the evaluated FVU on the held-out rows (the file's last tenth)."""
    cfg = small_config("topk", total_tokens=200_000, k=3)
    source = SyntheticBatches(cfg.data, 0, 1)
    x = np.concatenate([np.asarray(source.sample(4096, seed=i)) for i in range(10)]).astype(np.float16)
    np.save(tmp_path / "acts.npy", x)
    cfg.data = ArraysConfig(path=str(tmp_path / "acts.npy"), eval_tokens=4096)
    metrics = train(cfg, tmp_path / "run")
    assert metrics["eval_tokens"] == 4096 and "mmcs" not in metrics
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["fvu"] < 0.7 * lines[0]["fvu"]  # first line: step 50
    held_out = x[-4096:].astype(np.float32)
    x_hat = np.asarray(load_sae(tmp_path / "run" / "sae")(jnp.asarray(held_out)))
    fvu = np.sum((held_out - x_hat) ** 2) / np.sum((held_out - held_out.mean(0)) ** 2)
    assert fvu == pytest.approx(metrics["fvu"], rel=1e-3)


@pytest.mark.parametrize("name, extra", [("topk", {"k": 3}), ("batchtopk", {"k": 3}), ("relu_april", {})])
def test_bfloat16_compute_and_parameters_train_like_float32(name, extra, tmp_path):
    """trainer.compute_dtype / param_dtype = bfloat16 reach the float32 run's recovery and FVU closely."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        cfg = small_config(name, total_tokens=200_000, **extra)
        cfg.trainer.compute_dtype = cfg.trainer.param_dtype = dtype
        results[dtype] = train(cfg, tmp_path / dtype)
    assert results["bfloat16"]["mmcs"] == pytest.approx(results["float32"]["mmcs"], abs=0.03)
    assert results["bfloat16"]["fvu"] == pytest.approx(results["float32"]["fvu"], rel=0.2)
