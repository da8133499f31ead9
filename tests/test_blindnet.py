"""BlindNet (Ahn et al., CVPR 2024) and its RobustNet baselines (Choi et al., CVPR 2021): the
instance-normalised DeepLabV3+, the two photometric views, covariance alignment, IW / IRW / ISW with
its k-means selection, CWCL and SDCL, and both methods trained through the engine."""
from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lib.config import load_params, parse
from lib.data.classes import IGNORE
from lib.data.photometric import (
    ORIGINAL_VIEW,
    STYLE_VIEW,
    PhotometricParams,
    gaussian_blur,
    photometric_view,
)
from lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lib.errors import ConfigError
from lib.losses.contrastive import (
    DisentangleAnchors,
    class_wise_anchors,
    class_wise_nce,
    disentangle_anchors,
    disentangle_nce,
    vulnerable_pixels,
)
from lib.losses.covariance import (
    covariance,
    covariance_matching_loss,
    cross_covariance_loss,
    kmeans_1d,
    relaxed_margin,
    sensitive_mask,
    strict_upper,
    view_variance,
    whitening_loss,
)
from lib.methods.blindnet import BlindNet, BlindNetParams
from lib.methods.robustnet import RobustNet, RobustNetParams, StyleSelection
from lib.models import ModelParams, build_model
from lib.models.backbone import INSTANCE_NORM_FEATURES, residual_sum
from lib.models.files import load_checked
from lib.models.projection import ProjectionHead
from lib.models.resnet import BasicBlock, Bottleneck
from lib.models.weights import WeightsParams, import_weights, initialise, load_imported
from lib.table import find_training_row
from lib.train.checkpoint import STATE_FILE
from lib.train.loop import TrainParams, train
from lib.train.optim import OptimizerParams, ScheduleParams
from lib.train.stage import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
C = 5
NORMALIZE = (IMAGENET_MEAN, IMAGENET_STD)


def v3(**kw) -> ModelParams:
    return ModelParams(**{"arch": "deeplabv3plus", "depth": 18, "bn": "batch", "instance_norm": "in", **kw})


def instance_normed(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random maps with per-channel offsets, scales and cross-channel correlation, instance-normalised."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g)
    x = torch.einsum("dc,bchw->bdhw", mix, torch.randn(b, c, h, w, generator=g))
    scale = (0.5 + 5 * torch.rand(1, c, 1, 1, generator=g)) / x.std(dim=(0, 2, 3), keepdim=True)
    x = x * scale + torch.randn(1, c, 1, 1, generator=g) * 3
    return nn.functional.instance_norm(x)


# --- the model ------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [18, 50])
def test_instance_norm_maps_are_exposed_normalised_and_before_the_relu(depth):
    model = build_model(v3(depth=depth), C).train()
    out = model(torch.randn(2, 3, 65, 65) * 3 + 1)
    width = 1 if depth == 18 else 4
    expected = {"instance_norm_stem": (64, 33), "instance_norm_layer1": (64 * width, 17),
                "instance_norm_layer2": (128 * width, 9)}
    for name, (channels, size) in expected.items():
        f = out.features[name]
        assert f.shape == (2, channels, size, size)
        flat = f.detach().flatten(2)
        assert flat.mean(-1).abs().max() < 1e-4                           # zero mean per image and channel
        assert (flat.var(-1, unbiased=False) - 1).abs().max() < 1e-3    # unit variance (IN eps 1e-5)
    for stage in ("stem", "layer1", "layer2"):
        torch.testing.assert_close(out.features[stage], torch.relu(out.features[f"instance_norm_{stage}"]))
    assert set(INSTANCE_NORM_FEATURES) <= set(out.features)


def test_instance_norm_acts_per_image_in_eval_mode_too():
    model = build_model(v3(), C)
    x = torch.randn(2, 3, 33, 33)
    model.eval()
    with torch.no_grad():
        together = model(x).features["instance_norm_layer1"]
        alone = model(x[1:]).features["instance_norm_layer1"]
    torch.testing.assert_close(together[1:], alone)
    assert not any(isinstance(m, nn.InstanceNorm2d) and m.track_running_stats for m in model.modules())


@pytest.mark.parametrize("block", [BasicBlock(8, 8, 1, None), Bottleneck(32, 8, 1, None)], ids=["basic", "bottleneck"])
def test_residual_sum_is_the_block_before_its_final_relu(block):
    block.eval()
    x = torch.randn(2, block.conv1.in_channels, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(torch.relu(residual_sum(block, x)), block(x))


def test_default_model_has_no_instance_norm():
    plain = build_model(ModelParams(arch="deeplabv3plus", depth=18), C)
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in plain.modules())
    assert not any(k.startswith("backbone.instance_norms") for k in plain.state_dict())
    with torch.no_grad():
        assert not set(INSTANCE_NORM_FEATURES) & set(plain.eval()(torch.randn(1, 3, 33, 33)).features)


def test_affine_instance_norm_trains_with_the_backbone():
    model = build_model(v3(instance_norm="in_affine"), C)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 3 and all(m.affine for m in norms)
    backbone = {id(p) for p in model.backbone_parameters()}
    assert all(id(p) in backbone for m in norms for p in m.parameters())
    out = model(torch.randn(2, 3, 33, 33))
    out.logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in norms for p in m.parameters())
    plain = build_model(v3(), C)
    assert all(not list(m.parameters()) for m in plain.backbone.modules() if isinstance(m, nn.InstanceNorm2d))


