"""Pseudo-labels: the sets a model writes for the target and the readers the self-training stages use."""
