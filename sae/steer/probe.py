"""The probe's operations on one model and one SAE at one site, as functions that return arrays (the app at
`sae.steer.app` only calls them): read a text's features, compare two versions of it, find what drives a
feature at a token, and steer.

A text is tokenized as the activation store was (the tokenizer's template, e.g. GPT-2's BOS, in front) and
cut to the model's context; template positions are not shown, as the store has none. Every forward runs on
a fixed [batch, n_ctx] buffer (batches rounded up to powers of two), so a new text never recompiles.

    activations(text)             f [n, d_sae] = encode(x_site) per token                    (`Reading`)
    projection(text, v, site)     monitoring: h_site · v / ‖v‖ per token
    diff(before, after)           after's tokens aligned to before's (difflib on token ids); Δf = f_after −
                                  f_before at matched tokens (a causal model: exactly 0 before an edit)
    drivers(text, i, p)           leave-one-out: f_i(p) − f_i(p − 1 in the text with token j deleted), j < p;
                                  gradient × input: Σ_d ∂f_i(p)/∂h_jd · (h_jd − h̄_jd), j ≤ p, h the blocks'
                                  input (blocks.0.hook_resid_pre), h̄ the same with token j replaced by the
                                  end-of-text token (Shrikumar et al. 2016; a baseline as in Ancona et al.
                                  2018): with h̄ = 0 it would vanish at every earlier token, since a pre-norm
                                  block reads them only through LayerNorm / RMSNorm, which is invariant to
                                  their scale
    generate(text, steer)         the default and the steered continuation, and the next-token
                                  distribution at the text's last token with and without the steering
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sae import kernels
from sae.architectures import saelens
from sae.data.hf import template
from sae.data.store import Store
from sae.errors import DataError
from sae.export import LoadedSAE, load_sae
from sae.models import load
from sae.models.base import Model, ModelError
from sae.models.tokenizer import Tokenizer
from sae.steer.directions import projection
from sae.steer.interventions import Intervention, sampler, steered

INPUT_SITE = "blocks.0.hook_resid_pre"  # gradient × input is taken on the embeddings the blocks read


@dataclasses.dataclass
class Reading:
    """A text's tokens and features: ids [n], strings [n], f [n, d_sae]; truncated: tokens cut to fit."""

    ids: np.ndarray
    strings: list[str]
    codes: np.ndarray
    truncated: int = 0

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each token's k strongest features: (ids [n, k], values [n, k]), strongest first."""
        k = min(k, self.codes.shape[1])
        idx = np.argsort(-self.codes, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(self.codes, idx, 1)


@dataclasses.dataclass
class Diff:
    """`after` against `before`: match [n_after] (the before-index of each after token, −1 for a new one)
    and delta [n_after, d_sae] (f_after − f_before where matched, f_after where new)."""

    before: Reading
    after: Reading
    match: np.ndarray
    delta: np.ndarray


@dataclasses.dataclass
class Drivers:
    """What drives feature `feature` at text position `position` (activation `value`): per earlier token j
    (0..position), leave_one_out [position + 1] (NaN at the position itself) and grad_x_input [position + 1]."""

    feature: int
    position: int
    value: float
    leave_one_out: np.ndarray
    grad_x_input: np.ndarray


@dataclasses.dataclass
class Steered:
    """Continuations (token ids) without and with the steering, and the next-token distribution at the text's
    last token: top ids [k] with probabilities, before and after."""

    default: list[int]
    steered: list[int]
    next_before: tuple[np.ndarray, np.ndarray]
    next_after: tuple[np.ndarray, np.ndarray]


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Probe:
    """model (a causal LM or an encoder), its tokenizer, and `sae` trained at `site`."""

    def __init__(self, model: Model, tokenizer: Tokenizer, sae: LoadedSAE, site: str, n_ctx: int | None = None):
        if site not in model.sites:
            raise ModelError(f"site {site!r} is not a site of this model; its sites: {model.sites[:8]} …")
        if model.site_dim(site) != sae.d_in:
            raise ModelError(f"the SAE reads {sae.d_in}-wide rows; {site!r} is {model.site_dim(site)} wide")
        self.model, self.tokenizer, self.sae, self.site = model, tokenizer, sae, site
        self.prefix = template(tokenizer, model.config.bos_token_id)[0]
        self.n_ctx = min(n_ctx or model.config.n_ctx, model.config.n_ctx)
        self.vocab = tokenizer.token_strings()
        self.baseline = next((t for t in (tokenizer.eos_id, tokenizer.bos_id) if t is not None), 0)
        graphdef, state = nnx.split(model)
        self._state = state
        causal = model.config.causal
        mask_of = lambda lengths, n: (jnp.arange(n)[None] < lengths[:, None]).astype(jnp.int32)

        def forward(state, tokens, lengths, replace=None, capture=(site,)):
            mask = None if causal else mask_of(lengths, tokens.shape[1])
            _, got = nnx.merge(graphdef, state)(tokens, list(capture), replace, attention_mask=mask)
            return got

        @jax.jit
        def codes(state, tokens, lengths):  # [b, n_ctx] -> f [b, n_ctx, d_sae]
            return sae.encode(forward(state, tokens, lengths)[site].astype(jnp.float32))

        @jax.jit
        def at(state, tokens, lengths, targets, feature):  # f_feature at one target position per row: [b]
            x = forward(state, tokens, lengths)[site].astype(jnp.float32)
            rows = jnp.take_along_axis(x, targets[:, None, None], 1)[:, 0]
            return jnp.take(sae.encode(rows), feature, axis=1)

        @jax.jit
        def grad_x_input(state, tokens, length, target, feature):  # [n_ctx]
            def value(delta):
                got = forward(state, tokens[None], length[None], {INPUT_SITE: lambda h: h + delta}, (site, INPUT_SITE))
                x = got[site][0, target][None].astype(jnp.float32)
                return jnp.take(_differentiable_encode(sae, x)[0], feature), got[INPUT_SITE][0]

            d = model.site_dim(INPUT_SITE)
            g, h = jax.grad(value, has_aux=True)(jnp.zeros((1, tokens.shape[0], d), jnp.float32))
            base = forward(state, jnp.full_like(tokens, self.baseline)[None], length[None], None, (INPUT_SITE,))
            return jnp.sum(g[0] * (h - base[INPUT_SITE][0]).astype(jnp.float32), axis=-1)

        self._codes, self._at, self._gxi = codes, at, grad_x_input

        @partial(jax.jit, static_argnums=3)
        def site_acts(state, tokens, lengths, where):  # [b, n_ctx, d] at any site
            return forward(state, tokens, lengths, None, (where,))[where]

        self._site_acts = site_acts
        self._samplers: dict[tuple, object] = {}

    # --- text in, tokens out ---------------------------------------------------------------------------

    def tokens(self, text: str | Sequence[int]) -> tuple[np.ndarray, int]:
        """(the template + the text's ids, cut to n_ctx, and how many text tokens were cut off)."""
        if isinstance(text, str):
            if not text.strip():
                raise DataError("the text is empty")
            body = self.tokenizer.encode(text)
        else:
            body = np.asarray(text, np.int32)
            if body.size == 0:
                raise DataError("the text is empty")
            if body.min() < 0 or body.max() >= self.model.config.vocab_size:
                raise DataError(f"token ids must lie in 0..{self.model.config.vocab_size - 1}")
        room = self.n_ctx - len(self.prefix)
        ids = np.concatenate([np.asarray(self.prefix, np.int32), np.asarray(body[:room], np.int32)])
        return ids, max(0, len(body) - room)

    def _batch(self, sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded [bucket(len), n_ctx] ids and their lengths (padding rows have length 1)."""
        tokens = np.zeros((_bucket(len(sequences)), self.n_ctx), np.int32)
        lengths = np.ones(len(tokens), np.int32)
        for i, s in enumerate(sequences):
            tokens[i, : len(s)], lengths[i] = s, len(s)
        return tokens, lengths

    def string(self, token: int) -> str:
        """A token id's text (a model's vocabulary may be padded past its tokenizer's: those read <id>)."""
        return self.vocab[token] if 0 <= token < len(self.vocab) else f"<{token}>"

    def _check_feature(self, feature: int) -> int:
        if not isinstance(feature, (int, np.integer)) or not 0 <= feature < self.sae.d_sae:
            raise DataError(f"feature {feature!r} is out of range: the SAE has features 0..{self.sae.d_sae - 1}")
        return int(feature)

    # --- the operations -------------------------------------------------------------------------------

    def activations(self, text: str | Sequence[int]) -> Reading:
        """The text's tokens (template dropped) and their features f [n, d_sae]."""
        ids, cut = self.tokens(text)
        tokens, lengths = self._batch([ids])
        f = np.asarray(self._codes(self._state, tokens, lengths)[0, len(self.prefix) : len(ids)])
        body = ids[len(self.prefix) :]
        return Reading(body, [self.string(t) for t in body], f, cut)

    def projection(self, text: str | Sequence[int], vector: np.ndarray, site: str) -> np.ndarray:
        """Monitoring along a text: each token's activation at `site` projected on the unit direction
        `vector` (`directions.projection`), template dropped: [n]."""
        if site not in self.model.sites or self.model.site_dim(site) != len(vector):
            raise DataError(f"a direction of width {len(vector)} does not fit site {site!r} of this model")
        ids, _ = self.tokens(text)
        tokens, lengths = self._batch([ids])
        acts = np.asarray(self._site_acts(self._state, tokens, lengths, site)[0, len(self.prefix) : len(ids)])
        return projection(acts, vector)

    def diff(self, before: str | Sequence[int], after: str | Sequence[int]) -> Diff:
        """`after`'s features against `before`'s, token by token (one batched forward)."""
        (a, cut_a), (b, cut_b) = self.tokens(before), self.tokens(after)
        tokens, lengths = self._batch([a, b])
        f = np.asarray(self._codes(self._state, tokens, lengths))
        p = len(self.prefix)
        fa, fb = f[0, p : len(a)], f[1, p : len(b)]
        match = np.full(len(b) - p, -1)
        blocks = difflib.SequenceMatcher(None, a[p:].tolist(), b[p:].tolist(), autojunk=False).get_matching_blocks()
        for block in blocks:
            match[block.b : block.b + block.size] = np.arange(block.a, block.a + block.size)
        delta = np.where(match[:, None] >= 0, fb - fa[np.maximum(match, 0)], fb)
        strings = lambda ids: [self.string(t) for t in ids]
        return Diff(Reading(a[p:], strings(a[p:]), fa, cut_a), Reading(b[p:], strings(b[p:]), fb, cut_b), match, delta)

    def drivers(self, text: str | Sequence[int], feature: int, position: int) -> Drivers:
        """Each earlier token's effect on f_feature at text position `position`, by leave-one-out deletion and
        by gradient × input."""
        feature = self._check_feature(feature)
        ids, _ = self.tokens(text)
        p, n = len(self.prefix), len(ids) - len(self.prefix)
        if not isinstance(position, (int, np.integer)) or not 0 <= position < n:
            raise DataError(f"position {position!r} is out of range: the text has tokens 0..{n - 1}")
        target = p + int(position)
        variants = [ids] + [np.delete(ids, p + j) for j in range(position)]
        tokens, lengths = self._batch(variants)
        targets = np.full(len(tokens), 0, np.int32)
        targets[: len(variants)] = [target] + [target - 1] * position
        values = np.asarray(self._at(self._state, tokens, lengths, targets, feature))[: len(variants)]
        loo = np.append(values[0] - values[1:], np.nan)
        padded = np.zeros(self.n_ctx, np.int32)
        padded[: len(ids)] = ids
        gxi = np.asarray(self._gxi(self._state, padded, np.int32(len(ids)), target, feature))[p : target + 1]
        return Drivers(feature, int(position), float(values[0]), loo, gxi)

    def sampler(self, interventions: Sequence[Intervention]):
        """The compiled generator for this set of interventions (kept: a new strength never recompiles)."""
        key = tuple(_key(item) for item in interventions)
        if key not in self._samplers:
            self._samplers[key] = (sampler(self.model, interventions), steered(self.model, interventions))
        return self._samplers[key]

    def generate(
        self,
        text: str | Sequence[int],
        interventions: Sequence[Intervention] = (),
        strengths=None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
        top: int = 10,
    ) -> Steered:
        """The continuation without and with the interventions (same seed), and the next-token distribution."""
        if not self.model.config.causal:
            raise ModelError("generation needs a causal language model; this one is an encoder")
        ids, _ = self.tokens(text)
        strengths = np.zeros(len(interventions)) if strengths is None else np.asarray(strengths, np.float32)
        (plain, plain_logits), (steer, steer_logits) = self.sampler([]), self.sampler(list(interventions))
        default = plain(ids, max_new_tokens, None, temperature, seed)
        changed = steer(ids, max_new_tokens, strengths, temperature, seed)
        tokens, _ = self._batch([ids])

        def distribution(logits) -> tuple[np.ndarray, np.ndarray]:
            probs = np.asarray(jax.nn.softmax(logits[0, len(ids) - 1].astype(jnp.float32)))
            order = np.argsort(-probs, kind="stable")[:top]
            return order, probs[order]

        before = distribution(plain_logits(tokens[:1]))
        after = distribution(steer_logits(tokens[:1], strengths))
        return Steered(default, changed, before, after)


def _differentiable_encode(sae: LoadedSAE, x: jax.Array) -> jax.Array:
    """sae.encode with XLA's ops in place of the CPU kernels (which have no derivative): [b, d_in] -> [b, d_sae]."""
    with kernels.use(False):
        arch, pre_bias = sae.saelens_architecture, bool(sae.cfg["apply_b_dec_to_input"])
        return saelens.encode(arch, sae.params, x, pre_bias, int(sae.cfg.get("k", 0)))


def _key(item: Intervention) -> tuple:
    """What the compiled function of an intervention depends on (its strength is an argument)."""
    where = None if item.positions is None else np.asarray(item.positions, bool).tobytes()
    if hasattr(item, "vector"):
        return ("add", item.site, np.asarray(item.vector, np.float32).tobytes(), where)
    return ("feature", item.site, id(item.sae), item.feature, item.op, where)


def model_path(run: str | Path) -> Path:
    """The model directory an SAE run's store was cached from (its manifest's provenance)."""
    run = Path(run)
    cfg = load_sae(run / "sae").cfg
    data = (cfg.get("metadata") or {}).get("config", {}).get("data") or {}
    hint = "give the model's directory with lm=LM_DIR"
    if not data.get("path"):
        raise DataError(f"run='{run}': its sae/cfg.json records no activation store to find the model by; {hint}")
    try:
        provenance = Store(data["path"]).provenance
    except DataError as err:
        raise DataError(f"run='{run}': its store could not be opened ({err}); {hint}") from None
    if provenance.get("source") != "hf" or not provenance.get("model"):
        raise DataError(f"run='{run}': its store '{data['path']}' was not cached from a model (source=hf); {hint}")
    path = Path(provenance["model"])
    if not (path / "config.json").is_file():
        raise DataError(f"run='{run}': the model its store came from, '{path}', is not there (no config.json); {hint}")
    return path


def open_probe(run: str | Path, lm: str | Path | None = None, n_ctx: int | None = None) -> Probe:
    """The probe of an SAE run (`sae-train` output) on its model (`lm`, or the one its store came from)."""
    run = Path(run)
    try:
        sae = load_sae(run / "sae")
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"run='{run}': not a sae-train output directory ({err})") from None
    path = Path(lm) if lm else model_path(run)
    if not (path / "config.json").is_file():
        raise DataError(f"lm='{path}': not a model directory (no config.json)")
    model, tokenizer = load(path)
    site = (sae.cfg.get("metadata") or {}).get("hook_name")
    if not site:
        raise DataError(f"run='{run}': its sae/cfg.json records no hook_name (the site it was trained on)")
    return Probe(model, tokenizer, sae, site, n_ctx)
