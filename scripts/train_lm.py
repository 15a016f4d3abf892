"""Train the small transformer LM: `python scripts/train_lm.py trainer.steps=1000 hydra.run.dir=DIR` (= `lm-train`)."""

from sae.cli import lm_train

if __name__ == "__main__":
    lm_train()
