"""Circuit tracing with transcoders (Ameisen et al. 2025): the local replacement model of a prompt
(replacement.py), its attribution graph (attribution.py), influence, pruning and scores (graph.py),
interventions (interventions.py), and the graph's files and viewer (files.py); `sae-attribute` (cli.py)."""

from sae.circuits.attribution import attribute
from sae.circuits.graph import Graph, Pruned, influence, normalize, prune, scores
from sae.circuits.interventions import generate, intervene
from sae.circuits.replacement import Replacement, replacement
from sae.circuits.transcoders import Transcoders, load_transcoders, random_transcoders

__all__ = [
    "Graph",
    "Pruned",
    "Replacement",
    "Transcoders",
    "attribute",
    "generate",
    "influence",
    "intervene",
    "load_transcoders",
    "normalize",
    "prune",
    "random_transcoders",
    "replacement",
    "scores",
]
