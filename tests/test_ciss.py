"""CISS (Sakaridis et al., "Condition-Invariant Semantic Segmentation", 2023): the invariance loss,
the DACS machinery (EMA schedule, confidence weight, ClassMix, mixed-image augmentation, feature
distance), paired stylized loading, and training through the engine (rows of the model table)."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.config import parse
from lib.data.classes import IGNORE
from lib.data.classmix import (
    Augmentation,
    augment,
    blur_kernel_size,
    choose_classes,
    class_masks,
    draw_augmentation,
    mix,
)
from lib.data.dataset import PreparedDataset
from lib.data.paired import STYLIZED, RestyledSource, StylizedPairs, stylize, to_uint8
from lib.data.sampling import Draw, uniform_stream
from lib.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    HorizontalFlip,
    Normalize,
    RandomCrop,
)
from lib.errors import ConfigError
from lib.io import read_rgb
from lib.losses.feature_distance import downscale_label, feature_distance, thing_cells
from lib.losses.invariance import feature_invariance
from lib.losses.segmentation import weighted_cross_entropy
from lib.methods.base import method_class
from lib.methods.ciss import Ciss, CissParams, pseudo_weight
from lib.models import ModelParams, build_model
from lib.models.ema import warmup_momentum
from lib.models.weights import WeightsParams, import_weights
from lib.stylize.transfer import Transfer
from lib.table import find_training_row
from lib.train.stage import CURVES_ROOT, build_training_stage, source_frames
from tests import layouts as L
from tests.tables import ensure_scratch, one_row, train

C = 19
CROP = (32, 64)
FAST = settings(max_examples=25, deadline=None)
NORMALIZE = (IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------- feature invariance loss
def feature_maps(seed: int, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer1": torch.randn(2, 4, 6, 8, generator=g).requires_grad_(requires_grad),
            "layer2": torch.randn(2, 8, 3, 4, generator=g).requires_grad_(requires_grad),
            "layer4": torch.randn(2, 16, 3, 4, generator=g).requires_grad_(requires_grad)}


@FAST
@given(seed=st.integers(0, 10_000), w1=st.floats(0, 10), w2=st.floats(0, 10))
def test_invariance_is_zero_for_identical_views(seed, w1, w2):
    a = feature_maps(seed)
    copy = {name: f.clone() for name, f in a.items()}
    assert feature_invariance(a, copy, {"layer1": w1, "layer2": w2}).item() == 0.0


def test_invariance_is_the_weighted_elementwise_mse_of_the_chosen_stages():
    a, b = feature_maps(0), feature_maps(1)
    expected = (0.9 * ((a["layer1"] - b["layer1"]) ** 2).sum() / a["layer1"].numel()
                + 0.1 * ((a["layer2"] - b["layer2"]) ** 2).sum() / a["layer2"].numel())
    value = feature_invariance(a, b, {"layer1": 0.9, "layer2": 0.1})
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    b["layer4"] = b["layer4"] + 100.0                    # a stage outside the weights does not count
    assert feature_invariance(a, b, {"layer1": 0.9, "layer2": 0.1}).item() == pytest.approx(value.item())
    with pytest.raises(KeyError, match="layer3"):
        feature_invariance(a, b, {"layer3": 1.0})


def test_invariance_gradient_reaches_both_views_with_opposite_signs():
    a, b = feature_maps(0, requires_grad=True), feature_maps(1, requires_grad=True)
    feature_invariance(a, b, {"layer1": 0.9, "layer2": 0.1}).backward()
    for name in ("layer1", "layer2"):
        assert a[name].grad.abs().sum() > 0 and b[name].grad.abs().sum() > 0    # no stop-gradient
        assert torch.allclose(a[name].grad, -b[name].grad)
    assert a["layer4"].grad is None


# ---------------------------------------------------------------- EMA schedule, confidence weight, CE
def test_ema_momentum_schedule():
    assert warmup_momentum(0, 0.999) == 0.0                    # iteration 0: the teacher is the student
    assert warmup_momentum(1, 0.999) == 0.5
    assert warmup_momentum(3, 0.999) == 0.75
    assert warmup_momentum(99, 0.999) == pytest.approx(0.99)
    assert warmup_momentum(999, 0.999) == pytest.approx(0.999)
    assert warmup_momentum(40_000, 0.999) == 0.999
    assert warmup_momentum(200, 0.99) == 0.99
    values = [warmup_momentum(t, 0.999) for t in range(3000)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        warmup_momentum(-1, 0.999)


def test_pseudo_weight_is_the_share_of_confident_pixels_over_the_whole_batch():
    prob = torch.full((2, 2, 2, 2), 0.5)                              # 8 pixels, two classes
    prob[0, :, 0, 0] = torch.tensor([0.97, 0.03])                     # confident
    prob[1, :, 1, 1] = torch.tensor([0.01, 0.99])                     # confident
    prob[1, :, 0, 1] = torch.tensor([0.968, 0.032])                   # exactly tau counts
    prob[0, :, 1, 0] = torch.tensor([0.9679, 0.0321])                 # just below
    assert pseudo_weight(prob, 0.968).item() == pytest.approx(3 / 8)
    assert pseudo_weight(prob, 0.0).item() == 1.0
    assert pseudo_weight(prob, 1.0).item() == 0.0


def test_weighted_ce_averages_over_all_pixels_with_ignored_ones_as_zero():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0] = torch.tensor([2.0, 0.0, 1.0, 3.0])
    label = torch.tensor([[[0, 1, IGNORE, 0]]])
    per_pixel = [math.log(1 + math.exp(-2)), math.log(2), 0.0, math.log(1 + math.exp(-3))]
    assert weighted_cross_entropy(logits, label).item() == pytest.approx(sum(per_pixel) / 4, rel=1e-6)
    weight = torch.tensor([[[1.0, 0.5, 0.5, 0.0]]])
    expected = (per_pixel[0] + 0.5 * per_pixel[1]) / 4
    assert weighted_cross_entropy(logits, label, weight).item() == pytest.approx(expected, rel=1e-6)
    assert weighted_cross_entropy(logits, torch.full_like(label, IGNORE)).item() == 0.0


# ---------------------------------------------------------------- ClassMix
@FAST
@given(seed=st.integers(0, 10_000), n_classes=st.integers(1, 9), with_ignore=st.booleans())
def test_classmix_masks_cover_exactly_half_of_the_batch_classes(seed, n_classes, with_ignore):
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor(list(range(0, 2 * n_classes, 2)) + ([IGNORE] if with_ignore else []))
    labels = values[torch.randint(len(values), (3, 5, 7), generator=g)]
    labels[0].view(-1)[: len(values)] = values                          # every value occurs in the batch
    candidates = set(torch.unique(labels).tolist())
    chosen = choose_classes(labels, g)
    masks = class_masks(labels, chosen)
    n = len(candidates)
    for label, classes, mask in zip(labels, chosen, masks):
        assert len(classes) == (n + n % 2) // 2 == math.ceil(n / 2)
        assert len(set(classes.tolist())) == len(classes) and set(classes.tolist()) <= candidates
        expected = torch.zeros_like(mask)
        for c in classes.tolist():
            expected |= label == c
        assert torch.equal(mask, expected)


def test_mix_takes_images_labels_and_weights_from_the_source_inside_the_mask():
    mask = torch.tensor([[[True, False], [False, True]]])
    source, target = torch.full((1, 3, 2, 2), 1.0), torch.full((1, 3, 2, 2), -1.0)
    expected = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).expand(1, 3, 2, 2)
    assert torch.equal(mix(mask, source, target), expected)
    y_s, y_t = torch.tensor([[[5, IGNORE], [7, 8]]]), torch.tensor([[[1, 2], [3, 4]]])
    assert torch.equal(mix(mask, y_s, y_t), torch.tensor([[[5, 2], [3, 8]]]))
    q = torch.tensor(0.25)
    assert torch.equal(torch.where(mask, 1.0, q), torch.tensor([[[1.0, 0.25], [0.25, 1.0]]]))


def test_blur_kernel_is_a_tenth_of_the_side_and_odd():
    assert [blur_kernel_size(s) for s in (1024, 512, 64, 100, 10, 5)] == [103, 51, 7, 9, 1, 1]


def test_mixed_image_augmentation_shares_decisions_and_redraws_parameters():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=g).clamp(-1.5, 1.5)
    assert torch.equal(augment(images, IMAGENET_MEAN, IMAGENET_STD, Augmentation(False, False), 0.2, g), images)
    on = Augmentation(jitter=True, blur=True)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = augment(images, IMAGENET_MEAN, IMAGENET_STD, on, 0.2, g1)
    assert torch.equal(first, augment(images, IMAGENET_MEAN, IMAGENET_STD, on, 0.2, g2))   # seeded
    second = augment(images, IMAGENET_MEAN, IMAGENET_STD, on, 0.2, g1)   # the stylized view's own draws
    assert not torch.allclose(first, second) and not torch.allclose(first, images)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    unit = first * std + mean
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
    shares = [draw_augmentation(g, 0.8, 0.5) for _ in range(2000)]
    assert abs(np.mean([d.jitter for d in shares]) - 0.8) < 0.04
    assert abs(np.mean([d.blur for d in shares]) - 0.5) < 0.04


# ---------------------------------------------------------------- ImageNet feature distance
def test_downscaled_label_keeps_cells_with_a_large_enough_majority():
    label = torch.zeros(1, 4, 8, dtype=torch.long)
    label[0, :, 0:4] = 13                                   # cell 0: all car
    label[0, 0, 4:8] = 11                                   # cell 1: 4 of 16 person, 12 road -> road (0.75)
    cells = downscale_label(label, (1, 2), C, 0.75)
    assert cells.tolist() == [[[13, 0]]]
    label[0, 1, 4] = 11                                     # road 11/16 < 0.75 -> ignore
    assert downscale_label(label, (1, 2), C, 0.75).tolist() == [[[13, IGNORE]]]
    label[0, :, 0:4] = IGNORE                               # a cell of ignore stays ignore
    assert downscale_label(label, (1, 2), C, 0.0).tolist() == [[[IGNORE, 0]]]
    label[0, :, 0:4] = 13
    assert thing_cells(label, (1, 2), C, [13], 0.75).tolist() == [[[True, False]]]


def test_feature_distance_is_the_mean_channel_norm_over_kept_cells():
    student = torch.zeros(1, 2, 1, 3, requires_grad=True)
    imagenet = torch.tensor([[[[3.0, 1.0, 0.0]], [[4.0, 0.0, 2.0]]]])      # norms 5, 1, 2
    mask = torch.tensor([[[True, False, True]]])
    loss = feature_distance(student, imagenet, mask)
    assert loss.item() == pytest.approx(3.5)
    loss.backward()
    assert student.grad[..., 1].abs().sum() == 0 and student.grad[..., 0].abs().sum() > 0
    empty = feature_distance(student, imagenet, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


# ---------------------------------------------------------------- the method on a small DeepLabV2
def build(raw: dict | None = None, seed: int = 0) -> Ciss:
    torch.manual_seed(seed)
    model = build_model(ModelParams(arch="deeplabv2", depth=18, bn="batch", aux=True), C)
    return Ciss(model, parse(CissParams, raw or {}, "ciss"), C, NORMALIZE)


def constant_batch(seed: int = 1) -> dict:
    """x_s = 1, x~_s = 2, x_t = -1, x~_t = -2 everywhere: the origin of each mixed pixel is readable."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 6, (2, *CROP), generator=g)
    label[:, :4] = IGNORE
    full = functools.partial(torch.full, (2, 3, *CROP))
    return {"source": {"image": full(1.0), "label": label, STYLIZED: full(2.0)},
            "target": {"image": full(-1.0), STYLIZED: full(-2.0)}}


