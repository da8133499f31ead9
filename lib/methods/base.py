"""What the engine expects of a method (DESIGN.md, "Method").

A method owns its modules (the segmentation model plus any discriminator, head or EMA teacher),
says which parameters each optimizer trains, and implements one training step: it computes its
losses on a batch, calls ``backward`` itself (adversarial methods need several backward passes
in a fixed order) and returns the named loss values.  The engine owns everything else: zeroing
and stepping the optimizers, schedules, devices, precision, the NaN guard, checkpoints, logging.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch
from torch import nn

import lib.methods
from lib.engine.optim import ParamGroup
from lib.errors import ConfigError

Batch = dict[str, dict]   # stream name ("source", "target", ...) -> collated batch on the device


class Method:
    #: streams the step reads, e.g. ("source",) or ("source", "target")
    streams: tuple[str, ...] = ("source",)
    #: the dataclass of the method's own params (its ``<stage>.<method name>`` section)
    params_type: type

    def __init__(self, model: nn.Module, params):
        self.model = model
        self.params = params

    def modules(self) -> dict[str, nn.Module]:
        """Everything with state: moved to the device, checkpointed, put in train mode."""
        return {"model": self.model}

    def param_groups(self) -> dict[str, list[ParamGroup]]:
        """Optimizer name -> its parameter groups; each name needs an ``optim.<name>`` entry."""
        return {"model": [ParamGroup(self.model.backbone_parameters()),
                          ParamGroup(self.model.head_parameters(), head=True)]}

    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, it: int) -> None:
        """Called after the optimizers stepped (EMA teachers, queues)."""


def available_methods() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(lib.methods.__path__) if m.name != "base")


def method_class(name: str) -> type[Method]:
    """The method of ``lib/methods/<name>.py`` (its module-level ``METHOD``).

    Methods are found by module name rather than through a registry file, so a training stage
    depends on exactly the one method file it runs (dvc.yaml lists ``lib/methods/${...method}.py``).
    """
    if name not in available_methods():
        raise ConfigError(f"params: method {name!r} does not exist (known: {', '.join(available_methods())})")
    return importlib.import_module(f"lib.methods.{name}").METHOD
