"""Helpers for the model tests: tiny random transformers checkpoints, a tokenizer for them, and every
site's activations read off transformers' own forward (hidden states and forward hooks) as the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "import numpy as np\nx = np.zeros(3)\n",
    "Sparse autoencoders find features in superposition.",
] * 8


def tiny_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most vocab_size tokens trained on TEXT."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(TEXT, trainer)
    return tok


def save_checkpoint(model: torch.nn.Module, path: Path, dtype=None, shard: bool = False) -> Path:
    """model.save_pretrained(path) (in `dtype`, sharded into small files when `shard`) + a tokenizer.json."""
    to_save = model if dtype is None else type(model)(model.config).to(dtype).eval()
    if dtype is not None:
        to_save.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    to_save.save_pretrained(path, max_shard_size="40KB" if shard else "10GB")
    tiny_tokenizer(min(model.config.vocab_size, 300)).save(str(path / "tokenizer.json"))
    return path


def module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


def hf_sites(
    model: torch.nn.Module, tokens: np.ndarray, spec: dict, n_layers: int, **kwargs
) -> tuple[np.ndarray, dict]:
    """(transformers' output [batch, seq, …], {site: activation}) for `tokens`.

    spec: {bare site name: (module path with {l}, "in" | "out")}: the site is that module's first input
    or its output (the first element of a tuple); "hidden" reads output_hidden_states[l] (block l's input).
    """
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name, (path, where) in spec.items():
        if where == "hidden":
            continue
        for layer in range(n_layers):
            site = f"blocks.{layer}.{name}"
            mod = module(model, path.format(l=layer))
            if where == "in":

                def pre(_m, args, kw, site=site):
                    got[site] = (args[0] if args else next(iter(kw.values()))).detach()

                handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(_m, _args, out, site=site):
                    got[site] = (out[0] if isinstance(out, tuple) else out).detach()

                handles.append(mod.register_forward_hook(post))
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), output_hidden_states=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    for name, (_, where) in spec.items():
        if where == "hidden":
            for layer in range(n_layers):
                got[f"blocks.{layer}.{name}"] = out.hidden_states[layer]
    main = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return main.float().numpy(), {k: v.float().numpy() for k, v in got.items()}


def assert_sites_match(ours: dict, theirs: dict, atol: float = 1e-4) -> None:
    """Every site transformers gave equals ours within atol (max abs difference)."""
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    for site, ref in theirs.items():
        diff = float(np.abs(np.asarray(ours[site], np.float32) - ref).max())
        assert diff <= atol, f"{site}: max |ours − transformers| = {diff:.3g} > {atol}"


def tiny_gpt2(path: Path, n_layer: int = 2, n_positions: int = 32, **config) -> Path:
    """A random GPT-2 (vocab 320, d_model 32, 4 heads; torch.manual_seed(0)) saved with a tokenizer at path."""
    import transformers

    torch.manual_seed(0)
    c = transformers.GPT2Config(vocab_size=320, n_positions=n_positions, n_embd=32, n_layer=n_layer, n_head=4, **config)
    return save_checkpoint(transformers.GPT2LMHeadModel(c).eval(), path)


def tiny_llama(n_positions: int = 32, **config) -> torch.nn.Module:
    """A random Llama with a BOS (vocab 320, d_model 32, 2 layers, GQA 4/2 heads; torch.manual_seed(0))."""
    import transformers

    torch.manual_seed(0)
    fields = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=n_positions,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **config})).eval()


def relu_sae(d_in: int = 32, d_sae: int = 64, seed: int = 1):
    """A random ReLU SAE (SAELens 'standard', no pre-bias) as `sae.export.load_sae` would give it."""
    import jax.numpy as jnp

    from sae.export import LoadedSAE

    rng = np.random.default_rng(seed)
    params = {
        "W_enc": jnp.asarray(rng.normal(0, 0.3, (d_in, d_sae)), jnp.float32),
        "b_enc": jnp.asarray(rng.normal(0, 0.1, d_sae), jnp.float32),
        "W_dec": jnp.asarray(rng.normal(0, 0.3, (d_sae, d_in)), jnp.float32),
        "b_dec": jnp.zeros(d_in, jnp.float32),
    }
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": False}
    return LoadedSAE("relu", params, cfg)
