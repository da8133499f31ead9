"""CycleGAN (Zhu et al., ICCV 2017): networks, image pool, the training step's losses and gradient isolation,
the schedule of the default params, exact resume, and the translate stage on a tiny prepared dataset."""
from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lib.config import load_params, parse
from lib.data.dataset import PreparedDataset
from lib.data.prepared import load_index
from lib.errors import ConfigError, DataError
from lib.io import read_rgb
from lib.losses.adversarial import frozen
from lib.methods.base import ParamGroup
from lib.models.cyclegan import (
    INIT_STD,
    CycleGANModelParams,
    PatchDiscriminator,
    ResnetGenerator,
    build_generator,
)
from lib.models.output import SegOutput
from lib.stylize.cyclegan import (
    CycleGAN,
    CycleGANParams,
    FrozenSegmenter,
    ImagePool,
    SemanticParams,
    _in_mse,
    appearance_gap,
    appearance_stats,
    parse_params,
    run_cyclegan_training,
)
from lib.stylize.translate import apply_full, load_generator, translate
from lib.train.checkpoint import STATE_FILE
from lib.train.loop import TrainParams, train
from lib.train.optim import (
    OptimizerParams,
    ScheduleParams,
    build_optimizer,
    build_scheduler,
)
from tests.test_dataset import write_prepared

ROOT = Path(__file__).resolve().parents[1]

TINY = CycleGANModelParams(ngf=4, ndf=4, n_blocks=1)
ADAM = OptimizerParams(type="adam", lr=2e-4, betas=(0.5, 0.999), weight_decay=0.0, head_lr_mult=1.0)


