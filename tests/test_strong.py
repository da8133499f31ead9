"""Strong views and their geometry, CutMix boxes and paste: CPSL's (Li et al., CVPR 2022) strong view
and the CutMix of its stage 1."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.data import strong
from lib.data.classes import IGNORE
from lib.data.strong import (
    Geometry,
    StrongParams,
    box_mask,
    cutmix_boxes,
    paste,
    strong_view,
    valid_mask,
    warp,
)
from lib.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NOTHING = StrongParams(flip_p=0.0, blur_p=0.0, jitter_p=0.0, op_p=0.0, cutout=0.0)
GEOMETRIC_ONLY = StrongParams(blur_p=0.0, jitter_p=0.0, op_p=1.0)   # with the photometric pool patched out
FAST = settings(max_examples=20, deadline=None)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def geometry_of(matrix: torch.Tensor, size, boxes=None) -> Geometry:
    """A one-sample geometry from a (3, 3) output -> input matrix."""
    box = torch.zeros(1, 4) if boxes is None else torch.tensor([boxes], dtype=torch.float32)
    return Geometry(matrix[:2].float()[None], box, tuple(size))


def coordinate_maps(n: int, height: int, width: int):
    """Label map 256 + i*W + j (never IGNORE) and an image whose channels 0, 1 are the pixel-centre
    coordinates (i + 0.5)/H, (j + 0.5)/W, channel 2 a constant 0.5."""
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    label = (256 + i * width + j).expand(n, height, width).clone()
    image = torch.stack([(i + 0.5) / height, (j + 0.5) / width, torch.full((height, width), 0.5)])
    return label, image.expand(n, 3, height, width).clone()


def block_labels(n: int, height: int, width: int, block: int, seed: int) -> torch.Tensor:
    blocks = torch.randint(0, 19, (n, height // block, width // block), generator=seeded(seed))
    return blocks.repeat_interleave(block, 1).repeat_interleave(block, 2)


def down(maps: torch.Tensor, size) -> torch.Tensor:
    """Pixel-centre nearest downsampling of (N, H, W) maps (what the methods use)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="nearest-exact")[:, 0].to(maps.dtype)


@pytest.fixture
def no_photometric(monkeypatch):
    monkeypatch.setattr(strong, "_PHOTOMETRIC", {name: (lambda x, v: x) for name in strong._PHOTOMETRIC})


# ---------------------------------------------------------------------------------- params
def test_defaults_follow_the_spec_and_validate():
    p = StrongParams()
    p.validate("strong")
    assert (p.flip_p, p.blur_p, p.jitter_p, p.jitter, p.ops, p.op_p) == (0.5, 0.5, 0.5, 0.4, 2, 0.5)
    assert (p.max_rotate, p.max_shear, p.max_translate) == (27.0, 0.27, 0.27)
    assert strong._geometric_value("rotate", 9, -1.0, p) == pytest.approx(-27.0)
    assert strong._geometric_value("shear_x", 1, 1.0, p) == pytest.approx(0.03)   # FixMatch v·0.3/10


@pytest.mark.parametrize("change", [{"flip_p": 1.5}, {"ops": -1}, {"jitter": 0.6}, {"cutout": -0.1},
                                    {"max_rotate": 200.0}, {"blur_sigma": 0.0}, {"fill": 2.0}])
def test_bad_params_are_one_line_config_errors(change):
    with pytest.raises(ConfigError) as err:
        StrongParams(**change).validate("selftrain.cpsl_stage1.strong")
    message = str(err.value)
    assert "\n" not in message and f"selftrain.cpsl_stage1.strong.{next(iter(change))}" in message


# ---------------------------------------------------------------------------- the operations
def test_nothing_drawn_is_the_identity():
    x = normalise(torch.rand(3, 3, 20, 28, generator=seeded(0)))
    out, geometry = strong_view(x, MEAN, STD, NOTHING, seeded(1))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    identity = Geometry.identity(3, (20, 28))
    assert torch.equal(geometry.theta, identity.theta) and torch.equal(geometry.boxes, identity.boxes)
    assert geometry.size == identity.size == (20, 28)
    label = block_labels(3, 20, 28, 4, 2)
    assert torch.equal(warp(label, geometry), label)
    soft = torch.rand(3, 5, 10, 14, generator=seeded(3))
    torch.testing.assert_close(warp(soft, geometry), soft, atol=1e-5, rtol=0)
    assert valid_mask(geometry, (5, 7)).all()


