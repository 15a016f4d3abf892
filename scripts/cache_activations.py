"""Write an activation store: `python scripts/cache_activations.py source=synthetic out=DIR ...` (= `sae-cache`)."""

from sae.cli import cache

if __name__ == "__main__":
    cache()
