"""Probing and steering, for every model family: interventions at a model's sites (interventions.py),
directions from contrast and monitoring (directions.py), the probe's operations on a model and an SAE
(probe.py) and its loopback app (app.py, `sae-probe`), steering sweeps (sweep.py) and `sae-steer` (cli.py)."""