def step(method: Ciss, batch: dict, it: int = 0) -> dict[str, float]:
    for module in method.modules().values():
        module.zero_grad(set_to_none=True)
    return {name: float(value) for name, value in method.training_step(batch, it).items()}


def test_both_mixed_views_get_the_same_classmix_mask():
    method = build({"jitter_p": 0.0, "blur_p": 0.0, "fd_weight": 0.0})
    inputs = []
    method.model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    batch = constant_batch()
    losses = step(method, batch)
    assert set(losses) == {"seg", "inv_source", "seg_mix", "inv_target", "pseudo_weight"}
    xs, xs_styl, mixed, mixed_styl = inputs                 # the student's four forwards, in order
    assert torch.equal(xs, batch["source"]["image"]) and torch.equal(xs_styl, batch["source"][STYLIZED])
    assert set(mixed.unique().tolist()) == {-1.0, 1.0} and set(mixed_styl.unique().tolist()) == {-2.0, 2.0}
    mask = mixed[:, 0] > 0
    assert torch.equal(mask, mixed_styl[:, 0] > 0)
    assert torch.equal(mixed > 0, mask[:, None].expand_as(mixed))           # one mask for all channels
    label = batch["source"]["label"]
    for i in range(2):                                      # whole classes are pasted, never parts of one
        for c in label[i].unique():
            assert mask[i][label[i] == c].unique().numel() == 1


