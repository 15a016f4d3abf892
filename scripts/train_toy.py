"""Reproduce a toy-models experiment: `python scripts/train_toy.py toy=basic ...` (= `toy-train`)."""

from toy_models.cli import train

if __name__ == "__main__":
    train()
