"""Training loop, optimisation, checkpoints, inference and evaluation."""
