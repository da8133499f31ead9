"""The ``evaluate`` section and the inference protocol evaluation and pseudo-labelling share (no torch:
the summary stage reads them too)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lib.config import positive, positive_pair
from lib.errors import ConfigError

EVAL_ROOT = Path("metrics/eval")      # metrics/eval/<model>/<target>.json and <target>/


@dataclass(frozen=True)
class InferenceParams:
    mode: Literal["whole", "slide"] = "whole"
    input_size: tuple[int, int] | None = None     # (h, w) the image is resized to; null = as stored
    resize: Literal["bilinear", "bicubic"] = "bilinear"   # that resize (ADVENT, BAFFT: PIL bicubic)
    window: tuple[int, int] | None = None         # slide only: (h, w) window
    stride: tuple[int, int] | None = None         # slide only: (h, w) step
    flip: bool = False                            # average with the mirrored prediction
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: autocast where native (lib.device)
    channels_last: bool = False                   # the model's memory layout for the forward (speed only)

    def validate(self, where: str) -> None:
        if self.mode == "slide" and (self.window is None or self.stride is None):
            raise ConfigError(f"params: {where}.mode 'slide' needs {where}.window and {where}.stride")
        for name in ("input_size", "window", "stride"):
            positive_pair(getattr(self, name), f"{where}.{name}")


@dataclass(frozen=True)
class EvaluateParams:
    models: dict[str, Any] = dataclasses.field(default_factory=dict)
    # every row of models, selftrained and ensembles (a YAML merge of those tables: nothing to keep in sync)
    targets: list[str] = dataclasses.field(default_factory=list)   # prepared datasets to score every model on
    split: str = "val"
    inference: InferenceParams = InferenceParams()
    batch_size: int = 8               # images per forward; mixed image sizes fall back to 1
    workers: int = 2
    panels: int = 4                   # image | label | prediction panels saved per evaluation
    averages: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # name -> targets: the summary adds each model's mean mIoU over them (BlindNet's unseen C/B/M)

    def validate(self, where: str) -> None:
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"params: {where}.targets must list distinct prepared datasets, got {self.targets}")
        for name, targets in self.averages.items():
            if not targets or len(set(targets)) != len(targets):
                raise ConfigError(f"params: {where}.averages.{name} must list distinct targets, got {targets}")
            missing = [t for t in targets if t not in self.targets]
            if missing:
                raise ConfigError(f"params: {where}.averages.{name}: {', '.join(missing)} not in {where}.targets "
                                  "(only evaluated targets can be averaged)")
        positive(self.batch_size, f"{where}.batch_size")
        positive(self.workers, f"{where}.workers", allow_zero=True)
        positive(self.panels, f"{where}.panels", allow_zero=True)
