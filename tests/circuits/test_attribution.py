"""Circuit tracing on tiny random models with random transcoders built here: the local replacement model
reproduces the model's logits, the adjacency matrix is the replacement model's exact linear response
(circuit-tracer's own check), influence, pruning and the scores against NumPy, interventions against the
replacement model's linear map, and the errors of bad input."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_oracle import save_checkpoint, tiny_gpt2, tiny_llama

from sae.circuits import attribute, generate, influence, intervene, normalize, prune, random_transcoders, scores
from sae.circuits.graph import Graph, find_threshold
from sae.circuits.replacement import replacement
from sae.errors import ConfigError, DataError
from sae.models import load, load_model
from sae.models.generate import generate as model_generate

TOKENS = np.random.default_rng(0).integers(0, 300, 19)
OUT = 0.05  # the tiny models' MLP outputs are about this large: errors stay as small as the model's outputs


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return load_model(tiny_gpt2(tmp_path_factory.mktemp("gpt2"), n_layer=3, n_positions=32))


@pytest.fixture(scope="module")
def clt(gpt2):
    return random_transcoders(gpt2.config, 64, "topk", k=4, skip=True, out_norm=OUT)


@pytest.fixture(scope="module")
def clt_graph(gpt2, clt):
    return attribute(gpt2, clt, TOKENS)


def _families(tmp_path_factory):
    torch_models = {
        "llama": tiny_llama(),
        "gemma2": transformers.Gemma2ForCausalLM(
            transformers.Gemma2Config(
                vocab_size=320,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=32,
                sliding_window=4,
                attn_logit_softcapping=5.0,
                final_logit_softcapping=3.0,
                attn_implementation="eager",
            )
        ).eval(),
        "gpt_neox": transformers.GPTNeoXForCausalLM(
            transformers.GPTNeoXConfig(
                vocab_size=320,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=32,
                attn_implementation="eager",
            )
        ).eval(),
    }
    return {name: save_checkpoint(m, tmp_path_factory.mktemp(name)) for name, m in torch_models.items()}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return _families(tmp_path_factory)


def _mlp_out_norm(model) -> float:
    _, got = model(jnp.asarray(TOKENS)[None], capture=["blocks.0.hook_mlp_out"])
    return float(jnp.linalg.norm(got["blocks.0.hook_mlp_out"], axis=-1).mean())


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("rule", ["topk", "jumprelu"])
def test_replacement_model_reproduces_the_logits(family, rule, gpt2, family_dirs):
    model = gpt2 if family == "gpt2" else load_model(family_dirs[family])
    tc = random_transcoders(
        model.config, 32, rule, k=3, cross_layer=rule == "topk", skip=rule == "jumprelu", out_norm=_mlp_out_norm(model)
    )
    r = replacement(model, tc)
    trace = r.trace(TOKENS)
    want = np.asarray(model(jnp.asarray(TOKENS)[None])[0])
    x, _, logits = r.forward(trace, trace.embed, trace.mlp_in(tc.b_dec))
    n = len(TOKENS)
    assert np.abs(np.asarray(trace.logits[:n]) - want).max() <= 1e-5
    assert np.abs(np.asarray(logits[:n]) - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert np.abs(np.asarray(x - trace.x)[:, :n]).max() <= 1e-5
    assert float(jnp.abs(trace.acts).sum()) > 0  # the transcoders are active: the test is not vacuous


def _targets(graph: Graph, tc, x, pre) -> np.ndarray:
    """Every target's value as the graph defines it: features' pre-activations, logits less their mean."""
    feats = np.array([x[layer, p] @ tc.W_enc[layer][:, f] + tc.b_enc[layer, f] for layer, p, f in graph.features])
    z = np.asarray(pre[graph.n_pos - 1], np.float64)
    return np.r_[feats, z[graph.logit_tokens] - z.mean()]


@pytest.mark.parametrize("kind", ["clt", "transcoders"])
def test_adjacency_is_the_replacement_models_linear_response(kind, gpt2, clt, clt_graph):
    """Doubling a source's input (a feature's decoder writes, an error, a token embedding) under frozen
    attention moves every target by exactly that source's column of the adjacency matrix (≤ 5e-4)."""
    tc = (
        clt
        if kind == "clt"
        else random_transcoders(gpt2.config, 48, "jumprelu", cross_layer=False, seed=3, out_norm=OUT)
    )
    graph = clt_graph if kind == "clt" else attribute(gpt2, tc, TOKENS, batch=16)
    r = replacement(gpt2, tc)
    trace = r.trace(TOKENS)
    u = trace.mlp_in(tc.b_dec)
    base = _targets(graph, tc, *r.forward(trace, trace.embed, u)[:2])
    spans, n = graph.spans, graph.n_pos
    rows = np.r_[spans["features"], spans["logits"]]
    assert len(graph.features) > 20
    rng = np.random.default_rng(1)
    checked = []
    for j in rng.choice(len(graph.features), 6, replace=False):
        layer, p, f = graph.features[j]
        writes = graph.activations[j] * tc.decoder_vectors(int(layer), jnp.asarray([f]))[0]
        checked.append((j, trace.embed, u.at[:, p].add(writes)))
    for layer, p in [(0, 3), (1, n - 1), (2, 10)]:
        checked.append((spans["errors"].start + layer * n + p, trace.embed, u.at[layer, p].add(trace.errors[layer, p])))
    for p in [0, 7, n - 1]:
        checked.append((spans["tokens"].start + p, trace.embed.at[p].add(trace.embed[p]), u))
    for column, embed, mlp_in in checked:
        moved = _targets(graph, tc, *r.forward(trace, embed, mlp_in)[:2]) - base
        np.testing.assert_allclose(moved, graph.adjacency[rows, column], atol=5e-4)
    assert np.abs(graph.adjacency).max() > 0.1
    # no source acts on a target at or before it: a feature's row has no edge from its own layer's features
    layer_of = graph.features[:, 0]
    same = layer_of[:, None] <= layer_of[None, :]
    assert not graph.adjacency[: len(layer_of), : len(layer_of)][same].any()


