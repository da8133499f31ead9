"""predict_logits (whole, slide, flip, ensembles, input resize) and evaluate_split end to end."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader

from lib.data.classes import CITYSCAPES19
from lib.data.dataset import PreparedDataset
from lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from lib.infer.inference import inference_layout, predict_logits, window_starts
from lib.infer.report import evaluate_split
from lib.io import write_label_png, write_rgb
from lib.models import ModelParams, build_model
from lib.models.output import SegOutput, upsample


class PointModel(nn.Module):
    """A 1x1 convolution: equivariant to translations (so to cropping) and to flips; stride 1."""

    def __init__(self, classes: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return SegOutput(logits=self.conv(x))


class PooledModel(nn.Module):
    """Average-pool by ``stride`` then 1x1 conv: logits at the head stride, like a real network."""

    def __init__(self, classes: int = 5, stride: int = 4, seed: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, 1)
        self.stride = stride

    def forward(self, x):
        return SegOutput(logits=self.conv(F.avg_pool2d(x, self.stride)))


class PositionModel(nn.Module):
    """Logits = the pixel's row and column inside its input: neither crop- nor flip-equivariant."""

    def forward(self, x):
        n, _, h, w = x.shape
        rows = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(n, 1, h, w)
        cols = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(n, 1, h, w)
        return SegOutput(logits=torch.cat([rows, cols], 1))


def evaluated(model: nn.Module) -> nn.Module:
    return model.eval()


def image(h: int, w: int, n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def mmseg_reference_starts(size: int, window: int, stride: int) -> list[int]:
    """mmseg slide_inference's loop, written out: grids, then clamp each window into the image."""
    grids = max(size - window + stride - 1, 0) // stride + 1
    starts = []
    for i in range(grids):
        y1 = i * stride
        y2 = min(y1 + window, size)
        starts.append(max(y2 - window, 0))
    return starts


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.integers(1, 400))
def test_window_starts_follow_the_formula(size, window, stride):
    starts = window_starts(size, window, stride)
    win = min(window, size)
    expected_count = 1 if window >= size else math.ceil((size - window) / stride) + 1
    assert len(starts) == expected_count
    assert starts == mmseg_reference_starts(size, win, stride)
    assert starts[0] == 0 and starts[-1] + win == size  # last window clamped to the edge
    assert all(0 <= s <= size - win for s in starts)
    assert all(b > a for a, b in zip(starts, starts[1:]))  # distinct, increasing
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # no gaps: full coverage
    assert starts[:-1] == [i * stride for i in range(len(starts) - 1)]


@pytest.mark.parametrize("window", [(32, 48), (40, 60)])
def test_slide_equals_whole_when_the_window_covers_the_image(window):
    models = [(evaluated(PooledModel()), 1.0)]
    x = image(32, 48, n=2)
    whole = predict_logits(models, x, (64, 96))
    slide = predict_logits(models, x, (64, 96), mode="slide", window=window, stride=(8, 8))
    assert whole.shape == (2, 5, 64, 96)
    torch.testing.assert_close(slide, whole, rtol=0, atol=0)


@pytest.mark.parametrize("out_size", [(23, 37), (46, 70)])
@pytest.mark.parametrize("window,stride", [((10, 16), (7, 9)), ((8, 8), (3, 5)), ((23, 5), (4, 5))])
def test_overlapping_slide_equals_whole_for_a_translation_equivariant_model(out_size, window, stride):
    models = [(evaluated(PointModel()), 1.0)]
    x = image(23, 37)
    whole = predict_logits(models, x, out_size)
    slide = predict_logits(models, x, out_size, mode="slide", window=window, stride=stride)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


