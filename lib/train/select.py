"""Checkpoint selection on a validation split, as the papers select.

Every published number of the recipes here is the best of periodic evaluations on the target's
validation set: ADVENT scans its snapshots every 2000 iterations (``TEST.MODE best``), BAFFT
evaluates every 5000 iterations and keeps ``BestGTA5.pth``, CPSL every 1000 and keeps ``best``
(S1 at 70k, S2 at 68k, S3 at 48k of 90k).  A recipe's ``select`` block does the same::

    select: {every: 1000, domain: target, split: val, images: 0, batch_size: 8,
             inference: {mode: whole, input_size: [512, 1024]}}

Every ``every`` iterations and at the last one the model is scored (mIoU, the evaluation's
protocol: lib.infer.evaluation) on the first ``images`` of the domain's split (0: all of it); the
best weights are kept beside the last (``data/models/<name>/best``, named ``<name>/best``
wherever the table names a model: lib.table) and both are evaluated.  The
selection uses the split the papers report on, so the best is optimistic; the last is the honest
number.  Ties keep the earlier iteration.

The scoring leaves the training untouched: the global RNG states are restored after it and every
module is put back in the mode it was in, so the last iterate is bit-identical with and without
selection, and a resumed run selects as an uninterrupted one (the state travels in the checkpoint).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lib.config import positive
from lib.infer.params import InferenceParams
from lib.train.checkpoint import evaluating, rng_state, set_rng_state


@dataclass(frozen=True)
class SelectParams:
    every: int = 0                                  # 0: no selection, the last iterate only
    domain: Literal["target", "source"] = "target"  # whose split scores the model
    split: str = "val"
    images: int = 0                                 # the first N images of the split; 0: all
    batch_size: int = 8
    workers: int = 0
    inference: InferenceParams = InferenceParams()

    def validate(self, where: str) -> None:
        positive(self.every, f"{where}.every", allow_zero=True)
        positive(self.images, f"{where}.images", allow_zero=True)
        positive(self.batch_size, f"{where}.batch_size")
        positive(self.workers, f"{where}.workers", allow_zero=True)

    @property
    def enabled(self) -> bool:
        return self.every > 0


class Selection:
    """The running best of ``score(model)`` (a mIoU, higher is better) over the training."""

    def __init__(self, params: SelectParams, model: nn.Module, score: Callable[[nn.Module], float], iters: int):
        self.params, self.model, self.score, self.iters = params, model, score, iters
        self.history: list[tuple[int, float]] = []
        self.best_iteration: int | None = None
        self.best_score = float("-inf")
        self.best_state: dict[str, torch.Tensor] | None = None

    def due(self, done: int) -> bool:
        return self.params.every > 0 and (done % self.params.every == 0 or done == self.iters)

    def evaluate(self, done: int) -> float:
        """Score the model after ``done`` iterations; keep its weights if they are the best so far."""
        rng = rng_state()
        try:
            with evaluating(self.model), torch.no_grad():
                value = float(self.score(self.model))
        finally:
            set_rng_state(rng)
        self.history.append((done, value))
        if value > self.best_score:
            self.best_iteration, self.best_score = done, value
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return value

    def summary(self) -> dict:
        """What the model artifacts record: the best iteration and score, every evaluation (an
        undefined score is null)."""
        return {"every": self.params.every, "domain": self.params.domain, "split": self.params.split,
                "images": self.params.images, "best_iteration": self.best_iteration,
                "best_mIoU": None if self.best_iteration is None else round(self.best_score, 4),
                "history": [[it, None if math.isnan(v) else round(v, 4)] for it, v in self.history]}

    def state_dict(self) -> dict:
        return {"history": list(self.history), "best_iteration": self.best_iteration,
                "best_score": self.best_score, "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state["history"]]
        self.best_iteration, self.best_score = state["best_iteration"], state["best_score"]
        self.best_state = copy.copy(state["best_state"])