def test_targets_are_the_logits_covering_95_percent(clt_graph, gpt2):
    z = np.asarray(gpt2(jnp.asarray(TOKENS)[None])[0, -1], np.float64)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    order = np.argsort(-p)
    n = min(10, int(np.searchsorted(np.cumsum(p[order]), 0.95)) + 1)
    assert clt_graph.logit_tokens.tolist() == order[:n].tolist()
    np.testing.assert_allclose(clt_graph.logit_probs, p[order[:n]], rtol=1e-4)


def _chain() -> Graph:
    """A hand-made graph: 2 features, 1 layer × 2 positions of errors, 2 tokens, 1 logit.
    logit ← f1 (3), ← error(0, 1) (1); f1 ← f0 (2), ← token 1 (−2); f0 ← token 0 (1), ← error(0, 0) (1)."""
    a = np.zeros((7, 7), np.float32)  # nodes: f0 f1 e00 e01 t0 t1 logit
    a[6, 1], a[6, 3] = 3.0, 1.0
    a[1, 0], a[1, 5] = 2.0, -2.0
    a[0, 4], a[0, 2] = 1.0, 1.0
    features = np.array([[0, 0, 5], [0, 1, 9]])
    return Graph(
        np.array([11, 12]),
        features,
        np.ones(2, np.float32),
        np.array([7]),
        np.array([1.0], np.float32),
        a,
        n_layers=1,
        n_features=16,
        kind="cross layer transcoder",
        names=("x",),
    )


def test_influence_and_scores_against_hand_computation():
    g = _chain()
    a = normalize(g.adjacency)
    w = g.logit_weights()
    # the logit's row: f1 3/4, e01 1/4; f1's: f0 1/2, t1 1/2; f0's: t0 1/2, e00 1/2
    np.testing.assert_allclose(influence(a, w), [3 / 8, 3 / 4, 3 / 16, 1 / 4, 3 / 16, 3 / 8, 0])
    np.testing.assert_allclose(influence(a, w), w @ (np.linalg.inv(np.eye(7) - a) - np.eye(7)), atol=1e-12)
    s = scores(g)
    assert s["replacement"] == pytest.approx((3 / 16 + 3 / 8) / (3 / 16 + 3 / 8 + 3 / 16 + 1 / 4))
    # completeness: Σ (1 − error share of a row) · (influence + w) / Σ (influence + w)
    weights = np.array([3 / 8, 3 / 4, 3 / 16, 1 / 4, 3 / 16, 3 / 8, 1])
    complete = np.array([1 / 2, 1, 1, 1, 1, 1, 3 / 4])
    assert s["completeness"] == pytest.approx((complete * weights).sum() / weights.sum())


def test_influence_matches_the_inverse_on_a_real_graph(clt_graph):
    a = normalize(clt_graph.adjacency)
    w = clt_graph.logit_weights()
    want = w @ (np.linalg.inv(np.eye(len(a)) - a) - np.eye(len(a)))
    np.testing.assert_allclose(influence(a, w), want, atol=1e-9)


def test_pruning_keeps_tokens_logits_and_lowers_scores(clt_graph):
    g = clt_graph
    full = scores(g)
    kept = prune(g, 1.0, 1.0)
    assert scores(g, kept) == pytest.approx(full)  # keeping every edge of influence keeps the scores
    p = prune(g)
    spans = g.spans
    assert p.node_mask[spans["tokens"].start :].all()
    assert p.node_mask.sum() < len(g.adjacency)
    assert not (p.edge_mask & ~(p.node_mask[:, None] & p.node_mask[None, :])).any()
    assert (g.adjacency[p.edge_mask] != 0).all()
    pruned = scores(g, p)
    assert pruned["replacement"] <= full["replacement"] + 1e-9
    assert pruned["completeness"] <= full["completeness"] + 1e-9
    # the nodes kept: within those holding node_threshold of the influence (tokens and logits besides)
    node_score = influence(normalize(g.adjacency), g.logit_weights())
    by_influence = node_score >= find_threshold(node_score, 0.8)
    assert node_score[by_influence].sum() >= 0.8 * node_score.sum() - 1e-9
    assert not (p.node_mask[: spans["tokens"].start] & ~by_influence[: spans["tokens"].start]).any()
    stricter = prune(g, 0.5, 0.9)
    assert stricter.node_mask.sum() <= p.node_mask.sum()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_thresholds_outside_zero_one_are_refused(clt_graph, bad):
    with pytest.raises(ConfigError, match="node_threshold"):
        prune(clt_graph, node_threshold=bad)
    with pytest.raises(ConfigError, match="edge_threshold"):
        prune(clt_graph, edge_threshold=bad)


