"""Translation with a trained CycleGAN generator: ``translate@<name>`` renders the source with
data/models/cyclegan_<name> (lib.stylize.cyclegan trains it) into data/prepared/<name>, a prepared
dataset with the translated images and the source's labels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import nn

from lib.config import parse, positive
from lib.data.prepared import PREPARED_ROOT, require_prepared
from lib.device import select_device
from lib.errors import ConfigError, DataError
from lib.models.artifact import load_weights
from lib.models.cyclegan import CycleGANModelParams, build_generator
from lib.models.files import MODEL_FILE, load_checked
from lib.stylize.cache import write_prepared_copy

GENERATOR_KIND = "cyclegan_generator"


@dataclass(frozen=True)
class TranslateParams:
    splits: tuple[str, ...] = ("train",)   # source splits written to the translated copy
    batch_size: int = 8
    workers: int = 2

    def validate(self, where: str) -> None:
        positive(self.batch_size, f"{where}.batch_size")
        positive(self.workers, f"{where}.workers", allow_zero=True)
        if not self.splits:
            raise ConfigError(f"params: {where}.splits must name at least one split")


def to_symmetric(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) images -> [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> float 0..255."""
    return (images + 1.0) * 127.5


def apply_full(generator: nn.Module, images: torch.Tensor, scale_width: int | None = None) -> torch.Tensor:
    """The generator on whole [-1, 1] images of any size.

    With ``scale_width`` (the training's ``data.scale_width``) the images are translated at the
    scale the generator was trained at (bilinearly resized to that width, as training resized
    them) and resized back, so the output always has the input's size.  The generator's input is
    reflection-padded at the bottom and right to a multiple of 4 (its two stride-2 stages) and
    cropped back after.
    """
    height, width = images.shape[-2:]
    if scale_width is not None and scale_width != width:
        scaled = Fn.interpolate(images, size=(max(1, round(height * scale_width / width)), scale_width),
                                mode="bilinear", align_corners=False)
        translated = apply_full(generator, scaled)
        return Fn.interpolate(translated, size=(height, width), mode="bilinear", align_corners=False).clamp(-1, 1)
    padded = Fn.pad(images, (0, -width % 4, 0, -height % 4), mode="reflect")
    return generator(padded)[..., :height, :width]


def model_dir(name: str) -> Path:
    return Path("data/models") / f"cyclegan_{name}"


def metrics_dir(name: str) -> Path:
    return Path("metrics") / f"cyclegan_{name}"


def load_generator(directory: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(G in eval mode on ``device``, meta) from a data/models/cyclegan_<name> folder."""
    path = Path(directory) / MODEL_FILE
    payload = load_checked(path, "CycleGAN generator")
    meta = payload.get("meta", {})
    if meta.get("kind") != GENERATOR_KIND or "state_dict" not in payload:
        raise DataError(f"{path}: not a CycleGAN generator of this pipeline (run cyclegan_train first)")
    generator = build_generator(parse(CycleGANModelParams, meta["model"], f"{path}:model"))
    load_weights(generator, payload["state_dict"], path, "the generator its meta describes")
    return generator.to(device).eval(), meta


def translate(name: str, raw: Any) -> dict:
    """Write data/prepared/<name>: the ``translate.splits`` of the source rendered by G, labels shared."""
    if not isinstance(raw, dict):
        raise ConfigError("params: cyclegan must be a mapping")
    source = raw.get("source")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"params: cyclegan.source must name the prepared dataset to translate, got {source!r}")
    params = parse(TranslateParams, raw.get("translate") or {}, "cyclegan.translate")
    require_prepared(source)
    device = select_device()
    generator, meta = load_generator(model_dir(name), device)
    if meta["source"] != source:
        raise ConfigError(f"params: cyclegan.source is {source!r} but {model_dir(name)} was trained "
                          f"on {meta['source']!r} (re-run cyclegan_train@{name})")

    def render(images: torch.Tensor, ids: list[str]) -> torch.Tensor:
        return to_pixels(apply_full(generator, to_symmetric(images), meta["scale_width"]))

    stylization = {"method": "cyclegan", "model": str(model_dir(name)), "target": meta["target"],
                   "model_params": meta["model"], "scale_width": meta["scale_width"]}
    return write_prepared_copy(PREPARED_ROOT / source, PREPARED_ROOT / name, render,
                               splits=list(params.splits), batch_size=params.batch_size,
                               device=device, desc=f"translate@{name}", meta=stylization,
                               workers=params.workers, examples=metrics_dir(name) / "examples")