@pytest.fixture(autouse=True)
def one_thread():
    """The networks here are tiny: one thread is as fast, and never stalls in OpenMP barriers when
    other processes hold the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed: int, n: int = 2, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"source": {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1},
            "target": {"image": torch.rand(n, 3, size, size, generator=g) * 0.5 - 0.25}}


def stream(domain: str, seed: int):
    """Batch t depends only on (seed, t), like the real loaders."""
    def factory(start: int):
        for t in itertools.count(start):
            yield batch(seed * 1000 + t)[domain]
    return factory


# --- networks ------------------------------------------------------------------------------

def test_generator_keeps_the_size_and_range():
    generator = ResnetGenerator(ngf=4, n_blocks=2)
    out = generator(torch.randn(2, 3, 32, 48) * 3)
    assert out.shape == (2, 3, 32, 48)
    assert out.abs().max() <= 1.0


@pytest.mark.parametrize("size", [(30, 45), (17, 64), (32, 32)])
def test_full_images_of_any_size(size):
    generator = ResnetGenerator(ngf=4, n_blocks=1).eval()
    images = torch.rand(1, 3, *size) * 2 - 1
    assert apply_full(generator, images).shape == images.shape
    # at the training scale: resized to width 24 and back, still the input's size
    assert apply_full(generator, images, scale_width=24).shape == images.shape


def test_patch_discriminator_is_the_70x70_patchgan():
    disc = PatchDiscriminator(ndf=2)
    assert disc(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert disc(torch.randn(1, 3, 64, 96)).shape == (1, 1, 6, 10)
    field, jump = 1, 1
    for layer in disc.net:
        if isinstance(layer, nn.Conv2d):
            field += (layer.kernel_size[0] - 1) * jump
            jump *= layer.stride[0]
    assert field == 70
    channels = [m.out_channels for m in disc.net if isinstance(m, nn.Conv2d)]
    assert channels == [2, 4, 8, 16, 1]       # ndf * (1, 2, 4, 8), then one score


def test_reference_sizes():
    generator = build_generator(CycleGANModelParams())
    assert sum(p.numel() for p in generator.parameters()) == 11_378_179   # resnet_9blocks, ngf 64
    assert sum(p.numel() for p in PatchDiscriminator(64).parameters()) == 2_764_737


def test_init_statistics_and_instance_norm():
    generator, disc = ResnetGenerator(ngf=16, n_blocks=3), PatchDiscriminator(ndf=16)
    convs = [m for net in (generator, disc) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    weights = torch.cat([m.weight.detach().flatten() for m in convs])
    assert weights.std().item() == pytest.approx(INIT_STD, rel=0.02)
    assert abs(weights.mean().item()) < 1e-3
    assert all(m.bias is not None and torch.all(m.bias == 0) for m in convs)
    norms = [m for net in (generator, disc) for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(not m.affine and not m.track_running_stats for m in norms)


# --- image pool ----------------------------------------------------------------------------

def images(start: int, n: int) -> torch.Tensor:
    """Image k is filled with the value k, so returned images can be identified."""
    return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()


def ids(batch_images: torch.Tensor) -> list[int]:
    return batch_images[:, 0, 0, 0].long().tolist()


def test_pool_fills_first_then_swaps_half_of_the_time():
    pool = ImagePool(4, seed=0)
    assert ids(pool(images(0, 3))) == [0, 1, 2]
    assert ids(pool(images(3, 1))) == [3]                   # the pool is full now
    assert sorted(ids(pool.images)) == [0, 1, 2, 3]
    swaps, seen = 0, set(range(4))
    for k in range(4, 404):
        stored_before = set(ids(pool.images))
        (returned,) = ids(pool(images(k, 1)))
        stored_after = set(ids(pool.images))
        if returned == k:                                    # the new one passes, the pool is unchanged
            assert stored_after == stored_before
        else:                                                # an old one comes out, the new one takes its place
            swaps += 1
            assert returned in stored_before and stored_after == stored_before - {returned} | {k}
        seen.add(k)
    assert 160 < swaps < 240                                  # p = 1/2 over 400 queries


def test_pool_is_deterministic_and_resumable():
    a, b, c = ImagePool(3, seed=7), ImagePool(3, seed=7), ImagePool(3, seed=8)
    outs = {name: [ids(pool(images(k, 2))) for k in range(0, 40, 2)] for name, pool in (("a", a), ("b", b), ("c", c))}
    assert outs["a"] == outs["b"] and outs["a"] != outs["c"]
    resumed = ImagePool(3, seed=7)
    resumed.load_state_dict(copy.deepcopy(a.state_dict()))   # a filled pool into a fresh one
    assert [ids(a(images(k, 2))) for k in range(40, 60, 2)] == [ids(resumed(images(k, 2))) for k in range(40, 60, 2)]


def test_pool_of_size_zero_passes_the_fakes():
    fakes = images(0, 2)
    assert ImagePool(0, seed=0)(fakes) is fakes


# --- the training step ---------------------------------------------------------------------

def tiny_method(**params) -> CycleGAN:
    torch.manual_seed(0)
    return CycleGAN(TINY, CycleGANParams(**params))


def grads(modules) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for m in modules for p in m.parameters()]


def test_lsgan_targets():
    """A discriminator that scores every patch c: D loss 1/2 [(c - 1)^2 + c^2], fooling term (c - 1)^2."""
    method = tiny_method()
    c = 0.3
    for disc in (method.D_target, method.D_source):
        nn.init.zeros_(disc.net[-1].weight)
        nn.init.constant_(disc.net[-1].bias, c)
    b = batch(6)
    x, y = b["source"]["image"], b["target"]["image"]
    with torch.no_grad():
        losses, fake_y, fake_x = method.generator_losses(x, y)
        judged = method.discriminator_losses(x, y, fake_y, fake_x)
    assert losses["G_adv"].item() == pytest.approx((c - 1) ** 2) and losses["F_adv"].item() == pytest.approx((c - 1) ** 2)
    assert judged["D_target"].item() == pytest.approx(0.5 * ((c - 1) ** 2 + c ** 2))
    assert judged["D_source"].item() == pytest.approx(0.5 * ((c - 1) ** 2 + c ** 2))


def test_step_gradients_are_isolated():
    """In the step, G and F get exactly the generator loss's gradient and the discriminators exactly
    their own: nothing of L_G reaches a discriminator, nothing of L_D a generator."""
    method = tiny_method()
    b = batch(1)
    x, y = b["source"]["image"], b["target"]["image"]
    generators, discriminators = [method.G, method.F], [method.D_target, method.D_source]
    losses = method.training_step(b, 0)
    assert set(losses) == {"G_adv", "F_adv", "cycle_source", "cycle_target", "identity_target", "identity_source",
                           "D_target", "D_source"}
    assert all(not v.requires_grad for v in losses.values())
    step_g, step_d = grads(generators), grads(discriminators)

    for p in itertools.chain(*(m.parameters() for m in generators + discriminators)):
        p.grad = None
    alone, fake_y, fake_x = method.generator_losses(x, y)
    sum(alone.values()).backward()
    assert all(g is not None for g in grads(generators))
    expected_g = grads(generators)
    for p in itertools.chain(*(m.parameters() for m in discriminators)):
        p.grad = None
    # the pools were filling during the step, so they returned the fakes themselves
    sum(method.discriminator_losses(x, y, fake_y.detach(), fake_x.detach()).values()).backward()
    expected_d = grads(discriminators)

    assert all(torch.allclose(a, b) for a, b in zip(step_g, expected_g))
    assert all(g is not None for g in step_d) and all(torch.allclose(a, b) for a, b in zip(step_d, expected_d))
    assert all(p.requires_grad for m in discriminators for p in m.parameters())   # unfrozen again


def test_generator_backward_gives_no_gradient_to_the_discriminators():
    method = tiny_method()
    b = batch(2)
    with frozen([method.D_target, method.D_source]):
        losses, _, _ = method.generator_losses(b["source"]["image"], b["target"]["image"])
        sum(losses.values()).backward()
    assert all(p.grad is None for m in (method.D_target, method.D_source) for p in m.parameters())
    assert all(p.grad is not None for m in (method.G, method.F) for p in m.parameters())


def test_one_engine_step_lowers_both_losses(tmp_path):
    """One iteration of the engine's loop (Adam 2e-4): the generators' loss against the old
    discriminators and the discriminators' loss on the old fakes both go down."""
    method = tiny_method(pool_size=0)
    before = copy.deepcopy(method)
    b = next(iter(zip(stream("source", 3)(0), stream("target", 3)(0))))
    x, y = b[0]["image"], b[1]["image"]
    train(method, {"source": stream("source", 3), "target": stream("target", 3)}, TrainParams(iters=1, log_every=1),
          {"generators": ADAM, "discriminators": ADAM}, ScheduleParams(power=1.0), tmp_path / "c", tmp_path / "l", "f")

    with torch.no_grad():
        old_g, fake_y, fake_x = before.generator_losses(x, y)
        after = copy.deepcopy(before)
        after.G.load_state_dict(method.G.state_dict())
        after.F.load_state_dict(method.F.state_dict())
        new_g, _, _ = after.generator_losses(x, y)                 # new generators, old discriminators
        old_d = before.discriminator_losses(x, y, fake_y, fake_x)
        after = copy.deepcopy(before)
        after.D_target.load_state_dict(method.D_target.state_dict())
        after.D_source.load_state_dict(method.D_source.state_dict())
        new_d = after.discriminator_losses(x, y, fake_y, fake_x)   # new discriminators, old fakes
    assert sum(new_g.values()) < sum(old_g.values())
    assert sum(new_d.values()) < sum(old_d.values())