@pytest.mark.parametrize("mode", ["in", "in_affine"])
def test_imagenet_file_loads_into_an_instance_norm_backbone(tmp_path, mode):
    path = tmp_path / "r18.pth"
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["bn1.weight"] = torch.rand(64) + 0.5
    torch.save(state, path)
    import_weights("r18", WeightsParams(format="torchvision", file=str(path)), tmp_path / "r18")
    imported, meta = load_imported(tmp_path / "r18")
    model = build_model(v3(instance_norm=mode), C)
    initialise(model, tmp_path / "r18", imported, meta)
    loaded = model.backbone.state_dict()
    for key, value in loaded.items():
        if key.startswith("instance_norms."):
            assert torch.equal(value, torch.ones_like(value) if key.endswith("weight") else torch.zeros_like(value))
        else:
            assert torch.equal(value, state[key]), key
    # the stem IN takes BN's gamma/beta by name and shape (RobustNet's loader) only when it is affine
    assert ("bn1.weight" in loaded) == (mode == "in_affine")
    assert "bn1.running_mean" not in loaded


@pytest.mark.parametrize("value, match", [
    ({"instance_norm": "in"}, r"instance_norm = 'in' exists for arch 'deeplabv3plus' only"),
    ({"arch": "deeplabv3plus", "instance_norm": "ibn"}, "model.instance_norm = 'ibn' is not one of"),
])
def test_instance_norm_params_errors(value, match):
    with pytest.raises(ConfigError, match=match) as err:
        parse(ModelParams, value, "model")
    assert "\n" not in str(err.value)


# --- photometric views --------------------------------------------------------------------------

