"""What the engine expects of a method (docs/methods/engine.md, "The training loop").

A method owns its modules (the segmentation model plus any discriminator, head or EMA teacher),
says which parameters each optimizer trains, and implements one training step: it computes its
losses on a batch, calls ``backward`` itself (adversarial methods need several backward passes
in a fixed order) and returns the named loss values.  The engine owns everything else: zeroing
and stepping the optimizers, schedules, devices, precision, the NaN guard, checkpoints, logging.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import lib.methods
from lib.errors import ConfigError
from lib.losses.adversarial import frozen
from lib.losses.segmentation import cross_entropy
from lib.models.output import SegOutput

if TYPE_CHECKING:
    from lib.stylize.transfer import Transfer

Batch = dict[str, dict]   # stream name ("source", "target", ...) -> collated batch on the device


@dataclass
class ParamGroup:
    """Parameters a method hands to one optimizer; ``head`` groups get ``head_lr_mult`` x lr."""

    params: list[nn.Parameter]
    head: bool = False


@dataclass
class StageContext:
    """What a training stage hands a method besides its model and params.

    - ``num_classes``: of the source's class set;
    - ``teacher``: for a method that ``needs_teacher``, the labeller of the row's pseudo-label set
      (eval mode, frozen), else None;
    - ``pseudo``: the row's pseudo-label set (lib.pseudo.artifact.PseudoLabels: its meta, and for
      the soft form the class prototypes and prior), or None;
    - ``normalize``: the (mean, std) the stage's images were normalised with (strong views undo it);
    - ``start``: what the row's ``from`` is: ``scratch``, imported ``weights`` or a trained ``model``
      (its weights are already in the model the method gets);
    - ``source_frames``: ``(count, seed) -> iterator`` of that many distinct source training frames
      drawn with ``seed``, whole and normalised, each (1, 3, H, W) (RobustNet ISW's statistics);
    - ``seed``: the recipe's training seed.
    """

    num_classes: int
    teacher: nn.Module | None = None
    pseudo: Any = None
    normalize: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    start: str = "scratch"
    source_frames: Any = None
    seed: int = 0


class Method:
    #: streams the step reads, e.g. ("source",) or ("source", "target")
    streams: tuple[str, ...] = ("source",)
    #: the dataclass of the method's own params (``recipes.<method>.method``)
    params_type: type

    #: the stage must give this method a teacher model / a pseudo-label artifact
    needs_teacher: bool = False
    needs_pseudo: bool = False

    def __init__(self, model: nn.Module, params):
        self.model = model
        self.params = params

    @classmethod
    def build(cls, model: nn.Module, params, context: StageContext) -> "Method":
        """The engine's constructor; methods that need the context (teacher, pseudo-labels) override it."""
        return cls(model, params)

    def modules(self) -> dict[str, nn.Module]:
        """Everything with state: moved to the device, checkpointed, put in train mode."""
        return {"model": self.model}

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Fixed networks the step reads (a distillation teacher): moved to the device, kept in eval
        mode with gradients off, never checkpointed (they are an input artifact of the stage)."""
        return {}

    def param_groups(self) -> dict[str, list[ParamGroup]]:
        """Optimizer name -> its parameter groups; each name needs an ``optim.<name>`` entry."""
        return {"model": [ParamGroup(self.model.backbone_parameters()),
                          ParamGroup(self.model.head_parameters(), head=True)]}

    def stream_stylization(self) -> Transfer | None:
        """A style transfer pairing the source and target streams (CISS, lib.data.paired): draw k of
        each then also holds ``image_stylized``, its full image restyled by the other's, cropped and
        flipped with it.  None (the default): independent plain streams."""
        return None

    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, it: int) -> None:
        """Called after the optimizers stepped (EMA teachers, queues)."""


class OutputSpaceMethod(Method):
    """Source supervision plus alignment of the target's output, in ADVENT's step order (the released code,
    valeoai/ADVENT).

    1. the discriminators are frozen;
    2. source: forward, L_seg = CE(main) + aux_weight * CE(aux), backward;
    3. target: forward, the generator's alignment terms (``target_losses``), backward;
    4. the discriminators are unfrozen and trained on detached source and target outputs
       (``discriminator_losses``), backward.
    The engine then steps every optimizer.  Each backward frees its graph before the next forward,
    as ADVENT does to fit a 720x1280 source and a 512x1024 target on one GPU.
    AdaptSegNet, AdvEnt, MinEnt and the Global-Local reconstruction fill in the two hooks.
    """

    streams = ("source", "target")

    @property
    def aux_weight(self) -> float:
        return self.params.aux_weight

    def discriminators(self) -> dict[str, nn.Module]:
        return {}

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, **self.discriminators()}

    def param_groups(self) -> dict[str, list[ParamGroup]]:
        groups = super().param_groups()
        if self.discriminators():
            groups["discriminator"] = [ParamGroup([p for d in self.discriminators().values()
                                                   for p in d.parameters()])]
        return groups

    def target_losses(self, target: SegOutput, size: tuple[int, int], it: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def discriminator_losses(self, source: SegOutput, source_label: torch.Tensor, target: SegOutput,
                             target_size: tuple[int, int], it: int) -> dict[str, torch.Tensor]:
        """Outputs are detached; the source size is the label's."""
        return {}

    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        xs, ys, xt = batch["source"]["image"], batch["source"]["label"], batch["target"]["image"]
        with frozen(self.discriminators().values()):
            source = self.model(xs)
            losses = {"seg": cross_entropy(source.logits, ys)}
            if source.aux_logits is not None and self.aux_weight > 0:
                losses["seg_aux"] = self.aux_weight * cross_entropy(source.aux_logits, ys)
            sum(losses.values()).backward()
            target = self.model(xt)
            aligned = self.target_losses(target, tuple(xt.shape[-2:]), it)
            if aligned:
                sum(aligned.values()).backward()
        source, target = source.detached(), target.detached()
        judged = self.discriminator_losses(source, ys, target, tuple(xt.shape[-2:]), it)
        if judged:
            sum(judged.values()).backward()
        return {name: value.detach() for name, value in {**losses, **aligned, **judged}.items()}


def available_methods() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(lib.methods.__path__) if not m.ispkg and m.name != "base")


def method_class(name: str) -> type[Method]:
    """The method of ``lib/methods/<name>.py`` (its module-level ``METHOD``).

    Methods are found by module name rather than through a registry file, and a recipe is named
    after its method, so a training stage depends on exactly the one method file it runs (dvc.yaml
    lists ``lib/methods/${item.recipe}.py``; method files import no other method file).
    """
    if name not in available_methods():
        raise ConfigError(f"params: recipe {name!r} names no method: a recipe is named after its method file "
                          f"lib/methods/<name>.py (known: {', '.join(available_methods())})")
    return importlib.import_module(f"lib.methods.{name}").METHOD
