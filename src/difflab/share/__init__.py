"""Sharing a model outside difflab: diffusers folders (export and import), half-precision EMA
files, and the run's model card. `mapping` holds the layout correspondence with diffusers'
UNet2DModel that the benchmark also uses."""