def test_gradients_reach_the_encoder_from_every_term_and_the_teacher_takes_none(monkeypatch):
    method = build({"fd_weight": 0.0})
    batch = constant_batch()
    batch["source"][STYLIZED] = batch["source"]["image"] + 0.1 * torch.randn(2, 3, *CROP)
    pairs = []

    def spy(features, stylized, weights):                  # both views must be live student activations
        pairs.append(all(features[n].requires_grad and stylized[n].requires_grad for n in weights))
        return feature_invariance(features, stylized, weights)

    monkeypatch.setattr("lib.methods.ciss.feature_invariance", spy)
    step(method, batch)
    assert pairs == [True, True]                            # the source and the mixed-target pair
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.model.backbone.layer1.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
    assert set(method.modules()) == {"model", "teacher"} and method.frozen_modules() == {}
    only_source = build({"fd_weight": 0.0, "target_weight": 0.0})
    assert set(step(only_source, batch)) == {"seg", "inv_source", "seg_mix", "pseudo_weight"}


def test_dacs_control_has_no_invariance_term_and_no_stylized_streams():
    method = build({"source_weight": 0.0, "target_weight": 0.0, "fd_weight": 0.0})
    assert method.stream_stylization() is None
    batch = constant_batch()
    for stream in ("source", "target"):
        del batch[stream][STYLIZED]
    assert set(step(method, batch)) == {"seg", "seg_mix", "pseudo_weight"}
    assert build({"stylization": "reinhard", "fd_weight": 0.0}).stream_stylization() == Transfer("reinhard")
    fda = build({"stylization": "fda", "fda_beta": 0.05, "fd_weight": 0.0})
    assert fda.stream_stylization() == Transfer("fda", 0.05)


