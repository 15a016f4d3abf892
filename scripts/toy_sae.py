"""SAEs on a trained toy model's hidden activations: `python scripts/toy_sae.py data.run=OUT ...` (= `toy-sae`)."""

from sae.cli import toy_sae

if __name__ == "__main__":
    toy_sae()