def test_identity_terms_are_off_with_lambda_zero():
    method = tiny_method(lambda_identity=0.0)
    b = batch(4)
    losses, _, _ = method.generator_losses(b["source"]["image"], b["target"]["image"])
    assert "identity_target" not in losses and "identity_source" not in losses


def test_resume_is_exact_pools_included(tmp_path):
    """Killed at iteration 3 (checkpoint at 2), resumed to 5: the same weights and pools as a straight run."""
    def run(folder, method_cls=CycleGAN):
        torch.manual_seed(0)
        method = method_cls(TINY, CycleGANParams(pool_size=3), seed=5)
        train(method, {"source": stream("source", 1), "target": stream("target", 1)},
              TrainParams(iters=5, checkpoint_every=2, log_every=1), {"generators": ADAM, "discriminators": ADAM},
              ScheduleParams(power=1.0, constant_iters=2), folder / "ckpt", folder / "live", "f")
        return method

    class Crash(CycleGAN):
        def training_step(self, b, it):
            if it == 3:
                raise KeyboardInterrupt
            return super().training_step(b, it)

    straight = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", Crash)
    resumed = run(tmp_path / "resumed")
    for name, module in straight.modules().items():
        other = resumed.modules()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, other[key]), f"{name}.{key}"
    assert int(straight.pool_target.queries) == 5 and int(straight.pool_target.stored) == 3