def test_teacher_follows_the_dacs_schedule_and_ignores_its_dropout():
    method = build({"fd_weight": 0.0})
    start = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)                                     # stands in for the first optimizer step
    method.after_step(0)                                    # alpha_1 = 1/2: the mean of both students
    for name, p in method.teacher.named_parameters():
        assert torch.allclose(p, start[name] + 0.5), name
    cpsl = build_model(ModelParams(arch="deeplabv2", depth=18, bn="batch", aux=False, head="cpsl",
                                   head_width=32), C)
    method = Ciss(cpsl, CissParams(fd_weight=0.0), C, NORMALIZE)
    method.teacher.train()
    x = torch.randn(2, 3, *CROP)
    torch.manual_seed(1)
    first = method._teacher_softmax(x)
    torch.manual_seed(2)
    assert torch.equal(first, method._teacher_softmax(x))   # Dropout2d of the CPSL head is off
    assert method.teacher.training                          # BatchNorm keeps batch statistics


@pytest.mark.parametrize("raw, message", [
    ({"invariance_layers": {"layer5": 1.0}}, "invariance_layers.layer5 is not an encoder stage"),
    ({"invariance_layers": {"layer1": 0.0}}, "needs a positive weight"),
    ({"stylization": "cyclegan"}, "ciss.stylization = 'cyclegan' is not a transfer"),
    ({"fda_beta": 0.6}, "fda_beta must be in"),
    ({"ema": 1.5}, "ema must be in"),
    ({"source_weight": -1.0}, "source_weight must be >= 0"),
])
def test_params_are_validated(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse(CissParams, raw, "ciss")


def test_params_defaults_are_the_papers_and_classes_are_checked():
    p = parse(CissParams, {}, "ciss")
    assert (p.source_weight, p.target_weight, p.fda_beta, p.ema, p.pseudo_threshold) == (50.0, 20.0, 0.01, 0.999, 0.968)
    assert p.invariance_layers == {"layer1": 0.9, "layer2": 0.1} and p.fd_weight == 0.005
    assert parse(CissParams, {"source_weight": 0, "target_weight": 0, "invariance_layers": {}}, "ciss")
    assert method_class("ciss") is Ciss
    with pytest.raises(ConfigError, match="class 19 does not exist"):
        build({"fd_classes": [19]})


# ---------------------------------------------------------------- paired stylized loading
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project root with prepared datasets gta (train 6, labelled, 12x16) and cs (train 3)."""
    return L.prepare_gta_and_cityscapes(tmp_path_factory.mktemp("project"))


def find_window(full: np.ndarray, crop: np.ndarray) -> tuple[int, int, bool]:
    """The (top, left, flipped) at which ``crop`` was cut from ``full``; it must be unique."""
    h, w = crop.shape[:2]
    hits = [(top, left, flipped) for flipped in (False, True) for top in range(full.shape[0] - h + 1)
            for left in range(full.shape[1] - w + 1)
            if np.array_equal((full[:, ::-1] if flipped else full)[top:top + h, left:left + w], crop)]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("transfer", [Transfer("fda", 0.1), Transfer("reinhard")], ids=["fda", "reinhard"])
def test_paired_views_share_crop_and_flip_and_take_the_partners_style(project, monkeypatch, transfer):
    monkeypatch.chdir(project)
    unit = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    transforms = Compose([RandomCrop(8, 8), HorizontalFlip(), Normalize(*unit)])
    source = PreparedDataset("data/prepared/gta", "train", transforms, seed=3, labelled=True)
    target = PreparedDataset("data/prepared/cs", "train", transforms, seed=4)
    target_draws = functools.partial(uniform_stream, len(target), 9)
    paired = StylizedPairs(source, target, target_draws, transfer, unit)
    counts = pd.read_csv("data/prepared/gta/class_counts.csv", dtype={"id": str}).set_index("id")
    flips = set()
    for k, rare in [(0, None), (1, None), (2, None), (3, None), (5, 0), (8, 2)]:
        draw = Draw(index=k % len(source), k=k, rare_class=rare, min_pixels=1 if rare is not None else 0)
        sample = paired[draw]
        full = source.load(draw.index)["image"]
        partner = target.load(next(target_draws(k)).index)["image"]
        stylized = stylize(full, partner, transfer)
        crop = np.rint(sample["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        top, left, flipped = find_window(full, crop)
        flips.add(flipped)
        expected = (stylized[:, ::-1] if flipped else stylized)[top:top + 8, left:left + 8]
        got = sample[STYLIZED].permute(1, 2, 0).numpy() * 255
        np.testing.assert_allclose(got, expected, atol=1e-3)
        assert sample["label"].shape == (8, 8) and sample["draw"] == k and "rare_class" not in sample
        if rare is not None and counts.iloc[draw.index, rare] > 1:
            assert (sample["label"] == rare).sum() > 1     # the rare-class re-crop moved both views
    assert flips == {False, True}
    assert not np.allclose(stylize(full, partner, transfer), full)           # the copy is restyled


def test_fda_copy_is_not_clipped_and_beta_zero_is_the_image(project, monkeypatch):
    monkeypatch.chdir(project)
    image = read_rgb("raw/gta5/images/00001.png")
    other = np.zeros_like(image) + 255
    assert np.array_equal(stylize(image, image[::-1], Transfer("fda", 0.0)), image.astype(np.float32))
    restyled = stylize(image, other, Transfer("fda", 0.2))
    assert restyled.dtype == np.float32 and restyled.max() > 255


def test_a_restyled_source_takes_a_random_target_image_at_every_draw(project, monkeypatch):
    """CPSL's loader: each load of a source image is restyled (Lab) by a target image drawn from (seed, k)."""
    monkeypatch.chdir(project)
    unit = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    source = PreparedDataset("data/prepared/gta", "train", Compose([Normalize(*unit)]), seed=3, labelled=True)
    target = PreparedDataset("data/prepared/cs", "train", None, seed=3)
    restyled = RestyledSource(source, target, Transfer("lab"))
    styles = []
    for k in range(8):
        draw = Draw(index=k % len(source), k=k)
        sample = restyled[draw]
        j = restyled.style_row(k)
        assert j == restyled.style_row(k) and 0 <= j < len(target)      # a pure function of (seed, k)
        styles.append(j)
        expected = to_uint8(stylize(source.load(draw.index)["image"], target.load(j)["image"], Transfer("lab")))
        got = np.rint(sample["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        np.testing.assert_array_equal(got, expected)
        assert torch.equal(sample["label"], source[draw]["label"])       # the label is the source's
    assert len(set(styles)) > 1


def test_source_frames_are_whole_distinct_normalised_frames_drawn_by_the_seed(project, monkeypatch):
    """What a method that measures on source frames (RobustNet ISW) gets from its stage."""
    monkeypatch.chdir(project)
    frames = source_frames("gta", "train", "imagenet")
    first = list(frames(4, [7, 0]))
    plain = PreparedDataset("data/prepared/gta", "train", Normalize(IMAGENET_MEAN, IMAGENET_STD), seed=0)
    whole = [plain[i]["image"] for i in range(len(plain))]
    rows = [next(i for i, w in enumerate(whole) if torch.equal(w, f[0])) for f in first]
    assert len(set(rows)) == 4 and all(f.shape == (1, 3, 12, 16) for f in first)
    assert all(torch.equal(a, b) for a, b in zip(first, frames(4, [7, 0])))
    assert len(list(frames(100, [7, 1]))) == len(plain)                   # at most every frame once
    assert [torch.equal(a, b) for a, b in zip(first, frames(4, [7, 1]))] != [True] * 4


def test_a_recipe_with_a_source_style_trains_on_restyled_crops(project, monkeypatch):
    monkeypatch.chdir(project)
    ensure_scratch()
    recipe = {"model": {"arch": "deeplabv2", "depth": 18, "bn": "frozen", "aux": False},
              "data": {"batch_size": 2, "crop": [8, 16], "workers": 0},
              "optim": {"model": {"lr": 1.0e-3}}, "train": {"iters": 1, "precision": "fp32"}}
    plain = one_row("plain", "source_only", recipe, "gta", "cs")
    styled = one_row("styled", "source_only", {**recipe, "source_style": "lab"}, "gta", "cs")
    batch = {name: next(build_training_stage(find_training_row(params, name)).streams["source"](0))
             for name, params in (("plain", plain), ("styled", styled))}
    assert torch.equal(batch["plain"]["label"], batch["styled"]["label"])       # the same draws and crops
    assert not torch.equal(batch["plain"]["image"], batch["styled"]["image"])   # restyled
    with pytest.raises(ConfigError, match=r"recipes\.source_only\.source_style = 'hsv' is not a transfer"):
        build_training_stage(find_training_row(one_row("x", "source_only", {**recipe, "source_style": "hsv"},
                                                       "gta", "cs"), "x"))
    with pytest.raises(ConfigError, match=r"source_style restyles the source by target images, but `target` is null"):
        build_training_stage(find_training_row(one_row("x", "source_only", {**recipe, "source_style": "lab"},
                                                       "gta"), "x"))


# ---------------------------------------------------------------- through the engine
RECIPE = {
    "method": {"fd_weight": 0.005},
    "model": {"arch": "deeplabv2", "depth": 18, "bn": "batch", "aux": True},
    "data": {"batch_size": 2, "crop": [8, 16], "sampling": "rare_class", "rcs_min_pixels": 2, "workers": 0},
    "target_data": {"sampling": "uniform"},
    "optim": {"model": {"type": "adamw", "lr": 6e-5, "weight_decay": 0.01, "head_lr_mult": 10.0}},
    "schedule": {"power": 1.0, "warmup_iters": 2},
    "train": {"iters": 3, "checkpoint_every": 3, "log_every": 1, "precision": "fp32"},
}
DACS = {"method": {"source_weight": 0.0, "target_weight": 0.0, "fd_weight": 0.0}}   # the control: no invariance


def table(**rows) -> dict:
    """The model table of these tests: ``ciss_run`` (from scratch) and the rows given."""
    return one_row("ciss_run", "ciss", RECIPE, "gta", "cs", models=rows)


def logged(name: str) -> set[str]:
    return {p.stem for p in (CURVES_ROOT / name / "plots/metrics/train/loss").glob("*.tsv")}


def test_ciss_and_its_dacs_control_train_through_the_engine(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    params = table(dacs_run={"recipe": "ciss", "from": "scratch", "overrides": DACS},
                   bad={"recipe": "ciss", "from": "scratch", "overrides": {"target_data": {"batch_size": 1}}})
    out = train(params, "ciss_run")
    assert "ImageNet feature distance off" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == "ciss" and meta["stage"] == "train@ciss_run" and meta["from"] == "scratch"
    assert (out / "model.pt").is_file()
    assert logged("ciss_run") == {"seg", "inv_source", "seg_mix", "inv_target", "pseudo_weight"}
    curve = pd.read_csv(CURVES_ROOT / "ciss_run/plots/metrics/train/loss/inv_target.tsv", sep="\t")
    assert len(curve) == 3 and np.isfinite(curve.iloc[:, -1]).all() and (curve.iloc[:, -1] > 0).all()

    train(params, "dacs_run")
    assert logged("dacs_run") == {"seg", "seg_mix", "pseudo_weight"}
    seg = {s: pd.read_csv(CURVES_ROOT / s / "plots/metrics/train/loss/seg.tsv", sep="\t").iloc[0, -1]
           for s in ("ciss_run", "dacs_run")}
    assert seg["ciss_run"] == pytest.approx(seg["dacs_run"])    # same first batch and init: streams agree

    with pytest.raises(ConfigError, match="batch_size must equal"):
        train(params, "bad")


# The ImageNet feature distance: on when the row starts from ImageNet weights (a `weights` entry,
# laid on the backbone before the method copies the model), off otherwise.
def test_feature_distance_is_off_without_imagenet_weights(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    ensure_scratch()
    method = build_training_stage(find_training_row(table(), "ciss_run")).method
    assert method.imagenet is None and method.frozen_modules() == {}
    assert "ImageNet feature distance off" in capsys.readouterr().out
    quiet = table(quiet={"recipe": "ciss", "from": "scratch", "overrides": {"method": {"fd_weight": 0.0}}})
    assert build_training_stage(find_training_row(quiet, "quiet")).method.imagenet is None
    assert "ImageNet feature distance off" not in capsys.readouterr().out


def test_feature_distance_with_imagenet_weights_on_both_source_views(project, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(project)
    torch.manual_seed(3)
    published = torchvision.models.resnet18().state_dict()       # stands in for the ImageNet file
    torch.save(published, tmp_path / "resnet18.pth")
    entry = {"format": "torchvision", "file": str(tmp_path / "resnet18.pth")}
    import_weights("imagenet", parse(WeightsParams, entry, "weights.imagenet"), Path("data/models/imagenet"))
    params = table(fd={"recipe": "ciss", "from": "imagenet"})
    params["weights"] = {"imagenet": entry}
    method = build_training_stage(find_training_row(params, "fd")).method
    assert "ImageNet feature distance off" not in capsys.readouterr().out
    assert set(method.frozen_modules()) == {"imagenet"}
    frozen = method.imagenet.backbone.state_dict()                # the copy holds the imported weights
    assert all(torch.equal(frozen[k], v) for k, v in published.items() if not k.startswith("fc."))
    reference = {n: p.clone() for n, p in method.imagenet.named_parameters()}
    method.imagenet.eval()
    batch = constant_batch()
    batch["source"]["label"][:] = 13                          # car everywhere: every cell is a thing
    losses = step(method, batch)
    assert losses["fd"] > 0 and losses["fd_stylized"] > 0
    assert all(p.grad is None for p in method.imagenet.parameters())
    assert all(torch.equal(p, reference[n]) for n, p in method.imagenet.named_parameters())
    batch["source"]["label"][:] = 0                           # road: no thing cell, no distance
    losses = step(method, batch)
    assert losses["fd"] == 0.0 and losses["fd_stylized"] == 0.0
