"""Train a sparse autoencoder: `python scripts/train_sae.py sae=topk data=synthetic ...` (= `sae-train`)."""

from sae.cli import train

if __name__ == "__main__":
    train()
