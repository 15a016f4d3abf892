"""Inspecting learned features: statistics, top-activating examples, plots and a static HTML browser.

from sae.inspect import inspect_run, load
insp = inspect_run("OUT")          # or load("OUT") after `sae-inspect run=OUT`
f = insp.feature(12)               # Feature: density, histogram, top / random Examples, neighbours
insp.plot_histogram(12)
insp.features_by_token("the"); insp.features_by_direction(v)
insp.summary_plots("figs")         # {"density": Path, "l0": Path, "recovery": Path (ground truth)}

Transcoders too: a per-layer one by its encoder on its input rows; a cross-layer one (RUN/sae in circuit-tracer's
layout) as L·F features numbered layer-major, each with its layer and `decoder_layer_norms` (dictionary.py).
"""

from sae.inspect.config import InspectConfig
from sae.inspect.report import Example, Feature, Inspection, load
from sae.inspect.run import inspect_run
from sae.inspect.site import write_site

__all__ = ["Example", "Feature", "InspectConfig", "Inspection", "inspect_run", "load", "write_site"]