def test_photometric_values_are_fixmatchs():
    x = torch.tensor([0.05, 0.7, 0.9]).view(3, 1, 1).expand(3, 4, 4)
    ops = strong._PHOTOMETRIC
    torch.testing.assert_close(ops["brightness"](x, 3), 0.32 * x)                   # 3·0.9/10 + 0.05
    torch.testing.assert_close(ops["posterize"](x, 1)[1], torch.full((4, 4), 11 / 16))  # 4 bits
    torch.testing.assert_close(ops["posterize"](x, 9)[1], torch.full((4, 4), 89 / 128))  # 7 bits
    solarized = ops["solarize"](torch.tensor([0.05, 0.1018, 0.9]).view(3, 1, 1), 9)   # threshold 26/255
    torch.testing.assert_close(solarized.flatten(), torch.tensor([0.05, 0.1018, 0.1]))


def test_flip_mirrors_and_twice_is_identity():
    label = block_labels(1, 6, 10, 1, 0)
    flip = geometry_of(strong._op_matrix("flip", 0.0, (6, 10)), (6, 10))
    once = warp(label, flip)
    assert torch.equal(once, label.flip(-1))
    assert torch.equal(warp(once, flip), label)


def test_rotate_90_is_a_counter_clockwise_quarter_turn():
    label = torch.arange(64).view(1, 8, 8)
    rotate = geometry_of(strong._op_matrix("rotate", 90.0, (8, 8)), (8, 8))
    assert torch.equal(warp(label, rotate, fill=-1), torch.rot90(label, 1, dims=(1, 2)))


def test_translate_x_shifts_by_the_fraction_of_the_width():
    label = torch.arange(48).view(1, 6, 8)
    out = warp(label, geometry_of(strong._op_matrix("translate_x", 0.25, (6, 8)), (6, 8)))
    assert torch.equal(out[..., :6], label[..., 2:])
    assert (out[..., 6:] == IGNORE).all()


def test_shear_acts_in_pixels_about_the_centre_of_a_non_square_image():
    height, width = 9, 15                       # centre (4, 7)
    label = torch.arange(height * width).view(1, height, width)
    out = warp(label, geometry_of(strong._op_matrix("shear_x", 1.0, (height, width)), (height, width)))
    for i in range(height):
        for j in range(width):
            source = j + (i - 4)                # x_in = x_out + 1·y_out about the centre
            expected = label[0, i, source] if 0 <= source < width else IGNORE
            assert out[0, i, j] == expected


def test_rotation_stays_rigid_on_a_non_square_crop():
    height, width = 20, 50
    geometry = geometry_of(strong._op_matrix("rotate", 27.0, (height, width)), (height, width))
    grid = F.affine_grid(geometry.theta, [1, 1, height, width], align_corners=False)[0].double()
    pixels = torch.stack([((grid[..., 0] + 1) * width - 1) / 2, ((grid[..., 1] + 1) * height - 1) / 2], -1)
    step_x = (pixels[:, 1:] - pixels[:, :-1]).norm(dim=-1)
    step_y = (pixels[1:] - pixels[:-1]).norm(dim=-1)
    torch.testing.assert_close(step_x, torch.ones_like(step_x), atol=1e-5, rtol=0)   # float32 grid
    torch.testing.assert_close(step_y, torch.ones_like(step_y), atol=1e-5, rtol=0)
    angle = math.degrees(math.atan2(pixels[0, 1, 1] - pixels[0, 0, 1], pixels[0, 1, 0] - pixels[0, 0, 0]))
    assert angle == pytest.approx(27.0)


def test_geometry_composes_in_the_order_the_image_goes_through():
    """flip, then the drawn ops in order: input = A_flip(A_rotate(A_translate(output)))."""
    height, width = 16, 40
    draw = strong._Draw(flip=True, blur=False, jitter=(), cutout=(0, 0, 0, 0),
                        ops=(("rotate", 9, 1.0), ("brightness", 4, 1.0), ("translate_x", 9, -1.0)))
    theta = strong._theta(draw, (height, width), StrongParams())[None].float()
    grid = F.affine_grid(theta, [1, 1, height, width], align_corners=False)[0].double()
    got = torch.stack([((grid[..., 0] + 1) * width - 1) / 2, ((grid[..., 1] + 1) * height - 1) / 2], -1)
    i, j = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    u, v = j - (width - 1) / 2 - 0.27 * width, i - (height - 1) / 2       # translate by -27 % of W
    a = math.radians(27.0)                                                # rotate by the level-9 maximum
    u, v = math.cos(a) * u - math.sin(a) * v, math.sin(a) * u + math.cos(a) * v
    expected = torch.stack([-u + (width - 1) / 2, v + (height - 1) / 2], -1)   # mirror
    torch.testing.assert_close(got, expected.double(), atol=1e-4, rtol=0)


