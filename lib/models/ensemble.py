"""A weighted ensemble of segmentation models as one artifact (ADVENT's AdvEnt + MinEnt, 45.5 on
GTA5 -> Cityscapes, sums the two models' upsampled logits 0.5 / 0.5: two trained models, not joint
training).

``ensemble@<name>`` writes ``data/models/<name>/model.pt`` with every member's state dict and meta
and the weights, so an ensemble is evaluated (and can label) like any model.  Inference
(lib.infer.inference) runs each member and sums its logits upsampled to the output size with its
weight, exactly as for separately listed members; the module's own forward does the same at the
input size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lib.errors import ConfigError
from lib.models.output import SegOutput, upsample

ENSEMBLE_KIND = "ensemble"


@dataclass(frozen=True)
class EnsembleParams:
    models: list[str]
    weights: list[float]

    def validate(self, where: str) -> None:
        # two members: dvc.yaml declares ${item.models[0]} and ${item.models[1]} as the stage's dependencies
        if len(self.models) != 2 or len(self.weights) != 2 or len(set(self.models)) != 2:
            raise ConfigError(f"params: {where} must name two distinct models and their two weights, "
                              f"got models {self.models} and weights {self.weights}")


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module], weights: list[float]):
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ValueError("an ensemble needs one weight per member and at least one member")
        self.members = nn.ModuleList(members)
        self.weights = [float(w) for w in weights]

    def pairs(self) -> list[tuple[nn.Module, float]]:
        return list(zip(self.members, self.weights))

    def forward(self, x: torch.Tensor) -> SegOutput:
        size = tuple(x.shape[-2:])
        total = sum(w * upsample(m(x).logits.float(), size) for m, w in self.pairs())
        return SegOutput(logits=total)