def test_slide_averages_each_pixel_over_the_windows_that_visit_it():
    h, w, window, stride = 11, 17, (5, 7), (3, 4)
    logits = predict_logits([(PositionModel().eval(), 1.0)], image(h, w), (h, w), mode="slide",
                            window=window, stride=stride)
    total, visits = np.zeros((2, h, w)), np.zeros((h, w))
    for top in mmseg_reference_starts(h, window[0], stride[0]):
        for left in mmseg_reference_starts(w, window[1], stride[1]):
            for y in range(top, top + window[0]):
                for x in range(left, left + window[1]):
                    total[:, y, x] += (y - top, x - left)
                    visits[y, x] += 1
    assert visits.min() >= 1
    np.testing.assert_allclose(logits[0].numpy(), total / visits, rtol=1e-6, atol=1e-6)


def test_flip_with_a_flip_equivariant_model_changes_nothing():
    for model, kwargs in [(PooledModel(), {}),
                          (PointModel(), {"mode": "slide", "window": (16, 20), "stride": (8, 12)})]:
        models = [(evaluated(model), 1.0)]
        x = image(32, 48, seed=3)
        plain = predict_logits(models, x, (64, 96), **kwargs)
        flipped = predict_logits(models, x, (64, 96), flip=True, **kwargs)
        torch.testing.assert_close(flipped, plain, rtol=1e-5, atol=1e-5)


def test_flip_averages_with_the_mirrored_prediction():
    x = image(6, 9)
    logits = predict_logits([(PositionModel().eval(), 1.0)], x, (6, 9), flip=True)
    cols = torch.arange(9, dtype=torch.float32)
    # mirrored input: column j sees position 8 - j; averaged with j: constant 4
    torch.testing.assert_close(logits[0, 1], torch.full((6, 9), 4.0))
    torch.testing.assert_close(logits[0, 0], torch.arange(6.0).view(6, 1).expand(6, 9))
    assert not torch.equal(logits[0, 1, 0], cols)


def test_ensemble_is_the_weighted_sum_of_logits():
    a, b = evaluated(PooledModel(seed=1)), evaluated(PooledModel(seed=2))
    x = image(32, 48, seed=4)
    la = predict_logits([(a, 1.0)], x, (32, 48))
    lb = predict_logits([(b, 1.0)], x, (32, 48))
    torch.testing.assert_close(predict_logits([(a, 1.0), (b, 0.0)], x, (32, 48)), la)
    torch.testing.assert_close(predict_logits([(a, 0.5), (b, 0.5)], x, (32, 48)), 0.5 * (la + lb))
    torch.testing.assert_close(predict_logits([(a, 1.0), (b, 1.0)], x, (32, 48)), la + lb)
    torch.testing.assert_close(predict_logits(a, x, (32, 48)), la)  # a bare module: weight 1
    slide = predict_logits([(a, 1.0), (b, 0.0)], x, (32, 48), mode="slide", window=(16, 16),
                           stride=(12, 12))
    torch.testing.assert_close(slide, predict_logits([(a, 1.0)], x, (32, 48), mode="slide",
                                                     window=(16, 16), stride=(12, 12)))


@pytest.mark.parametrize("resize_mode", ["bilinear", "bicubic"])
def test_input_size_resizes_the_image_before_the_forward(resize_mode):
    model = evaluated(PooledModel())
    x = image(32, 48, seed=5)
    got = predict_logits([(model, 1.0)], x, (32, 48), input_size=(16, 24), resize_mode=resize_mode)
    small = F.interpolate(x, size=(16, 24), mode=resize_mode, align_corners=False, antialias=True)
    with torch.no_grad():
        expected = upsample(model(small).logits, (32, 48))
    torch.testing.assert_close(got, expected)
    same = predict_logits([(model, 1.0)], x, (32, 48), input_size=(32, 48))
    torch.testing.assert_close(same, predict_logits([(model, 1.0)], x, (32, 48)))