def batch_in_unit_range(seed: int = 0, n: int = 3, size: tuple[int, int] = (24, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, *size, generator=g)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def view(images, params, seed):
    return photometric_view(images, IMAGENET_MEAN, IMAGENET_STD, params, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("params", [ORIGINAL_VIEW, STYLE_VIEW], ids=["original", "style"])
def test_views_are_pixel_aligned(params):
    """No photometric step moves a pixel: the view of a mirrored batch is the mirrored view (same
    draws), and a single bright dot stays the brightest pixel where it was."""
    images = batch_in_unit_range(1)
    flipped = view(images.flip(-1), params, 5)
    torch.testing.assert_close(flipped, view(images, params, 5).flip(-1), atol=1e-5, rtol=0)
    dots = torch.full((2, 3, 21, 29), 0.2)
    dots[0, :, 4, 7] = dots[1, :, 15, 22] = 1.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = view((dots - mean) / std, params, 2) * std + mean
    brightness = out.sum(1).flatten(1)
    assert brightness.argmax(1).tolist() == [4 * 29 + 7, 15 * 29 + 22]
    assert out.shape == dots.shape


def test_views_are_reproducible_and_the_two_views_differ():
    images = batch_in_unit_range(2)
    torch.testing.assert_close(view(images, STYLE_VIEW, 9), view(images, STYLE_VIEW, 9))
    g = torch.Generator().manual_seed(4)
    x = photometric_view(images, IMAGENET_MEAN, IMAGENET_STD, ORIGINAL_VIEW, g)
    x_a = photometric_view(images, IMAGENET_MEAN, IMAGENET_STD, STYLE_VIEW, g)
    assert (x - x_a).abs().mean() > 0.05
    # a fixed number of draws per image, whatever the jitter coin decided
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    photometric_view(images, IMAGENET_MEAN, IMAGENET_STD, ORIGINAL_VIEW, g1)
    photometric_view(images, IMAGENET_MEAN, IMAGENET_STD, STYLE_VIEW, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_view_without_jitter_or_blur_is_the_identity():
    identity = PhotometricParams(jitter_p=0.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                                 blur_sigma=(0.0, 0.0))
    images = batch_in_unit_range(3)
    torch.testing.assert_close(view(images, identity, 0), images, atol=1e-5, rtol=0)


def test_style_view_keeps_the_unit_range():
    out = view(batch_in_unit_range(4, n=8), STYLE_VIEW, 1)
    unit = out * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5


@pytest.mark.parametrize("sigma", [0.15, 0.7, 1.3])
def test_gaussian_blur_is_scipy_gaussian_filter_with_nearest_edges(sigma):
    image = torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(0))
    expected = np.stack([scipy.ndimage.gaussian_filter(c, sigma, mode="nearest", truncate=4.0)
                         for c in image.double().numpy()])
    np.testing.assert_allclose(gaussian_blur(image, sigma).numpy(), expected, atol=1e-5)


def test_photometric_params_need_every_key():
    with pytest.raises(ConfigError, match="missing key 'v.blur_sigma'"):
        parse(PhotometricParams, {"jitter_p": 0.5, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                                  "hue": 0.1}, "v")
    with pytest.raises(ConfigError, match="v.hue must be in"):
        parse(PhotometricParams, {"jitter_p": 0.5, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                                  "hue": 0.7, "blur_sigma": [0.1, 1.0]}, "v")


# --- covariance alignment --------------------------------------------------------------------------

@given(c=st.integers(2, 12), h=st.integers(4, 16), w=st.integers(4, 16), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_covariance_of_an_instance_normalised_map_has_a_unit_diagonal(c, h, w, seed):
    f = instance_normed(2, c, h, w, seed)
    diagonal = torch.diagonal(covariance(f), dim1=1, dim2=2)
    hw = h * w
    # IN divides by HW, Sigma by HW - 1: diag = HW/(HW-1) * var/(var + eps_IN) + eps
    assert (diagonal - 1).abs().max() <= 1 / (hw - 1) + 1e-4
    cov = covariance(f)
    torch.testing.assert_close(cov, cov.transpose(1, 2))


def test_cml_is_zero_for_identical_views_and_trains_the_style_view_only():
    f = instance_normed(2, 6, 8, 8, 0).requires_grad_()
    f_a = f.detach().clone().requires_grad_()
    assert float(covariance_matching_loss(f, f_a).detach()) == 0.0
    other = instance_normed(2, 6, 8, 8, 1).requires_grad_()
    loss = covariance_matching_loss(f, other)
    assert loss > 1e-3
    loss.backward()
    assert f.grad is None and other.grad is not None and other.grad.abs().sum() > 0


def test_ccl_is_zero_for_equal_views_and_one_for_uncorrelated_ones():
    f = instance_normed(2, 6, 32, 32, 0).requires_grad_()
    hw = 32 * 32
    same = cross_covariance_loss(f, f.detach().clone())
    assert float(same) <= (1 / (hw - 1) + 1e-5) ** 2 * 1.01          # HW/(HW-1) + eps vs 1
    assert float(cross_covariance_loss(f, -f.detach())) == pytest.approx(4.0, rel=1e-2)   # anti-correlated
    other = instance_normed(2, 6, 32, 32, 1).requires_grad_()
    loss = cross_covariance_loss(f, other)
    assert 0.5 < float(loss.detach()) < 1.5                          # diag near 0
    loss.backward()
    assert f.grad is None and other.grad.abs().sum() > 0


# --- RobustNet whitening --------------------------------------------------------------------------

def test_whitening_loss_on_hand_computed_values():
    f = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [1.0, -1.0, 1.0, -1.0]]).view(1, 3, 2, 2)
    cov = covariance(f, eps=0.0)[0]        # x^T x / 3: entries 4/3 (0,2), 0 (0,1), 0 (1,2)
    torch.testing.assert_close(cov[0, 2], torch.tensor(4 / 3))
    upper = strict_upper(3)
    assert upper.sum() == 3 and not upper.diagonal().any() and not upper.tril().any()
    f.requires_grad_()
    loss = whitening_loss(f, upper, eps=0.0)
    assert float(loss.detach()) == pytest.approx(4 / 9)
    loss.backward()
    assert f.grad.abs().sum() > 0
    assert float(whitening_loss(f.detach(), upper, margin=2.0, eps=0.0)) == 0.0       # IRW: below the margin
    assert float(whitening_loss(f.detach(), upper, margin=1.0, eps=0.0)) == pytest.approx(1 / 9)
    assert float(whitening_loss(f.detach(), torch.zeros(3, 3, dtype=torch.bool))) == 0.0
    assert relaxed_margin(512, 64) == math.floor(512 * 511 / 2 / 64) == 2044


def test_view_variance_is_half_the_squared_difference_on_the_upper_triangle():
    f, g = instance_normed(3, 4, 6, 6, 0), instance_normed(3, 4, 6, 6, 1)
    expected = ((covariance(f) - covariance(g)) ** 2 / 2).sum(0).triu(1)
    torch.testing.assert_close(view_variance(f, g), expected)
    assert torch.all(view_variance(f, g).tril() == 0)


def brute_force_sse(values: np.ndarray, k: int) -> float:
    s = np.sort(values)
    best = math.inf
    for cuts in itertools.combinations(range(1, len(s)), k - 1):
        parts = np.split(s, cuts)
        best = min(best, sum(((p - p.mean()) ** 2).sum() for p in parts))
    return best


@given(values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=12),
       k=st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_kmeans_1d_is_optimal(values, k):
    x = np.array(values)
    labels, centroids = kmeans_1d(x, k)
    k_eff = min(k, len(x))
    assert sorted(set(labels.tolist())) == list(range(k_eff))
    assert np.all(np.diff(centroids) >= -1e-9)                       # numbered by increasing centroid
    sse = sum(((x[labels == c] - x[labels == c].mean()) ** 2).sum() for c in range(k_eff))
    assert sse <= brute_force_sse(x, k_eff) + 1e-6 * (1 + abs(sse))
    np.testing.assert_allclose(centroids, [x[labels == c].mean() for c in range(k_eff)])


def test_kmeans_1d_separates_obvious_groups_at_scale():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros(40000), rng.normal(5, 0.1, 300), rng.normal(20, 0.1, 30)])
    labels, centroids = kmeans_1d(rng.permutation(x), 3)
    assert np.bincount(labels).tolist() == [40000, 300, 30]
    np.testing.assert_allclose(centroids, [0, 5, 20], atol=0.05)