def test_out_of_frame_and_cutout_become_ignore_and_invalid():
    label = torch.arange(64).view(1, 8, 8)
    shift = torch.eye(3)
    shift[0, 2] = 1.0                           # output x samples input x + 1 (half the width)
    geometry = geometry_of(shift, (8, 8), boxes=(0.25, 0.0, 0.5, 0.25))   # rows 2-3, cols 0-1
    out = warp(label, geometry)
    expected = torch.full((1, 8, 8), IGNORE)
    expected[..., :4] = label[..., 4:]
    expected[:, 2:4, :2] = IGNORE
    assert torch.equal(out, expected)
    assert torch.equal(valid_mask(geometry, (8, 8)), expected != IGNORE)
    soft = warp(torch.rand(1, 3, 8, 8) + 1.0, geometry, fill=0.0)
    assert torch.equal(soft[:, 0] == 0, expected == IGNORE)
    # the same box at half resolution: centres of pixel row 1 and col 0 fall inside it
    half = valid_mask(geometry, (4, 4))
    assert not half[0, 1, 0] and half[0, 0, 0] and half[0, 2, 0] and not half[0, 0, 2]


def test_gradients_flow_through_warp_to_the_kept_pixels():
    features = torch.rand(2, 4, 6, 8, requires_grad=True)
    geometry = Geometry(torch.eye(2, 3).expand(2, 2, 3).clone(),
                        torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]), (12, 16))
    warp(features, geometry).sum().backward()
    expected = valid_mask(geometry, (6, 8)).float()[:, None].expand(2, 4, 6, 8)
    torch.testing.assert_close(features.grad, expected)


# ---------------------------------------------------------------------- strong views, aligned
def test_image_and_maps_stay_aligned_through_strong_view(no_photometric):
    n, height, width = 8, 24, 40
    label, image = coordinate_maps(n, height, width)
    moved = 0
    for seed in range(6):
        out, geometry = strong_view(normalise(image), MEAN, STD, GEOMETRIC_ONLY, seeded(seed))
        out = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        warped = warp(label, geometry)
        valid = valid_mask(geometry, (height, width))
        assert torch.equal(warped == IGNORE, ~valid)
        # the image's frame and cutout are exactly the maps': fill grey there, untouched grey elsewhere
        torch.testing.assert_close(out[:, 2][~valid], torch.full_like(out[:, 2][~valid], 127 / 255))
        torch.testing.assert_close(out[:, 2][valid], torch.full_like(out[:, 2][valid], 0.5))
        rows = (warped[valid] - 256) // width
        cols = (warped[valid] - 256) % width
        assert ((out[:, 0][valid] * height - 0.5 - rows).abs() <= 0.5 + 1e-3).all()
        assert ((out[:, 1][valid] * width - 0.5 - cols).abs() <= 0.5 + 1e-3).all()
        moved += int((geometry.theta - torch.eye(2, 3)).abs().amax(dim=(1, 2)).gt(1e-3).sum())
    assert moved >= 20    # flips, rotations, shears and translations were all exercised


@FAST
@given(seed=st.integers(0, 2**31))
def test_inverse_geometry_recovers_the_in_frame_region(seed):
    n, height, width = 4, 20, 36
    _, geometry = strong_view(torch.zeros(n, 3, height, width), MEAN, STD,
                              StrongParams(op_p=1.0, cutout=0.0), seeded(seed))
    i, j = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    coords = torch.stack([i, j]).expand(n, 2, height, width)
    back = warp(warp(coords, geometry, fill=float("nan")), geometry.inverse(), fill=float("nan"))
    kept = ~back.isnan()
    error = (back - coords)[kept].abs()
    assert kept.float().mean() > 0.2
    assert (error <= 1.5).all() and (error < 1e-3).float().mean() > 0.8


