"""Training: the one loop, optimizers and schedules, resumable checkpoints, multi-process runs, and the set-up of a training stage from a row of the model table."""