def test_sensitive_mask_marks_the_entries_outside_the_lowest_cluster():
    rng = np.random.default_rng(1)
    variance = np.triu(rng.uniform(0, 0.01, (16, 16)), 1)
    hot = [(0, 5), (2, 9), (7, 8), (3, 15)]
    for i, (a, b) in enumerate(hot):
        variance[a, b] = 1.0 + 0.5 * (i % 2)                        # two levels above the noise
    mask = sensitive_mask(torch.from_numpy(variance).float(), clusters=3)
    assert mask.dtype == torch.bool and sorted(map(tuple, torch.nonzero(mask).tolist())) == sorted(hot)


def test_style_selection_is_the_and_over_trials():
    selection = StyleSelection([4])
    first, second = torch.zeros(4, 4), torch.zeros(4, 4)
    first[0, 1] = first[0, 2] = first[1, 3] = 1.0
    second[0, 1] = second[1, 3] = second[2, 3] = 1.0
    for v in (first, second):
        selection.add([v * 10], images=10)                          # mean = v
        selection.close_trial(clusters=2)
        assert int(selection.images) == 0 and float(selection.variance(0).abs().sum()) == 0
    assert int(selection.trials_done) == 2
    assert sorted(map(tuple, torch.nonzero(selection.mask(0)).tolist())) == [(0, 1), (1, 3)]


# --- CWCL ----------------------------------------------------------------------------------------

def test_class_wise_anchors_pick_valid_classes_and_balance_hard_and_easy():
    per, half = 10, 5
    y = torch.full((1, 8, 8), IGNORE)
    y[0, :2] = 3             # 16 px: valid (> 10)
    y[0, 2:4] = 1            # 16 px: valid
    y[0, 4, :] = 7           # 8 px: too few
    y[0, 5:, :] = 2          # 24 px, valid, but beyond max_classes (3 valid; the two lowest kept)
    y[0, 5, :3] = 1          # -> class 1 has 19 px
    p = y.clone()
    p[0, 0, :6] = 0          # class 3: 6 hard, 10 easy -> 5 + 5
    p[0, 2:4] = 0            # class 1: all 19 hard -> 10 hard
    index = class_wise_anchors(y, p, max_classes=2, per_class=per, negatives="intended",
                               generator=torch.Generator().manual_seed(0))
    assert index.shape == (1, 2 * per)
    flat_y, flat_p = y.flatten(1)[0], p.flatten(1)[0]
    first, second = index[0, :per], index[0, per:]
    assert set(flat_y[first].tolist()) == {1} and set(flat_y[second].tolist()) == {2}
    assert int((flat_p[first] == 1).sum()) == 3                     # only 3 easy: all of them + 7 hard
    y2 = y.clone()
    y2[0, 5:] = IGNORE                                           # now classes 1 and 3 are the valid ones
    index = class_wise_anchors(y2, p, max_classes=3, per_class=per, negatives="intended",
                               generator=torch.Generator().manual_seed(1))
    slot_3 = index[0, per:2 * per]
    assert set(y2.flatten()[slot_3].tolist()) == {3}
    assert int((p.flatten()[slot_3] != 3).sum()) == half         # 5 hard + 5 easy
    assert index[0].unique().numel() == 3 * per                   # the fill avoids sampled pixels


