"""A small transformer LM as an activation source: model (model.py), text and tokenizer (text.py),
`lm-train` (train.py), `sae-cache source=lm` (source.py) and loss recovered (splice.py).

Kept import-light (sae.config imports sae.lm.config): import the submodules themselves.
"""
