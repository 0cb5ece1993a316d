"""Rectified-flow tools that need a trained run: reflow pairs (pairs.py), the reflow run's
config (reflow.py) and straightness (straightness.py; Liu et al. 2023)."""