def test_class_wise_anchors_fill_and_none_without_valid_classes():
    y = torch.full((2, 6, 6), IGNORE)
    y[1, :3] = 4             # 18 px in image 1 only
    g = torch.Generator().manual_seed(0)
    index = class_wise_anchors(y, y.clone(), max_classes=3, per_class=6, negatives="as_executed", generator=g)
    assert index.shape == (2, 18)
    assert set(y[1].flatten()[index[1, :6]].tolist()) == {4}
    assert index.min() >= 0 and index.max() < 36                 # image 0: 18 random pixels of any label
    empty = torch.full((2, 6, 6), IGNORE)
    empty[0, 0, :2] = 1
    assert class_wise_anchors(empty, empty, 3, 6, "as_executed", g) is None


def embeddings(vectors: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(M, D) unit vectors laid out on a 1 x D x h x w map (row-major)."""
    return vectors.T.reshape(1, -1, h, w)


def test_cwcl_is_lowest_for_perfectly_separated_classes():
    """Intended negatives (other slots only): one direction per class is the minimum.  As executed,
    the same-class keys and k_m itself are negatives too, so the minimum is instance discrimination
    (every pixel its own direction, loss log 2) and separated classes pay log(1 + per_class)."""
    slots, per, t = 3, 4, 0.07
    classes = torch.arange(slots).repeat_interleave(per)
    separated = torch.eye(12)[classes]                                     # one orthogonal direction per class
    mixed = nn.functional.normalize(torch.eye(12)[(classes + torch.arange(12)) % 4] + 0.3, dim=1)
    index = torch.arange(12)[None]

    def loss(v, negatives):
        m = embeddings(v, 3, 4)
        return float(class_wise_nce(m, m, index, per, t, negatives))

    tail = (slots - 1) * per * math.exp(-1 / t)
    assert loss(separated, "intended") == pytest.approx(math.log(1 + tail), abs=1e-6)
    assert loss(mixed, "intended") > loss(separated, "intended") + 0.5
    assert loss(torch.ones(12, 12) / math.sqrt(12), "intended") == pytest.approx(math.log(1 + 8), rel=1e-5)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):                                                   # no arrangement beats it
        random = nn.functional.normalize(torch.randn(12, 12, generator=g), dim=1)
        assert loss(random, "intended") >= loss(separated, "intended")

    assert loss(separated, "as_executed") == pytest.approx(math.log(1 + per + tail), rel=1e-5)
    assert loss(torch.eye(12), "as_executed") == pytest.approx(math.log(2 + 11 * math.exp(-1 / t)), rel=1e-5)
    assert loss(torch.ones(12, 12) / math.sqrt(12), "as_executed") == pytest.approx(math.log(1 + 12), rel=1e-5)
    for _ in range(20):
        random = nn.functional.normalize(torch.randn(12, 12, generator=g), dim=1)
        assert loss(random, "as_executed") >= math.log(2) - 1e-6


def test_cwcl_trains_anchors_not_keys():
    q = nn.functional.normalize(torch.randn(2, 8, 4, 4), dim=1).requires_grad_()
    k = nn.functional.normalize(torch.randn(2, 8, 4, 4), dim=1).requires_grad_()
    index = torch.randint(16, (2, 6))
    class_wise_nce(q, k.detach(), index, 3, 0.07, "as_executed").backward()
    assert q.grad.abs().sum() > 0 and k.grad is None


# --- SDCL ----------------------------------------------------------------------------------------

def test_vulnerable_pixels_and_disentangle_anchors():
    y = torch.zeros(1, 4, 8, dtype=torch.long)
    y[0, :, 4:] = 1                                  # 16 px of class 1, 16 of class 0
    y[0, 0, 0] = IGNORE
    p = y.clone()
    p[0, 1, 1] = 2                                   # original view wrong there: not vulnerable
    p_a = p.clone()
    p_a[0, 0, 0] = 1                                 # ignored label: not vulnerable
    p_a[0, 2, 0] = p_a[0, 3, 0] = 1                  # class 0 pixels the style flips to 1
    p_a[0, 3, 1] = 2                                 # flipped to 2, which has no pixels in y: skipped
    v = vulnerable_pixels(y, p, p_a)
    assert sorted(torch.nonzero(v[0]).tolist()) == [[2, 0], [3, 0], [3, 1]]
    anchors = disentangle_anchors(y, p, p_a, num_negatives=5, max_anchors=100,
                                  generator=torch.Generator().manual_seed(0))
    assert sorted(anchors.pixel.tolist()) == [2 * 8, 3 * 8]
    assert anchors.negatives.shape == (2, 5)
    assert torch.equal(anchors.negatives[0], anchors.negatives[1])        # one draw per (image, class)
    assert (y.flatten()[anchors.negatives] == 1).all()
    assert disentangle_anchors(y, p, p_a, num_negatives=17, max_anchors=100,
                               generator=torch.Generator()) is None        # only 16 pixels of class 1
    capped = disentangle_anchors(y, p, p_a, 5, max_anchors=1, generator=torch.Generator().manual_seed(0))
    assert len(capped.pixel) == 1


def test_sdcl_prefers_anchors_away_from_the_wrong_class():
    t = 0.07
    anchors = DisentangleAnchors(torch.tensor([0]), torch.tensor([0]), torch.tensor([[1, 2, 3]]))
    k = embeddings(torch.eye(4), 2, 2)
    disentangled = embeddings(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]]), 2, 2)
    confused = embeddings(torch.tensor([[0.0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]]), 2, 2)
    low = float(disentangle_nce(disentangled, k, anchors, t))
    assert low == pytest.approx(math.log(1 + 3 * math.exp(-1 / t)), abs=1e-6)
    assert float(disentangle_nce(confused, k, anchors, t)) > low + 1
    q = confused.clone().requires_grad_()
    key = k.clone().requires_grad_()
    disentangle_nce(q, key.detach(), anchors, t).backward()
    assert key.grad is None
    grads = q.grad[0].flatten(1).T.abs().sum(1)
    assert (grads > 0).tolist() == [True, True, True, True]              # anchor and its negatives (q)


# --- the methods, one step ------------------------------------------------------------------------

def labelled_batch(seed: int = 0, n: int = 2, size: tuple[int, int] = (32, 64)) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, *size, generator=g)
    label = torch.zeros(n, *size, dtype=torch.long)
    label[:, size[0] // 2:] = 1
    label[:, :, size[1] // 2:] += 2
    label[:, :4] = IGNORE
    image[:, 0] += label.clamp(max=3).float()                   # something to learn
    return {"image": image, "label": label}


SMALL = dict(max_classes=4, anchors_per_class=4)
LARGER = (64, 128)     # layer4's 4 x 8 grid holds classes with more than 4 pixels


def test_blindnet_step_trains_model_and_heads():
    torch.manual_seed(0)
    method = BlindNet(build_model(v3(), C), BlindNetParams(**SMALL), NORMALIZE)
    losses = method.training_step({"source": labelled_batch(size=LARGER)}, 0)
    assert set(losses) == {"seg", "seg_aux", "cml", "ccl", "cwcl", "sdcl"}
    assert all(math.isfinite(float(v)) and not v.requires_grad for v in losses.values())
    assert float(losses["cwcl"]) > 0
    starved = [n for n, p in [*method.model.named_parameters(), *method.heads.named_parameters()]
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not starved
    assert {"model", "projection"} == set(method.modules())
    group_ids = {id(p) for g in method.param_groups()["model"] for p in g.params}
    assert all(id(p) in group_ids for p in method.heads.parameters())


def test_blindnet_original_view_gets_no_gradient_from_alignment_or_contrast():
    torch.manual_seed(0)
    method = BlindNet(build_model(v3(), C), BlindNetParams(**SMALL), NORMALIZE)
    batch = labelled_batch(1, size=LARGER)
    out, out_a = method.model(batch["image"]), method.model(batch["image"] + 0.5)
    for o in (out, out_a):
        for f in o.features.values():
            f.retain_grad()
    terms = {**method.covariance_alignment(out, out_a),
             **method.semantic_contrast(out, out_a, batch["label"], torch.Generator().manual_seed(0))}
    assert set(terms) == {"cml", "ccl", "cwcl", "sdcl"}
    sum(terms.values()).backward()
    for name in (*INSTANCE_NORM_FEATURES, "layer4", "embedding"):
        assert out.features[name].grad is None or out.features[name].grad.abs().sum() == 0, name
        assert out_a.features[name].grad.abs().sum() > 0, name


def test_blindnet_without_contrast_or_alignment_drops_those_terms():
    torch.manual_seed(0)
    params = BlindNetParams(cml_weight=0.0, ccl_weight=0.0, cwcl_weight=0.0, sdcl_weight=0.0)
    method = BlindNet(build_model(v3(instance_norm="none"), C), params, NORMALIZE)
    assert set(method.training_step({"source": labelled_batch()}, 0)) == {"seg", "seg_aux"}


@pytest.mark.parametrize("model_kw, params, match", [
    ({"arch": "deeplabv2", "instance_norm": "none"}, {}, "needs model.arch deeplabv3plus"),
    ({"instance_norm": "none"}, {}, "needs model.instance_norm: in"),
])
def test_blindnet_refuses_models_without_its_features(model_kw, params, match):
    with pytest.raises(ConfigError, match=match):
        BlindNet(build_model(v3(**model_kw), C), BlindNetParams(**params), NORMALIZE)


def test_blindnet_params_validation():
    with pytest.raises(ConfigError, match="blindnet.temperature must be > 0"):
        parse(BlindNetParams, {"temperature": 0.0}, "blindnet")
    with pytest.raises(ConfigError, match="is not one of"):
        parse(BlindNetParams, {"cwcl_negatives": "fixed"}, "blindnet")


@pytest.mark.parametrize("whitening, weight", [("iw", 0.8), ("irw", 0.6)])
def test_robustnet_iw_and_irw_are_on_from_the_start(whitening, weight):
    torch.manual_seed(0)
    method = RobustNet(build_model(v3(), C), RobustNetParams(whitening=whitening, whitening_weight=weight),
                       NORMALIZE)
    losses = method.training_step({"source": labelled_batch()}, 0)
    assert set(losses) == {"seg", "seg_aux", "whitening"} and float(losses["whitening"]) > 0
    assert set(method.modules()) == {"model"}


def test_robustnet_baseline_and_ibn_have_no_whitening():
    for mode in ("none", "in_affine"):
        method = RobustNet(build_model(v3(instance_norm=mode), C), RobustNetParams(whitening="none"), NORMALIZE)
        assert set(method.training_step({"source": labelled_batch()}, 0)) == {"seg", "seg_aux"}
    with pytest.raises(ConfigError, match="needs model.instance_norm: in"):
        RobustNet(build_model(v3(instance_norm="none"), C), RobustNetParams(whitening="isw"), NORMALIZE)


def test_projection_head_outputs_unit_vectors():
    head = ProjectionHead(12, 6)
    z = head(torch.randn(2, 12, 3, 5))
    assert z.shape == (2, 6, 3, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 3, 5), atol=1e-5, rtol=0)
    assert all(torch.all(conv.bias == 0) for conv in (head.net[0], head.net[2]))


# --- through the engine --------------------------------------------------------------------------

def stream(seed: int):
    """Batch t depends only on (seed, t), like the real loaders."""
    def factory(start: int):
        for t in itertools.count(start):
            batch = labelled_batch(seed * 1000 + t)
            yield {**batch, "id": [f"{t}a", f"{t}b"]}
    return factory


def run(tmp_path: Path, method_factory, iters: int, crash_at: int | None = None) -> dict:
    torch.manual_seed(0)
    method = method_factory()
    if crash_at is not None:
        step = method.training_step

        def crashing(batch, it):
            if it == crash_at:
                raise KeyboardInterrupt
            return step(batch, it)
        method.training_step = crashing
    train(method, {"source": stream(1)}, TrainParams(iters=iters, checkpoint_every=2, log_every=1),
          {"model": OptimizerParams(type="sgd", lr=0.01, head_lr_mult=1.0)}, ScheduleParams(power=0.9),
          tmp_path / "ckpt", tmp_path / "live", "fp")
    return {name: module.state_dict() for name, module in method.modules().items()}


def blindnet():
    return BlindNet(build_model(v3(), C), BlindNetParams(**SMALL), NORMALIZE)


DRAWN_FRAMES = []


def frames(count: int, seed: list[int]):
    """Whole source frames as the stage hands them (distinct per seed, 40x56, one at a time)."""
    DRAWN_FRAMES.append((count, list(seed)))
    g = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    for _ in range(count):
        yield torch.randn(1, 3, 40, 56, generator=g)


def isw():
    return RobustNet(build_model(v3(), C), RobustNetParams(statistics_iter=1, trials=2, trial_images=3),
                     NORMALIZE, frames, seed=7)


def test_blindnet_trains_through_the_engine(tmp_path):
    state = run(tmp_path, blindnet, 4)
    for name in ("seg", "seg_aux", "cml", "ccl", "cwcl", "sdcl"):
        table = pd.read_csv(tmp_path / f"live/plots/metrics/train/loss/{name}.tsv", sep="\t")
        assert list(table["step"]) == [1, 2, 3, 4] and np.isfinite(table[name]).all()
    saved = load_checked(tmp_path / "ckpt" / STATE_FILE, "training checkpoint")
    assert set(saved["modules"]) == {"model", "projection"} and saved["iteration"] == 4
    assert set(state) == {"model", "projection"}


def test_isw_measures_then_whitens_through_the_engine(tmp_path):
    """The statistics phase runs whole at iteration 1 (two trials of 3 frames each, drawn with the
    seeds (7, 0) and (7, 1)); the whitening term is on from that iteration (logged as steps 2 to 6)."""
    DRAWN_FRAMES.clear()
    state = run(tmp_path, isw, 6)
    assert DRAWN_FRAMES == [(3, [7, 0]), (3, [7, 1])]
    table = pd.read_csv(tmp_path / "live/plots/metrics/train/loss/whitening.tsv", sep="\t")
    assert list(table["step"]) == [2, 3, 4, 5, 6]
    selection = state["selection"]
    assert int(selection["trials_done"]) == 2
    for i, channels in enumerate((64, 64, 128)):
        mask = selection[f"mask_{i}"]
        assert 0 < int(mask.sum()) < channels * (channels - 1) // 2 and not mask.tril().any()


def test_isw_statistics_leave_the_weights_and_modes_as_they_were():
    """RobustNet measures with the weights fixed: no parameter, BatchNorm statistic or module mode moves."""
    torch.manual_seed(0)
    method = isw()
    method.model.train()
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    method.measure_styles(torch.device("cpu"))
    assert int(method.selection.trials_done) == 2 and method.selection_ready
    assert all(torch.equal(before[k], v) for k, v in method.model.state_dict().items())
    assert all(m.training for m in method.model.modules())
    with pytest.raises(ConfigError, match="measures its statistics on source frames"):
        RobustNet(build_model(v3(), C), RobustNetParams(), NORMALIZE)


@pytest.mark.parametrize("factory", [blindnet, isw], ids=["blindnet", "isw"])
def test_resume_equals_uninterrupted(tmp_path, factory):
    """The views and samplers draw from the global RNG and ISW's statistics are checkpointed, so a
    run killed at iteration 3 (checkpoint at 2) and resumed ends with the same state.

    On one intra-op thread: with two, even two uninterrupted BlindNet runs differ bitwise (measured;
    some multi-threaded CPU kernel on its path is not deterministic, cause not yet found), so
    exactness could not be asserted there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = run(tmp_path / "straight", factory, 4)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "resumed", factory, 4, crash_at=3)
        resumed = run(tmp_path / "resumed", factory, 4)
    finally:
        torch.set_num_threads(threads)
    for module in straight:
        for key, value in straight[module].items():
            assert torch.equal(value, resumed[module][key]), (module, key)