@pytest.mark.parametrize("arch", ["deeplabv2", "deeplabv3plus"])
def test_channels_last_layout_predicts_what_the_default_layout_predicts(arch):
    torch.manual_seed(0)
    model = build_model(ModelParams(arch=arch, depth=18), 5).eval()
    image = torch.randn(2, 3, 40, 56)
    reference = predict_logits(model, image, (40, 56))
    assert inference_layout(model, False) is model
    assert model.backbone.conv1.weight.is_contiguous()
    inference_layout(model, True)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.backbone.conv1.weight.is_contiguous()
    torch.testing.assert_close(predict_logits(model, image, (40, 56)), reference, rtol=1e-4, atol=1e-4)


def test_argument_errors():
    x = image(8, 8)
    with pytest.raises(ValueError, match="eval"):
        predict_logits([(PointModel().train(), 1.0)], x, (8, 8))
    with pytest.raises(ValueError, match="window"):
        predict_logits([(PointModel().eval(), 1.0)], x, (8, 8), mode="slide")
    with pytest.raises(ValueError, match="mode"):
        predict_logits([(PointModel().eval(), 1.0)], x, (8, 8), mode="multiscale")
    with pytest.raises(ValueError):
        predict_logits([(PointModel().eval(), 1.0)], x[0], (8, 8))


class ColourModel(nn.Module):
    """Predicts the class whose Cityscapes colour is nearest to the (normalised) pixel colour."""

    def __init__(self):
        super().__init__()
        colours = torch.tensor(CITYSCAPES19.colors, dtype=torch.float32) / 255.0
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("centres", ((colours - mean) / std).view(19, 3, 1, 1))

    def forward(self, x):
        return SegOutput(logits=-((x.unsqueeze(1) - self.centres) ** 2).sum(2))


def test_evaluate_split_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    rows, labels, images = [], {}, {}
    palette = CITYSCAPES19.palette()
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for i in range(5):
        sample_id = f"city_{i:06d}_000019"
        label = rng.integers(0, 19, (12, 20)).astype(np.uint8)
        label[rng.random((12, 20)) < 0.2] = 255
        rgb = palette[label].copy()
        rgb[label == 255] = (1, 2, 3)  # ignored pixels: whatever the model says does not count
        write_rgb(tmp_path / "img" / f"{sample_id}.png", rgb)
        write_label_png(tmp_path / "lab" / f"{sample_id}.png", label)
        rows.append({"id": sample_id, "split": "val", "image": str(tmp_path / "img" / f"{sample_id}.png"),
                     "label": str(tmp_path / "lab" / f"{sample_id}.png"), "height": 12, "width": 20})
        labels[sample_id], images[sample_id] = label, rgb
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    pd.DataFrame(rows).to_csv(prepared / "index.csv", index=False)
    dataset = PreparedDataset(prepared, "val", Normalize(), seed=0)
    loader = DataLoader(dataset, batch_size=2, shuffle=False)
    model = ColourModel().eval()

    matrix, panels = evaluate_split([(model, 1.0)], loader, 19, "cpu", {"flip": True},
                                    panel_ids=3, progress=False)
    counts = np.bincount(np.concatenate([l.ravel() for l in labels.values()]), minlength=256)[:19]
    np.testing.assert_array_equal(matrix.numpy(), np.diag(counts))
    assert matrix.images == 5
    assert [p["id"] for p in panels] == [r["id"] for r in rows[:3]]
    for p in panels:
        np.testing.assert_array_equal(p["label"], labels[p["id"]])
        assert np.abs(p["image"].astype(int) - images[p["id"]].astype(int)).max() <= 1
        valid = labels[p["id"]] != 255
        np.testing.assert_array_equal(p["pred"][valid], labels[p["id"]][valid])

    wanted = {rows[4]["id"], rows[1]["id"]}
    _, panels = evaluate_split([(model, 1.0)], loader, 19, "cpu", None, panel_ids=wanted,
                               progress=False, panel_width=10)
    assert {p["id"] for p in panels} == wanted
    assert all(p["image"].shape == (6, 10, 3) and p["label"].shape == (6, 10) for p in panels)
    with pytest.raises(ValueError, match="classes"):
        evaluate_split([(model, 1.0)], loader, 16, "cpu", None, progress=False)