# --- semantic consistency ------------------------------------------------------------------

class TinySeg(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return SegOutput(self.bn(self.conv(x)))


def test_instance_normalised_distance_ignores_per_map_affine_changes():
    a = torch.randn(2, 5, 6, 7)
    scale, shift = torch.rand(1, 5, 1, 1) + 0.5, torch.randn(1, 5, 1, 1)
    assert _in_mse(a, a * scale + shift).item() == pytest.approx(0.0, abs=1e-6)
    assert _in_mse(a, torch.randn(2, 5, 6, 7)).item() > 0.5


@pytest.mark.parametrize("form,names", [("bdl", {"semantic", "semantic_cycle"}), ("cycada", {"semantic"})])
def test_semantic_terms_train_the_generators_only(form, names):
    torch.manual_seed(0)
    seg = TinySeg()
    segmenter = FrozenSegmenter(seg, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    sem = SemanticParams(model="warmup", form=form, reconstruction_weight=1.0 if form == "bdl" else 0.0)
    method = CycleGAN(TINY, CycleGANParams(semantic=sem), segmenter=segmenter)
    for module in method.modules().values():
        module.train()                                   # what the engine does
    segmenter.train()
    running = seg.bn.running_mean.clone()
    losses = method.training_step(batch(5), 0)
    assert names <= set(losses) and all(losses[n] > 0 for n in names)
    assert not seg.training and torch.equal(seg.bn.running_mean, running)
    assert all(p.grad is None for p in seg.parameters())
    assert "segmenter" not in method.modules()           # loaded from its folder, never checkpointed


def test_semantic_params_validation():
    with pytest.raises(ConfigError, match="no reconstruction term"):
        parse(SemanticParams, {"model": "warmup", "form": "cycada"}, "cyclegan.cyclegan.semantic")
    with pytest.raises(ValueError, match="segmenter"):
        CycleGAN(TINY, CycleGANParams(semantic=SemanticParams(model="warmup")))


# --- the default params --------------------------------------------------------------------

def test_default_params_parse_and_schedule_is_constant_then_linear(tmp_path):
    """CycleGAN is off in the default pipeline; presets/synthetic_cyclegan.yaml turns it on with the
    reference losses and optimizers (Zhu et al. ICCV 2017) and a constant-then-linear schedule."""
    assert load_params(ROOT / "params.yaml")["cyclegan"]["outputs"] == []
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    subprocess.run([sys.executable, "-m", "lib.preset", str(ROOT / "presets/synthetic_cyclegan.yaml"),
                    "--params", str(tmp_path / "params.yaml")], cwd=tmp_path, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    params = parse_params(load_params(tmp_path / "params.yaml")["cyclegan"])
    assert params.outputs == ("synth_gta5_cyclegan",)
    assert params.cyclegan.lambda_cycle == 10 and params.cyclegan.lambda_identity == 0.5
    assert params.cyclegan.pool_size == 50 and params.cyclegan.semantic is None
    for opt in params.optim.values():
        assert opt.type == "adam" and opt.lr == 2e-4 and tuple(opt.betas) == (0.5, 0.999)
    iters, constant = params.train.iters, params.schedule.constant_iters
    assert constant == iters // 2
    model = nn.Linear(1, 1)
    optimizer = build_optimizer([ParamGroup(list(model.parameters()))], params.optim["generators"])
    scheduler = build_scheduler(optimizer, iters, params.schedule)
    lrs = []
    for _ in range(iters):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:constant + 1] == [2e-4] * (constant + 1)
    decay = np.diff(lrs[constant:])
    assert np.allclose(decay, decay[0]) and decay[0] < 0            # linear
    assert lrs[-1] == pytest.approx(2e-4 / (iters - constant))     # reaches 0 at `iters`


# --- the stages on a tiny prepared dataset -------------------------------------------------

def stage_params(**over) -> dict:
    raw = {
        "outputs": ["tiny_cyclegan"], "source": "tiny", "target": "tiny",
        "model": {"ngf": 4, "ndf": 4, "n_blocks": 1},
        "cyclegan": {"lambda_cycle": 10.0, "lambda_identity": 0.5, "pool_size": 2, "semantic": None},
        "data": {"batch_size": 2, "scale_width": 32, "crop": [24, 32], "flip": True, "split": "train", "workers": 0},
        "optim": {"generators": {"type": "adam", "lr": 2e-4, "betas": [0.5, 0.999], "weight_decay": 0},
                  "discriminators": {"type": "adam", "lr": 2e-4, "betas": [0.5, 0.999], "weight_decay": 0}},
        "schedule": {"power": 1.0, "constant_iters": 1},
        "train": {"iters": 2, "seed": 0, "checkpoint_every": 1, "log_every": 1},
        "translate": {"splits": ["train"], "batch_size": 4, "workers": 0},
    }
    raw.update(over)
    return raw


def test_train_then_translate_writes_a_valid_prepared_dataset(tmp_path, monkeypatch):
    source = write_prepared(tmp_path)
    monkeypatch.chdir(tmp_path)
    raw = stage_params()
    model_dir = run_cyclegan_training("tiny_cyclegan", raw)
    assert not (tmp_path / "data/checkpoints/cyclegan_tiny_cyclegan" / STATE_FILE).exists()
    assert (tmp_path / "data/checkpoints/cyclegan_tiny_cyclegan/finished.json").is_file()
    generator, meta = load_generator(model_dir)
    assert meta["source"] == "tiny" and meta["scale_width"] == 32 and "translate" not in meta["params"]
    samples = tmp_path / "metrics/cyclegan_tiny_cyclegan"
    assert read_rgb(samples / "samples/source.png").shape[1] == 3 * 32 + 2 * 4
    appearance = json.loads((samples / "appearance.json").read_text())
    assert len(appearance["translated"]["mean"]) == 3
    assert set(appearance["gap_to_target"]["translated"]) == {"mean", "contrast", "saturation", "detail"}

    stats = translate("tiny_cyclegan", raw)
    out = tmp_path / "data/prepared/tiny_cyclegan"
    index = load_index(out)
    source_index = load_index(source, "train", labelled=True)
    assert stats["images"] == len(index) == len(source_index) and set(index["split"]) == {"train"}
    assert list(index["label"]) == list(source_index["label"])        # labels shared
    meta = json.loads((out / "meta.json").read_text())
    assert meta["derived_from"] == "tiny" and meta["stylization"]["method"] == "cyclegan"
    for row in index.itertuples():
        image = read_rgb(tmp_path / row.image)
        assert image.shape == (row.height, row.width, 3)
    # the written image is G applied to the source image
    x = torch.from_numpy(read_rgb(tmp_path / source_index["image"][0])).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = ((apply_full(generator, x) + 1) * 127.5).round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
    assert np.abs(read_rgb(tmp_path / index["image"][0]).astype(int) - expected).max() <= 1
    sample = PreparedDataset(out, "train", transforms=lambda s, rng: s, seed=0, labelled=True)[0]
    assert sample["label"].shape == sample["image"].shape[:2]
    assert len(list((samples / "examples").glob("*.png"))) == 4
    assert pd.read_csv(out / "class_counts.csv", dtype={"id": str})["id"].tolist() == list(source_index["id"])


def test_translate_needs_the_trained_generator(tmp_path, monkeypatch):
    write_prepared(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="cyclegan_tiny_cyclegan"):
        translate("tiny_cyclegan", stage_params())


def test_unknown_key_and_bad_crop_are_config_errors():
    with pytest.raises(ConfigError, match="cyclegan.model.width"):
        parse_params(stage_params(model={"width": 3}))
    for crop in ([30, 32], [20, 32]):
        with pytest.raises(ConfigError, match="multiples of 4 and at least 24"):
            parse_params(stage_params(data={**stage_params()["data"], "crop": crop}))


def test_appearance_statistics():
    grey = torch.zeros(2, 3, 8, 8)                            # mid grey: no saturation, contrast or detail
    stats = appearance_stats(grey)
    assert stats["mean"] == [127.5] * 3 and stats["contrast"] == [0.0] * 3
    assert stats["saturation"] == 0.0 and stats["detail"] == 0.0
    red = torch.full((1, 3, 8, 8), -1.0)
    red[:, 0] = 1.0
    assert appearance_stats(red)["saturation"] == 1.0
    noisy = appearance_stats(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert noisy["detail"] > 50 and appearance_gap(noisy, noisy) == dict.fromkeys(noisy, 0.0)
