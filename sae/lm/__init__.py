"""The in-house LM: `lm-train` (train.py) trains a GPT-2-layout model (sae/models/gpt2.py) on text with no
downloads (text.py: the corpus and its byte-level BPE) and writes it as a Hugging Face gpt2 directory, which
`sae-cache source=hf` and every outside tool read like any other checkpoint.

Kept import-light (sae.config imports nothing here): import the submodules themselves.
"""
