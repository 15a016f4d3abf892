"""Inspect a run's features: `python scripts/inspect_features.py run=OUT ...` (= `sae-inspect`)."""

from sae.cli import inspect

if __name__ == "__main__":
    inspect()
