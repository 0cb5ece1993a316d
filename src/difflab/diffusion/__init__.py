"""diffusion: see docs/architecture.md."""
