"""Steering sweeps and `sae-steer` on a tiny random GPT-2 (built with transformers): the batched sampler equals
one prompt at a time, α = 0 is the clean model (continuations and loss), the test-code score, the
extract command equals `contrast` on the same texts, the sweep writes its files, and bad inputs end in one
line."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from hf_oracle import tiny_gpt2

from sae.data.hf import template
from sae.models import load
from sae.models.base import token_losses
from sae.models.generate import batch_sampler, sampler
from sae.steer import texts
from sae.steer.cli import steer
from sae.steer.directions import Direction, contrast
from sae.steer.sweep import Steerer, choose_site, test_code

SITES = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_gpt2(tmp_path_factory.mktemp("m"), n_layer=1, n_positions=48)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(checkpoint)


def test_test_code_is_the_share_of_assertion_lines():
    text = "x = 1\n\n    assert x == 1\n    self.assertEqual(x, 1)\n    self.assertion = 2\n    self.fail('no')\n"
    assert test_code(text) == pytest.approx(3 / 5)  # `self.assertion = 2` is not an assertion
    assert test_code("") == 0.0 and test_code("\n  \n") == 0.0


def test_batch_sampler_equals_one_prompt_at_a_time(loaded):
    model, _ = loaded
    prompts = [[5, 17, 42], [8, 1, 2, 3, 4, 9, 11], [300]]
    one = sampler(model)
    assert batch_sampler(model)(prompts, 6) == [one(p, 6) for p in prompts]
    hot = batch_sampler(model)(prompts, 6, temperature=1.0, seed=3)
    assert hot == batch_sampler(model)(prompts, 6, temperature=1.0, seed=3) and hot != batch_sampler(model)(prompts, 6)


def test_strength_zero_is_the_clean_model_and_choose_site_reports_every_site(loaded):
    model, tokenizer = loaded
    prompts = [np.array([5, 17, 42]), np.array([8, 1, 2, 3])]
    evals = [np.array([3, 4, 5, 6, 7, 8]), np.array([9, 10, 11])]
    steerer = Steerer(model, tokenizer, prompts, evals, lambda t: len(t) / 100, max_new_tokens=5)
    v = np.random.default_rng(0).normal(size=32).astype(np.float32)
    score, loss, outs = steerer.at(SITES[1], v, 0.0)
    plain = batch_sampler(model)([p.tolist() for p in prompts], 5)
    assert outs == [tokenizer.decode(o) for o in plain]

    def by_hand(alpha):
        splice = {SITES[1]: lambda x: x + alpha * v}
        return np.concatenate(
            [np.asarray(token_losses(model(e[None], replace=splice), jnp.asarray(e[None])))[0] for e in evals]
        ).mean()

    assert loss == pytest.approx(by_hand(0.0), abs=1e-5)
    assert steerer.at(SITES[1], v, 3.0)[1] == pytest.approx(by_hand(3.0), abs=1e-5) != loss
    assert score == pytest.approx(np.mean([len(t) / 100 for t in outs]))
    direction = Direction(SITES, np.stack([v, v]), "response_mean", "mean_difference")
    site, table = choose_site(steerer, direction, 4.0)
    assert set(table) == set(SITES) and site == max(table, key=lambda s: table[s]["per_loss"])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_extract_equals_contrast_and_sweep_writes_its_files(checkpoint, loaded, tmp_path, capsys):
    model, tokenizer = loaded
    pos = _write(tmp_path / "a.jsonl", [{"prompt": "def f(x):\n", "response": "    assert x\n"}] * 2)
    neg = _write(tmp_path / "b.jsonl", [{"prompt": "def f(x):\n", "response": "    return x\n"}, {"text": "y = 2"}])
    with pytest.raises(SystemExit) as done:
        steer(["extract", f"lm={checkpoint}", f"positive={pos}", f"negative={neg}", f"out={tmp_path / 'd'}"])
    assert done.value.code == 0
    got = Direction.load(tmp_path / "d")
    prefix = template(tokenizer, model.config.bos_token_id)[0]
    ex = {k: texts.examples(texts.read_records(p, k), tokenizer, prefix, 48, k) for k, p in (("a", pos), ("b", neg))}
    sites = [s for s in model.sites if ".hook_resid_" in s]
    want = contrast(model, sites, ex["a"], ex["b"], "response_mean")
    assert got.sites == sites and got.pooling == "response_mean"
    np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-6)
    prompts = tmp_path / "p.txt"
    prompts.write_text("def test_a(self):\n---\nclass A:\n    def f(self):\n---\nimport os\n")
    with pytest.raises(SystemExit) as done:
        steer(
            ["sweep", f"lm={checkpoint}", f"direction={tmp_path / 'd'}", "alphas=[-2,0,2]", f"prompts={prompts}"]
            + ["max_new_tokens=4", f"out={tmp_path / 's'}"]
        )
    assert done.value.code == 0
    report = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [a["alpha"] for a in report["alphas"]] == [-2, 0, 2] and report["site"] in sites
    assert set(report["site_choice"]) == set(sites) and report["monitoring"]["n"] == 3
    assert len(report["alphas"][1]["examples"]) == 3
    assert (tmp_path / "s" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "sae-steer sweep at " in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["extract", "lm={ck}", "positive={tmp}/none.txt", "negative={tmp}/none.txt", "out={tmp}/o"], "no such file"),
        (["sweep", "lm={ck}", "direction={tmp}", "prompts={tmp}/p.txt", "out={tmp}/o"], "has no direction"),
        (["extract", "lm={ck}", "positive=a", "negative=b", "out=o", "polling=last"], "'polling=last' is not key="),
        (["extract", "lm={ck}", "positive=a", "negative=b"], "out required"),
        (["draw"], "the first word must be extract or sweep"),
        (
            ["extract", "lm={ck}", "positive={tmp}/p.txt", "negative={tmp}/q.txt", "method=pca_diff", "out={tmp}/o"],
            "pca_diff pairs the examples: 2 positive and 1 negative",
        ),
        (
            ["extract", "lm={ck}", "positive={tmp}/p.txt", "negative={tmp}/q.txt", "sites=[blocks.9.x]", "out={tmp}/o"],
            "'blocks.9.x' is not a site",
        ),
    ],
)
def test_bad_steer_commands_end_in_one_line(checkpoint, tmp_path, capsys, argv, message):
    (tmp_path / "p.txt").write_text("a = 1\nb = 2\n")
    (tmp_path / "q.txt").write_text("c = 3\n")
    with pytest.raises(SystemExit) as done:
        steer([a.format(ck=checkpoint, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and message in err[0], err
