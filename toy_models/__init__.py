"""Toy models of superposition (Elhage et al. 2022): models, data, training, analysis and figures.

Never imports `sae` (see ARCHITECTURE.md): `sae.data` may use a toy model as an activation source.
"""
