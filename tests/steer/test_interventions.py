"""Interventions on a tiny random GPT-2 (built with transformers): strength 0 and an unchanged feature are the
clean model exactly, ablation moves the site by −f_i d_i, adding α·v equals a hand-written splice, and
strengths are arguments (a sweep compiles once), in the forward and in generation."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_oracle import relu_sae, tiny_gpt2

from sae.models import ModelError, load
from sae.models.generate import generate as plain_generate
from sae.steer.interventions import Add, Feature, generate, positions, steered

SITE = "blocks.0.hook_resid_post"
TOKENS = np.random.default_rng(0).integers(0, 320, (2, 10))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load(tiny_gpt2(tmp_path_factory.mktemp("m")))[0]


@pytest.fixture(scope="module")
def sae():
    """A ReLU SAE with 64 features on the 32-wide residual stream (SAELens 'standard')."""
    return relu_sae()


def test_zero_strength_and_an_unchanged_feature_are_the_clean_model(model, sae):
    clean = np.asarray(steered(model, [])(TOKENS))  # compiled as the steered forward is
    v = np.random.default_rng(2).normal(size=32).astype(np.float32)
    fn = steered(model, [Add(SITE, v), Feature(SITE, sae, 3, "scale")])
    np.testing.assert_array_equal(np.asarray(fn(TOKENS, [0.0, 1.0])), clean)  # α = 0, f_3 scaled by 1


def test_ablating_a_feature_moves_the_site_by_minus_f_d(model, sae):
    x = np.asarray(steered(model, [], capture=[SITE])(TOKENS)[1][SITE])
    f = np.asarray(sae.encode(jnp.asarray(x)))[..., 7]
    assert (f > 0).any()
    _, got = steered(model, [Feature(SITE, sae, 7, "ablate")], capture=[SITE])(TOKENS, [0.0])
    expected = x - f[..., None] * np.asarray(sae.params["W_dec"][7])
    np.testing.assert_allclose(np.asarray(got[SITE]), expected, rtol=0, atol=1e-6)
    _, clamped = steered(model, [Feature(SITE, sae, 7, "clamp")], capture=[SITE])(TOKENS, [2.5])
    expected = x + (2.5 - f)[..., None] * np.asarray(sae.params["W_dec"][7])  # f_7 set to 2.5, the error kept
    np.testing.assert_allclose(np.asarray(clamped[SITE]), expected, rtol=0, atol=1e-6)


def test_add_equals_a_hand_written_splice_on_chosen_positions_and_never_recompiles(model):
    v = np.random.default_rng(2).normal(size=32).astype(np.float32)
    where = np.zeros(10, bool)
    where[4:] = True
    fn = steered(model, [Add(SITE, v, positions=where)])
    for alpha in (-3.0, 0.5, 4.0):
        by_hand = model(TOKENS, replace={SITE: lambda x, a=alpha: x + a * jnp.asarray(where)[None, :, None] * v})
        np.testing.assert_allclose(np.asarray(fn(TOKENS, [alpha])), np.asarray(by_hand), atol=1e-5)
    assert fn.jitted._cache_size() == 1
    first = np.asarray(fn(TOKENS, [4.0]))
    np.testing.assert_allclose(first[:, :4], np.asarray(model(TOKENS))[:, :4], atol=1e-5)  # causal: earlier ones


def test_generation_with_strength_zero_is_the_plain_continuation(model, sae):
    prompt = [5, 17, 42, 8]
    plain = plain_generate(model, prompt, 8)
    items = [Add(SITE, np.random.default_rng(2).normal(size=32).astype(np.float32)), Feature(SITE, sae, 3, "scale")]
    assert generate(model, prompt, 8, items, [0.0, 1.0]) == plain
    assert generate(model, prompt, 8, items, [50.0, 1.0]) != plain
    assert generate(model, prompt, 8, items, [0.0, 1.0], temperature=1.0, seed=3) == plain_generate(
        model, prompt, 8, temperature=1.0, seed=3
    )


def test_bad_interventions_name_the_problem(model, sae):
    with pytest.raises(ModelError, match="out of range: the SAE has 64 features"):
        Feature(SITE, sae, 64)
    with pytest.raises(ModelError, match="op 'zero' is not one of"):
        Feature(SITE, sae, 1, "zero")
    with pytest.raises(ModelError, match="'blocks.0.mlp.hook_post' has width 32; the site has 128"):
        steered(model, [Feature("blocks.0.mlp.hook_post", sae, 1)])
    with pytest.raises(ModelError, match="expected \\(1,\\)"):
        steered(model, [Add(SITE, np.ones(32))])(TOKENS, [1.0, 2.0])


def test_positions_name_the_prompt_the_generated_tokens_or_a_list():
    assert positions("all", 3, 6) is None
    assert positions("prompt", 3, 6).tolist() == [True, True, True, False, False, False]
    assert positions("generated", 3, 6).tolist() == [False, False, False, True, True, True]
    assert positions([0, 5], 3, 6).tolist() == [True, False, False, False, False, True]
    with pytest.raises(ModelError, match="positions='middle'"):
        positions("middle", 3, 6)
    with pytest.raises(ModelError, match=r"positions \[6\] fall outside the model's context 0..5"):
        positions([6], 3, 6)