def blindnet_preset_params(tmp_path: Path) -> dict:
    """params.yaml with presets/synthetic_blindnet.yaml applied (in a copy)."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    subprocess.run([sys.executable, "-m", "lib.preset", str(ROOT / "presets/synthetic_blindnet.yaml"),
                    "--params", str(tmp_path / "params.yaml")], cwd=tmp_path, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return load_params(tmp_path / "params.yaml")


def test_params_yaml_sections_parse(tmp_path):
    params = blindnet_preset_params(tmp_path)
    recipe, blind = parse_recipe(find_training_row(params, "blindnet"))
    assert blind == BlindNetParams()          # the paper's values throughout
    assert recipe.model.arch == "deeplabv3plus" and recipe.model.instance_norm == "in"
    # the same recipe under either method's name parses that method's params (RobustNet: its defaults)
    for method, cls in (("blindnet", BlindNetParams), ("robustnet", RobustNetParams)):
        table = {**params, "recipes": {**params["recipes"], method: params["recipes"]["blindnet"]},
                 "models": {"row": {"recipe": method, "from": "scratch"}}, "selftrained": {}}
        _, parsed = parse_recipe(find_training_row(table, "row"))
        assert isinstance(parsed, cls)
    # the control: the same network without instance normalisation, plain cross-entropy
    control, plain = parse_recipe(find_training_row(params, "source_only"))
    assert control.model.arch == "deeplabv3plus" and control.model.instance_norm == "none"
    assert plain.aux_weight == 0.4
