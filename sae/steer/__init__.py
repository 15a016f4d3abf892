"""Steering and probing: interventions at a model's sites (interventions.py), for every model family."""