def test_interventions_against_the_replacement_model(gpt2, clt, clt_graph):
    n = len(TOKENS)
    want = np.asarray(gpt2(jnp.asarray(TOKENS)[None])[0])
    logits, acts = intervene(gpt2, clt, TOKENS, [])
    np.testing.assert_allclose(logits, want, atol=1e-5)
    r = replacement(gpt2, clt)
    trace = r.trace(TOKENS)
    np.testing.assert_allclose(acts, np.asarray(trace.acts)[:, :n], atol=1e-6)
    # constrained to every layer, a feature's change acts only through its own writes: the linear map
    layer, p, f = (int(v) for v in clt_graph.features[np.argmax(clt_graph.activations)])
    a = float(trace.acts[layer, p, f])
    writes = clt.decoder_vectors(layer, jnp.asarray([f]))[0]
    for mode, value, new in (("set", 0.0, 0.0), ("multiply", 3.0, 3 * a), ("set", 5.0, 5.0)):
        logits, acts = intervene(gpt2, clt, TOKENS, [(layer, p, f, value)], layers=range(0, 3), mode=mode)
        _, _, expected = r.forward(trace, trace.embed, trace.mlp_in(clt.b_dec).at[:, p].add((new - a) * writes))
        np.testing.assert_allclose(logits, np.asarray(expected)[:n], atol=1e-5)
        assert acts[layer, p, f] == pytest.approx(new)
        others = np.ones(acts.shape, bool)
        others[layer, p, f] = False
        np.testing.assert_array_equal(acts[others], np.asarray(trace.acts)[:, :n][others])
    # unconstrained, later layers' features respond: at layer 2 the activations differ from the clean ones
    _, free = intervene(gpt2, clt, TOKENS, [(layer, p, f, 0.0)])
    assert layer < 2 and np.abs(free[2, p:] - np.asarray(trace.acts)[2, p:n]).max() > 0
    np.testing.assert_allclose(free[:, :p], np.asarray(trace.acts)[:, :p], atol=1e-5)  # causal: earlier ones kept


def test_generation_with_interventions(gpt2, clt):
    prompt = TOKENS[:8]
    assert generate(gpt2, clt, prompt, [], 4) == model_generate(gpt2, prompt.tolist(), 4)
    # a last-layer intervention changes no MLP input, so the first new token is the replacement model's argmax
    edit = [(2, 7, 3, 25.0)]
    logits, _ = intervene(gpt2, clt, prompt, edit, freeze_attention=False)
    assert generate(gpt2, clt, prompt, edit, 1) == [int(np.argmax(logits[-1]))]


def test_bad_input_names_the_problem(gpt2, clt, family_dirs):
    with pytest.raises(DataError, match="empty"):
        attribute(gpt2, clt, [])
    with pytest.raises(DataError, match="33 tokens; the model's context is 32"):
        attribute(gpt2, clt, np.zeros(33, int))
    with pytest.raises(ConfigError, match="feature 64 is out of range 0..63"):
        intervene(gpt2, clt, TOKENS, [(0, 1, 64, 0.0)])
    with pytest.raises(ConfigError, match="position 19 is out of range 0..18"):
        intervene(gpt2, clt, TOKENS, [(0, 19, 1, 0.0)])
    with pytest.raises(ConfigError, match="layer 3 is out of range"):
        intervene(gpt2, clt, TOKENS, [(3, 0, 1, 0.0)])
    with pytest.raises(ConfigError, match="mode='add'"):
        intervene(gpt2, clt, TOKENS, [], mode="add")
    with pytest.raises(ConfigError, match="layers=range"):
        intervene(gpt2, clt, TOKENS, [], layers=range(1, 5))
    two_layer, _ = load(family_dirs["llama"])
    with pytest.raises(DataError, match="transcoders for 3 layers; the model has 2"):
        attribute(two_layer, clt, TOKENS)
    wide = dataclasses.replace(clt, input_sites=("blocks.0.hook_resid_post",) + clt.input_sites[1:])
    with pytest.raises(DataError, match="layer 0 reads 'blocks.0.hook_resid_post'"):
        attribute(gpt2, wide, TOKENS)
    other = random_transcoders(dataclasses.replace(gpt2.config, d_model=16), 8)
    with pytest.raises(DataError, match="d_in=16, but the model's d_model is 32"):
        attribute(gpt2, other, TOKENS)