def test_cutout_is_a_grey_square_of_a_third_of_the_short_side():
    n, height, width = 16, 32, 45            # side int(32 / 3) = 10 px (CPSL: 170 px on 512)
    out, geometry = strong_view(normalise(torch.rand(n, 3, height, width, generator=seeded(0))), MEAN, STD,
                                StrongParams(flip_p=0.0, blur_p=0.0, jitter_p=0.0, op_p=0.0), seeded(1))
    pixels = (geometry.boxes * torch.tensor([height, width, height, width])).round().long()
    y0, x0, y1, x1 = pixels.unbind(1)
    assert ((0 <= y0) & (y0 < y1) & (y1 <= height) & (0 <= x0) & (x0 < x1) & (x1 <= width)).all()
    assert ((y1 - y0 <= 10) & (x1 - x0 <= 10)).all()
    inner = (y0 > 0) & (y1 < height) & (x0 > 0) & (x1 < width)
    assert inner.any() and ((y1 - y0 == 10) & (x1 - x0 == 10))[inner].all()
    grey = (out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1) - 127 / 255)
    holes = ~valid_mask(geometry, (height, width))
    assert (grey.abs().amax(1)[holes] < 1e-5).all() and holes.sum() == ((y1 - y0) * (x1 - x0)).sum()
    _, none = strong_view(torch.zeros(2, 3, 9, 9), MEAN, STD, NOTHING, seeded(0))
    assert (none.boxes == 0).all()


@FAST
@given(seed=st.integers(0, 2**31))
def test_quarter_resolution_maps_follow_the_full_resolution_warp(seed):
    n, height, width = 2, 64, 96
    label = block_labels(n, height, width, 16, seed)
    _, geometry = strong_view(torch.zeros(n, 3, height, width), MEAN, STD, StrongParams(op_p=1.0),
                              seeded(seed))
    affine = Geometry(geometry.theta, torch.zeros_like(geometry.boxes), geometry.size)
    full = warp(label, affine)
    quarter = warp(down(label, (16, 24)), affine)
    same = quarter == full[:, 2::4, 2::4]
    assert same.float().mean() > 0.65
    # a disagreement is only a displacement of a few full-resolution pixels (frame edge included)
    window = F.pad(full, (4, 4, 4, 4), value=-1).unfold(1, 9, 4).unfold(2, 9, 4)   # (n, 16, 24, 9, 9)
    assert (window == quarter[..., None, None]).flatten(-2).any(-1).all()
    # the cutout is exact: the quarter-resolution box is the nearest-downsampled full box
    cut_full = strong._cutout_mask(geometry, (height, width), torch.device("cpu"))
    assert torch.equal(strong._cutout_mask(geometry, (16, 24), torch.device("cpu")), down(cut_full, (16, 24)))


# ------------------------------------------------------------------------- randomness, devices
@FAST
@given(seed=st.integers(0, 2**31))
def test_same_seed_same_view_other_seed_other_view(seed):
    x = normalise(torch.rand(2, 3, 16, 24, generator=seeded(7)))
    a, ga = strong_view(x, MEAN, STD, StrongParams(), seeded(seed))
    b, gb = strong_view(x, MEAN, STD, StrongParams(), seeded(seed))
    assert torch.equal(a, b) and torch.equal(ga.theta, gb.theta) and torch.equal(ga.boxes, gb.boxes)
    c, gc = strong_view(x, MEAN, STD, StrongParams(), seeded(seed + 1))
    assert not torch.equal(a, c)


@FAST
@given(seed=st.integers(0, 2**31))
def test_draws_stay_in_the_spec_ranges(seed):
    draws = strong._draw(6, (32, 48), StrongParams(jitter_p=1.0, op_p=1.0), seeded(seed))
    for d in draws:
        assert len(d.ops) == 2 and len(d.jitter) == 4
        assert all(op in strong.POOL and 1 <= level <= 9 and sign in (-1.0, 1.0) for op, level, sign in d.ops)
        factors = {adjust.__name__: f for adjust, f in d.jitter}
        assert all(0.6 <= factors[k] <= 1.4 for k in ("adjust_brightness", "adjust_contrast",
                                                       "adjust_saturation"))
        assert -0.4 <= factors["adjust_hue"] <= 0.4


