"""Reproduce a toy-models experiment: `python scripts/train_toy.py toy=basic ...` (= `toy-train`)."""

from sae.cli import toy_train

if __name__ == "__main__":
    toy_train()
