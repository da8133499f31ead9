"""CycleGAN image translation (Zhu et al., ICCV 2017): train G: source -> target and F: target -> source,
then write a translated copy of the source dataset.

With x a source and y a target image (both in [-1, 1]), D_target judging target images and D_source
source images, the generators minimise (LSGAN, least squares)

    L_G = (D_target(G(x)) - 1)^2 + (D_source(F(y)) - 1)^2                        adversarial
        + lambda_cycle * (|F(G(x)) - x|_1 + |G(F(y)) - y|_1)                      cycle consistency
        + lambda_cycle * lambda_identity * (|G(y) - y|_1 + |F(x) - x|_1)          identity
        [+ the semantic consistency of ``SemanticParams``]

with the discriminators frozen, then each discriminator minimises
1/2 [(D(real) - 1)^2 + D(fake)^2] on a fake drawn from a 50-image history (``ImagePool``).
The engine zeroes both optimizers before the step and steps both after it; since the fakes the
discriminators see are detached and no discriminator gradient exists during the generator backward,
this equals the reference's "step G, then step D".
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import nn

from lib.config import parse, positive
from lib.data.dataset import PreparedDataset
from lib.data.prepared import PREPARED_ROOT, require_prepared
from lib.data.streams import NORMALIZATION, DataParams, stream_seed, training_stream
from lib.device import select_device
from lib.errors import ConfigError
from lib.io import atomic_dir, write_json_atomic, write_rgb
from lib.losses.adversarial import frozen, gan_loss
from lib.methods.base import Batch, Method, ParamGroup
from lib.models.artifact import load_model
from lib.models.cyclegan import (
    CycleGANModelParams,
    build_discriminator,
    build_generator,
)
from lib.models.files import MODEL_FILE
from lib.stylize.cache import side_by_side
from lib.stylize.translate import (
    GENERATOR_KIND,
    TranslateParams,
    apply_full,
    metrics_dir,
    model_dir,
    to_pixels,
    to_symmetric,
)
from lib.train import distributed
from lib.train.checkpoint import fingerprint, publish_model, training_identity, training_lock
from lib.train.loop import TrainParams, seed_everything, train
from lib.train.optim import OptimizerParams, ScheduleParams

REAL, FAKE = 1.0, 0.0
SAMPLE_IMAGES = 4        # rows of the sample panels written after training
STATS_IMAGES = 32        # images per domain behind the appearance statistics written after training
MIN_CROP = 24
_POOL_STREAMS = {"source": 1, "target": 2}   # keep the two pools' random draws apart


# ---------------------------------------------------------------------------------------------
# params


@dataclass(frozen=True)
class SemanticParams:
    """Semantic consistency through a frozen segmentation model S (a ``data/models/<model>`` folder).

    - ``bdl`` (BDL's CycleGAN, the translated GTA5 that BAFFT trains on): with IN the instance
      normalisation of the logit maps and mse the mean squared difference,
      translation_weight * [mse(IN S(G(x)), IN S(x)) + mse(IN S(F(y)), IN S(y))]
      + lambda_cycle * reconstruction_weight * [mse(IN S(F(G(x))), IN S(x)) + mse(IN S(G(F(y))), IN S(y))].
    - ``cycada`` (CyCADA's semantic consistency): translation_weight *
      [CE(S(G(x)), argmax S(x)) + CE(S(F(y)), argmax S(y))]; it has no reconstruction term.
    """

    model: str
    form: Literal["bdl", "cycada"] = "bdl"
    translation_weight: float = 0.1       # BDL 0.1
    reconstruction_weight: float = 1.0    # BDL lambda_sem

    def validate(self, where: str) -> None:
        positive(self.translation_weight, f"{where}.translation_weight", allow_zero=True)
        positive(self.reconstruction_weight, f"{where}.reconstruction_weight", allow_zero=True)
        if self.form == "cycada" and self.reconstruction_weight != 0:
            raise ConfigError(f"params: {where}.form 'cycada' has no reconstruction term; "
                              f"set {where}.reconstruction_weight to 0")


@dataclass(frozen=True)
class CycleGANParams:
    lambda_cycle: float = 10.0        # lambda_A = lambda_B
    lambda_identity: float = 0.5      # relative to lambda_cycle, as in the reference
    pool_size: int = 50               # history of fakes shown to the discriminators; 0 = none
    semantic: SemanticParams | None = None

    def validate(self, where: str) -> None:
        positive(self.lambda_cycle, f"{where}.lambda_cycle", allow_zero=True)
        positive(self.lambda_identity, f"{where}.lambda_identity", allow_zero=True)
        positive(self.pool_size, f"{where}.pool_size", allow_zero=True)


@dataclass(frozen=True)
class CycleGANStageParams:
    """The ``cyclegan`` section of params.yaml."""

    source: str
    target: str
    data: DataParams
    optim: dict[str, OptimizerParams]
    train: TrainParams
    model: CycleGANModelParams = CycleGANModelParams()
    cyclegan: CycleGANParams = CycleGANParams()
    schedule: ScheduleParams = ScheduleParams(power=1.0)
    translate: TranslateParams = TranslateParams()
    outputs: tuple[str, ...] = ()     # one cyclegan_train@ / translate@ pair per name

    def validate(self, where: str) -> None:
        # the generator maps multiples of 4 to themselves; the PatchGAN needs >= 2x2 maps before its last layer
        if any(side % 4 or side < MIN_CROP for side in self.data.crop):
            raise ConfigError(f"params: {where}.data.crop must be multiples of 4 and at least {MIN_CROP}, "
                              f"got {list(self.data.crop)}")


# Keys that do not change the trained networks: they stay out of the training fingerprint.
NOT_TRAINING_KEYS = ("outputs", "translate")


def parse_params(raw: Any) -> CycleGANStageParams:
    if not isinstance(raw, dict):
        raise ConfigError("params: cyclegan must be a mapping")
    return parse(CycleGANStageParams, raw, "cyclegan")


# ---------------------------------------------------------------------------------------------
# the method


class ImagePool(nn.Module):
    """The discriminators' history of generated images (Shrivastava et al.; CycleGAN's pool of 50).

    Until ``size`` fakes are stored, each fake is stored and returned.  Afterwards, with
    probability 1/2 a random stored fake is returned and the new one takes its place, else the new
    one is returned.  The stored images and the number of queries are buffers, so they travel
    with the checkpoint; query q draws from ``default_rng([seed, stream, q])``, so a resumed run
    draws exactly what an uninterrupted one does.
    """

    def __init__(self, size: int, seed: int, stream: int = 0):
        super().__init__()
        self.size, self.seed, self.stream = size, seed, stream
        self.register_buffer("images", torch.empty(0))       # (size, C, H, W) after the first query
        self.register_buffer("stored", torch.zeros((), dtype=torch.long))
        self.register_buffer("queries", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, fakes: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return fakes
        rng = np.random.default_rng([self.seed, self.stream, int(self.queries)])
        self.queries += 1
        if self.images.numel() == 0:
            self.images = fakes.new_zeros((self.size, *fakes.shape[1:]))
        if self.images.shape[1:] != fakes.shape[1:]:
            raise ValueError(f"image pool holds {tuple(self.images.shape[1:])} images, got {tuple(fakes.shape[1:])}")
        returned = []
        for fake in fakes:
            stored = int(self.stored)
            if stored < self.size:
                self.images[stored] = fake
                self.stored += 1
                returned.append(fake)
            elif rng.random() < 0.5:
                k = int(rng.integers(self.size))
                returned.append(self.images[k].clone())
                self.images[k] = fake
            else:
                returned.append(fake)
        return torch.stack(returned)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "images")
        if saved is not None and saved.shape != self.images.shape:   # a filled pool into a fresh one
            self.images = torch.empty_like(saved, device=self.images.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FrozenSegmenter(nn.Module):
    """A trained segmentation model seen from CycleGAN's side: [-1, 1] images in, logits out.

    Its weights never train and it stays in eval mode (BatchNorm uses its running statistics).
    """

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(((images + 1) / 2 - self.mean) / self.std).logits


def _in_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BDL's semantic distance: mean squared difference of instance-normalised logit maps."""
    return Fn.mse_loss(Fn.instance_norm(a.float()), Fn.instance_norm(b.float()))


class CycleGAN(Method):
    streams = ("source", "target")
    params_type = CycleGANParams

    def __init__(self, nets: CycleGANModelParams, params: CycleGANParams, seed: int = 0,
                 segmenter: FrozenSegmenter | None = None):
        if (params.semantic is None) != (segmenter is None):
            raise ValueError("a frozen segmenter is needed exactly when params.semantic is set")
        self.params = params
        self.G, self.F = build_generator(nets), build_generator(nets)       # source -> target, target -> source
        self.D_target, self.D_source = build_discriminator(nets), build_discriminator(nets)
        self.pool_target = ImagePool(params.pool_size, seed, stream=_POOL_STREAMS["target"])
        self.pool_source = ImagePool(params.pool_size, seed, stream=_POOL_STREAMS["source"])
        self.segmenter = segmenter
        self.model = self.G   # the artifact a cyclegan stage hands downstream

    def modules(self) -> dict[str, nn.Module]:
        return {"G": self.G, "F": self.F, "D_target": self.D_target, "D_source": self.D_source,
                "pool_target": self.pool_target, "pool_source": self.pool_source}

    def param_groups(self) -> dict[str, list[ParamGroup]]:
        return {"generators": [ParamGroup([*self.G.parameters(), *self.F.parameters()])],
                "discriminators": [ParamGroup([*self.D_target.parameters(), *self.D_source.parameters()])]}

    def training_step(self, batch: Batch, it: int) -> dict[str, torch.Tensor]:
        x, y = batch["source"]["image"], batch["target"]["image"]
        with frozen([self.D_target, self.D_source]):
            losses, fake_y, fake_x = self.generator_losses(x, y)
            sum(losses.values()).backward()
        judged = self.discriminator_losses(x, y, self.pool_target(fake_y.detach()), self.pool_source(fake_x.detach()))
        sum(judged.values()).backward()
        return {name: value.detach() for name, value in {**losses, **judged}.items()}

    def generator_losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(the terms of L_G, G(x), F(y))."""
        p = self.params
        fake_y, fake_x = self.G(x), self.F(y)
        rec_x, rec_y = self.F(fake_y), self.G(fake_x)
        losses = {"G_adv": gan_loss(self.D_target(fake_y), REAL, "ls"),
                  "F_adv": gan_loss(self.D_source(fake_x), REAL, "ls"),
                  "cycle_source": p.lambda_cycle * Fn.l1_loss(rec_x, x),
                  "cycle_target": p.lambda_cycle * Fn.l1_loss(rec_y, y)}
        if p.lambda_identity > 0:
            weight = p.lambda_cycle * p.lambda_identity
            losses["identity_target"] = weight * Fn.l1_loss(self.G(y), y)
            losses["identity_source"] = weight * Fn.l1_loss(self.F(x), x)
        if p.semantic is not None:
            losses.update(self.semantic_losses(x, y, fake_y, fake_x, rec_x, rec_y))
        return losses, fake_y, fake_x

    def discriminator_losses(self, x: torch.Tensor, y: torch.Tensor, fake_y: torch.Tensor,
                             fake_x: torch.Tensor) -> dict[str, torch.Tensor]:
        """1/2 [(D(real) - 1)^2 + D(fake)^2] for both discriminators; the fakes come detached (from the pools)."""
        return {"D_target": 0.5 * (gan_loss(self.D_target(y), REAL, "ls") + gan_loss(self.D_target(fake_y), FAKE, "ls")),
                "D_source": 0.5 * (gan_loss(self.D_source(x), REAL, "ls") + gan_loss(self.D_source(fake_x), FAKE, "ls"))}

    def semantic_losses(self, x, y, fake_y, fake_x, rec_x, rec_y) -> dict[str, torch.Tensor]:
        sem, S = self.params.semantic, self.segmenter
        with torch.no_grad():
            s_x, s_y = S(x), S(y)
        if sem.form == "cycada":
            return {"semantic": sem.translation_weight * (Fn.cross_entropy(S(fake_y).float(), s_x.argmax(1))
                                                          + Fn.cross_entropy(S(fake_x).float(), s_y.argmax(1)))}
        losses = {"semantic": sem.translation_weight * (_in_mse(S(fake_y), s_x) + _in_mse(S(fake_x), s_y))}
        if sem.reconstruction_weight > 0:
            weight = self.params.lambda_cycle * sem.reconstruction_weight
            losses["semantic_cycle"] = weight * (_in_mse(S(rec_x), s_x) + _in_mse(S(rec_y), s_y))
        return losses


# ---------------------------------------------------------------------------------------------
# the stages


def run_cyclegan_training(name: str, raw: Any) -> Path:
    """Train a CycleGAN on the ``cyclegan`` section and write data/models/cyclegan_<name>/ (G only)."""
    params = parse_params(raw)
    for dataset in (params.source, params.target):
        require_prepared(dataset)
    stage = f"cyclegan_{name}"
    training_raw = {k: v for k, v in raw.items() if k not in NOT_TRAINING_KEYS}
    identity: dict = {"params": training_identity(training_raw, params.data, params.train)}
    distributed.start(params.train, "cyclegan")   # under torchrun from here on when processes > 1
    segmenter = None
    if params.cyclegan.semantic is not None:
        segmenter, identity["segmenter"] = load_segmenter(params.cyclegan.semantic.model)

    seed_everything(params.train.seed)
    method = CycleGAN(params.model, params.cyclegan, params.train.seed, segmenter)
    streams = {s: training_stream(dataset, params.data, "symmetric", stream_seed(params.train.seed, s), labelled=False)
               for s, dataset in (("source", params.source), ("target", params.target))}
    checkpoint_dir = Path("data/checkpoints") / stage
    out = model_dir(name)
    with training_lock(checkpoint_dir, f"cyclegan_train@{name}") if distributed.is_main() else contextlib.nullcontext():
        train(method, streams, params.train, params.optim, params.schedule, checkpoint_dir=checkpoint_dir,
              live_dir=None, fingerprint=fingerprint(identity, [params.source, params.target]), desc=stage)
        if not distributed.is_main():
            return out
        write_samples(method, params, metrics_dir(name))
        mean, std = NORMALIZATION["symmetric"]
        meta = {"kind": GENERATOR_KIND, "stage": f"cyclegan_train@{name}", "direction": "source -> target",
                "source": params.source, "target": params.target, "model": dataclasses.asdict(params.model),
                "normalize": {"mean": list(mean), "std": list(std)}, "scale_width": params.data.scale_width,
                "params": training_raw, "world_size": distributed.world_size()}
        publish_model(out, method.G, meta, checkpoint_dir, params.train.iters, curves=metrics_dir(name) / "train")
    return out


def load_segmenter(model: str) -> tuple[FrozenSegmenter, str]:
    """(the frozen segmenter of data/models/<model>, the hash of its weights file for the fingerprint)."""
    folder = Path("data/models") / model
    segmenter, meta = load_model(folder, select_device())
    digest = hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest()
    return FrozenSegmenter(segmenter, meta["normalize"]["mean"], meta["normalize"]["std"]).to(select_device()), digest


def _first_images(dataset: str, split: str, n: int) -> torch.Tensor:
    """The first ``n`` images of a split as [-1, 1] tensors (one size: the first image's)."""
    data = PreparedDataset(PREPARED_ROOT / dataset, split, transforms=None, seed=0)
    images = [torch.from_numpy(data.load(i)["image"]).permute(2, 0, 1) for i in range(min(n, len(data)))]
    size = images[0].shape
    return to_symmetric(torch.stack([im for im in images if im.shape == size]))


def _uint8_rows(*columns: torch.Tensor) -> np.ndarray:
    """[-1, 1] batches -> one (H, W, 3) uint8 panel, a row per image, ``columns`` side by side."""
    to_np = [to_pixels(c).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy() for c in columns]
    rows = [side_by_side(*parts) for parts in zip(*to_np)]
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([part for row in rows for part in (row, gap)][:-1])


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def appearance_stats(images: torch.Tensor) -> dict:
    """What sets the domains apart, measured on [-1, 1] images in 0..255 units: the per-channel
    (R, G, B) mean, contrast (per-image standard deviation, averaged over images), saturation
    ((max - min) / max over the channels, 0..1) and detail (mean absolute Laplacian of the grey
    image: texture and noise raise it, blur lowers it)."""
    pixels = to_pixels(images.clamp(-1, 1)).float()
    brightest, darkest = pixels.max(1).values, pixels.min(1).values
    detail = Fn.conv2d(pixels.mean(1, keepdim=True), LAPLACIAN.to(pixels.device)).abs().mean()
    stats = {"mean": pixels.mean((0, 2, 3)).tolist(), "contrast": pixels.flatten(2).std(2).mean(0).tolist(),
             "saturation": ((brightest - darkest) / brightest.clamp(min=1.0)).mean().item(), "detail": detail.item()}
    return {k: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 3) for k, v in stats.items()}


def appearance_gap(stats: dict, reference: dict) -> dict:
    """|stats - reference| per statistic (averaged over channels)."""
    return {k: round(float(np.abs(np.subtract(stats[k], reference[k])).mean()), 3) for k in stats}


@torch.no_grad()
def write_samples(method: CycleGAN, params: CycleGANStageParams, out: Path) -> dict:
    """After training: panels (``samples/source.png``: x | G(x) | F(G(x)); ``samples/target.png``:
    y | F(y) | G(F(y))) and the appearance statistics of x, G(x) and y with their distances to the
    target's (``appearance.json``: how far the translation moved the source toward the target)."""
    device = next(method.G.parameters()).device
    scale = params.data.scale_width
    G, F = method.G.eval(), method.F.eval()
    x = _first_images(params.source, params.data.split, STATS_IMAGES).to(device)
    y = _first_images(params.target, params.data.split, STATS_IMAGES).to(device)
    fake_y = torch.cat([apply_full(G, chunk, scale) for chunk in x.split(8)])
    fake_x = apply_full(F, y[:SAMPLE_IMAGES], scale)
    with atomic_dir(out / "samples") as tmp:
        write_rgb(tmp / "source.png", _uint8_rows(x[:SAMPLE_IMAGES], fake_y[:SAMPLE_IMAGES],
                                                  apply_full(F, fake_y[:SAMPLE_IMAGES], scale)))
        write_rgb(tmp / "target.png", _uint8_rows(y[:SAMPLE_IMAGES], fake_x, apply_full(G, fake_x, scale)))
    stats = {"source": appearance_stats(x), "translated": appearance_stats(fake_y), "target": appearance_stats(y)}
    stats["gap_to_target"] = {name: appearance_gap(stats[name], stats["target"]) for name in ("source", "translated")}
    write_json_atomic(out / "appearance.json", stats)
    return stats