def test_autocast_does_not_change_the_view():
    x = normalise(torch.rand(2, 3, 16, 24, generator=seeded(0)))
    plain, _ = strong_view(x, MEAN, STD, StrongParams(op_p=1.0), seeded(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = strong_view(x.bfloat16(), MEAN, STD, StrongParams(op_p=1.0), seeded(3))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, atol=0.05, rtol=0)   # only the bf16 input rounding differs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_view_matches_cpu_view():
    x = normalise(torch.rand(4, 3, 32, 48, generator=seeded(0)))
    params = StrongParams(op_p=1.0)
    cpu, g_cpu = strong_view(x, MEAN, STD, params, seeded(5))
    gpu, g_gpu = strong_view(x.cuda(), MEAN, STD, params, seeded(5))
    torch.testing.assert_close(g_gpu.theta.cpu(), g_cpu.theta)
    assert torch.equal(g_gpu.boxes.cpu(), g_cpu.boxes)
    assert (gpu.cpu() - cpu).abs().gt(1e-3).float().mean() < 0.01   # equalize may bin a few values apart
    label = block_labels(4, 32, 48, 8, 0)
    assert torch.equal(warp(label.cuda(), g_gpu).cpu(), warp(label, g_cpu))


# ------------------------------------------------------------------------------------ CutMix
@FAST
@given(n=st.integers(1, 4), height=st.integers(8, 300), width=st.integers(8, 300), seed=st.integers(0, 2**31))
def test_cutmix_boxes_cover_half_the_crop_inside_it(n, height, width, seed):
    boxes = cutmix_boxes(n, height, width, seeded(seed), p=1.0)
    assert boxes.dtype == torch.long and boxes.shape == (n, 4)
    y0, x0, y1, x1 = boxes.unbind(1)
    assert ((0 <= y0) & (y0 < y1) & (y1 <= height) & (0 <= x0) & (x0 < x1) & (x1 <= width)).all()
    area = (y1 - y0) * (x1 - x0)
    assert ((area - 0.5 * height * width).abs() <= 0.5 * (height + width) + 0.25).all()
    assert ((y1 - y0) >= 0.5 * height - 0.5).all() and ((x1 - x0) >= 0.5 * width - 0.5).all()


def test_cutmix_height_fraction_is_half_to_the_power_of_a_uniform():
    boxes = cutmix_boxes(2000, 512, 896, seeded(0), p=1.0)
    exponent = torch.log2(512 / (boxes[:, 2] - boxes[:, 0]).double())    # u in 0.5**u
    assert exponent.min() < 0.02 and exponent.max() > 0.98
    assert abs(exponent.mean() - 0.5) < 0.03 and abs((exponent < 0.25).double().mean() - 0.25) < 0.04


def test_cutmix_coin_is_per_batch_and_draws_a_fixed_amount():
    g = seeded(0)
    applied = [bool(cutmix_boxes(3, 40, 60, g).any()) for _ in range(400)]
    assert 0.4 < sum(applied) / 400 < 0.6
    assert not cutmix_boxes(3, 40, 60, seeded(1), p=0.0).any()
    a, b = seeded(2), seeded(2)
    cutmix_boxes(3, 40, 60, a, p=0.0)
    cutmix_boxes(3, 40, 60, b, p=1.0)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_paste_replaces_exactly_the_box():
    dst, src = torch.zeros(2, 3, 6, 8), torch.ones(2, 3, 6, 8)
    boxes = torch.tensor([[1, 2, 4, 5], [0, 0, 0, 0]])
    out = paste(dst, src, boxes)
    expected = torch.zeros(2, 3, 6, 8)
    expected[0, :, 1:4, 2:5] = 1
    assert torch.equal(out, expected) and not dst.any()
    labels = paste(torch.full((2, 6, 8), 7), torch.full((2, 6, 8), IGNORE), boxes)
    assert torch.equal(labels == IGNORE, expected[:, 0].bool())
    assert torch.equal(paste(dst, src, None), dst)
    with pytest.raises(ValueError):
        paste(dst, torch.ones(2, 3, 6, 9), boxes)


@FAST
@given(seed=st.integers(0, 2**31), factor=st.sampled_from([2, 4, 8]))
def test_low_resolution_box_is_the_downsampled_full_box(seed, factor):
    height, width = 64, 96
    boxes = cutmix_boxes(3, height, width, seeded(seed), p=1.0)
    small = (height // factor, width // factor)
    full = box_mask(boxes, (height, width), (height, width))
    assert torch.equal(box_mask(boxes, (height, width), small), down(full, small))
    # CPSL's mixed label: paste at crop resolution, then nearest-downsample == paste the downsampled
    # source label into the low-resolution pseudo-label through the low-resolution box
    pseudo = torch.randint(0, 19, (3, *small), generator=seeded(seed))
    source = torch.randint(0, 19, (3, height, width), generator=seeded(seed + 1))
    mixed = down(paste(F.interpolate(pseudo[:, None].float(), size=(height, width), mode="nearest-exact")
                       [:, 0].long(), source, boxes), small)
    assert torch.equal(mixed, torch.where(box_mask(boxes, (height, width), small), down(source, small), pseudo))
