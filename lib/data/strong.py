"""Strong views of a batch on its device, with their geometry recorded, and CutMix boxes, as CPSL's
released code (lslrh/CPSL) draws them.

A method calls :func:`strong_view` inside its training step on the already-normalised weak crops.
Per sample, in the released code's order:

1. horizontal flip, p ``flip_p``;
2. Gaussian blur (PIL radius 1, taken as sigma 1), p ``blur_p``;
3. colour jitter (brightness = contrast = saturation = hue = ``jitter``, torchvision's ranges, the
   four in a random order), p ``jitter_p``;
4. ``ops`` RandAugment ops drawn with replacement from FixMatch's pool, each applied with p ``op_p``
   at an integer level v in {1..9}: value = v·max/10 + bias (FixMatch's max and bias per op, Sohn et al.,
   NeurIPS 2020; at v = 9 the geometric ones give 27°, 0.27 and 27 %), rotate / shear / translate
   with a random sign;
5. a grey square cutout of side ``cutout``·min(H, W), always (``cutout`` 0 turns it off).

Geometry.  Every geometric step is one affine map, and they compose into a single matrix per sample,
``theta`` (N, 2, 3), in the convention of ``torch.nn.functional.affine_grid`` with
``align_corners=False``: output normalised coordinates (x, y) in [-1, 1] -> input normalised
coordinates.  The composition follows the order the image goes through: flip, then the drawn
rotate / shear / translate ops in their drawn order.  CPSL warps its maps in a fixed key order
(flip, shear, translate, rotate, cutout), which differs from the image's whenever two geometric ops
are drawn; one matrix for image and maps keeps them aligned (our choice).  Rotation and shear act in
pixel space about the image centre (conjugated by the aspect ratio, so a rotation stays rigid on a
non-square crop); shear about the centre rather than PIL's top-left corner is our choice.  The cutout
box lives in output coordinates (after the warp).  Normalised coordinates make the geometry
resolution independent: label maps at 1/4 and features at 1/8 of the crop warp consistently with
the image as long as they keep its aspect ratio.

Also our choices: the photometric steps all run first and the image is resampled once (bilinear)
at the end, instead of the reference's resampling after each geometric op (photometric ops that
followed a geometric op there also saw its grey border); everything stays float in [0, 1] instead of
being quantised to uint8 after each op.

Randomness comes only from the CPU ``torch.Generator`` the method passes in (seeded per iteration,
so a resumed run draws the same views); the numbers are drawn on the CPU, a fixed count per sample,
and the ops run on the images' device.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from lib.config import positive
from lib.data.classes import IGNORE
from lib.errors import ConfigError

# RandAugment levels are v in {1 .. LEVELS - 1} (FixMatch's m = 10); a value is v·max/LEVELS + bias.
LEVELS = 10
POOL = ("autocontrast", "brightness", "color", "contrast", "equalize", "identity", "posterize",
        "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y")
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


@dataclass(frozen=True)
class StrongParams:
    """CPSL's strong view (the released code's RandAugmentMC n=2, m=10, jitter 0.4).

    ``max_rotate`` (degrees), ``max_shear`` and ``max_translate`` (fraction of the side) are the
    largest values applied, at level 9 (v·30/10, v·0.3/10 in FixMatch's terms).  ``fill`` is the
    grey of out-of-frame and cut-out pixels in [0, 1] units (FixMatch's 127).
    """

    flip_p: float = 0.5
    blur_p: float = 0.5
    blur_sigma: float = 1.0
    jitter_p: float = 0.5
    jitter: float = 0.4
    ops: int = 2
    op_p: float = 0.5
    max_rotate: float = 27.0
    max_shear: float = 0.27
    max_translate: float = 0.27
    cutout: float = 1 / 3
    fill: float = 127 / 255

    def validate(self, where: str) -> None:
        for name in ("flip_p", "blur_p", "jitter_p", "op_p", "cutout", "fill", "max_translate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"params: {where}.{name} must be in [0, 1], got {value}")
        positive(self.blur_sigma, f"{where}.blur_sigma")
        positive(self.ops, f"{where}.ops", allow_zero=True)
        positive(self.max_shear, f"{where}.max_shear", allow_zero=True)
        if not 0.0 <= self.jitter <= 0.5:   # hue shifts beyond half a turn are not defined
            raise ConfigError(f"params: {where}.jitter must be in [0, 0.5], got {self.jitter}")
        if not 0.0 <= self.max_rotate <= 180.0:
            raise ConfigError(f"params: {where}.max_rotate must be in [0, 180] degrees, got {self.max_rotate}")


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where each pixel of a strong view comes from.

    - ``theta`` (N, 2, 3) float32: output -> input normalised coordinates (``affine_grid``,
      ``align_corners=False``), flip included;
    - ``boxes`` (N, 4) float32: the cutout (y0, x0, y1, x1) in [0, 1] units of the output, whole
      pixels of ``size``; y0 == y1 when there is none.  A pixel is cut out when its centre lies in
      [y0, y1) x [x0, x1);
    - ``size`` (H, W): the view the geometry was drawn for; maps warped with it should keep its
      aspect ratio (any resolution).
    """

    theta: torch.Tensor
    boxes: torch.Tensor
    size: tuple[int, int]

    @classmethod
    def identity(cls, n: int, size: tuple[int, int], device: torch.device | str | None = None) -> "Geometry":
        theta = torch.eye(2, 3, device=device).expand(n, 2, 3).clone()
        return cls(theta, torch.zeros(n, 4, device=device), tuple(size))

    def inverse(self) -> "Geometry":
        """The inverse affine (input -> output), without cutout (a box has no inverse box)."""
        square = torch.eye(3, dtype=torch.float64, device=self.theta.device).repeat(len(self.theta), 1, 1)
        square[:, :2] = self.theta.double()
        theta = torch.linalg.inv(square)[:, :2].to(self.theta.dtype)
        return Geometry(theta, torch.zeros_like(self.boxes), self.size)


# ---------------------------------------------------------------------------------- drawing
@dataclass(frozen=True)
class _Draw:
    """One sample's decisions (plain Python values)."""

    flip: bool
    blur: bool
    jitter: tuple[tuple[Callable, float], ...]   # (adjustment, factor) in application order
    ops: tuple[tuple[str, int, float], ...]      # (op, level, sign) of the ops that fire, in order
    cutout: tuple[int, int, int, int]            # pixel box (y0, x0, y1, x1); empty when y0 == y1


_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
_FIXED = 11      # uniforms per sample before the ops: flip, blur, jitter coin, 4 factors, 4 order keys
_PER_OP = 4      # which op, fires, level, sign
_CUTOUT = 2      # box centre


def _draw(n: int, size: tuple[int, int], params: StrongParams, generator: torch.Generator) -> list[_Draw]:
    """All randomness of a batch, a fixed number of uniforms per sample, on the CPU."""
    height, width = size
    columns = _FIXED + _PER_OP * params.ops + _CUTOUT
    uniforms = torch.rand((n, columns), generator=generator, dtype=torch.float64).tolist()
    s = params.jitter
    side = int(params.cutout * min(height, width) + 1e-9)      # 170 px on a 512-high crop
    draws = []
    for u in uniforms:
        jitter: tuple = ()
        if s > 0 and u[2] < params.jitter_p:
            factors = [max(0.0, 1 - s) + u[3 + k] * (1 + s - max(0.0, 1 - s)) for k in range(3)]
            factors.append(-s + 2 * s * u[6])      # hue shift in turns, U[-s, s]
            order = sorted(range(4), key=lambda k: u[7 + k])
            jitter = tuple((_JITTER[k], factors[k]) for k in order)
        ops = []
        for k in range(params.ops):
            which, fires, level, sign = u[_FIXED + _PER_OP * k: _FIXED + _PER_OP * (k + 1)]
            if fires < params.op_p:
                ops.append((POOL[int(which * len(POOL))], 1 + int(level * (LEVELS - 1)),
                            -1.0 if sign < 0.5 else 1.0))
        cy, cx = u[-2] * height, u[-1] * width
        y0, x0 = max(0, int(cy - side / 2)), max(0, int(cx - side / 2))
        cutout = (y0, x0, min(height, y0 + side), min(width, x0 + side)) if side > 0 else (0, 0, 0, 0)
        draws.append(_Draw(u[0] < params.flip_p, u[1] < params.blur_p, jitter, tuple(ops), cutout))
    return draws


# --------------------------------------------------------------------------------- geometry
def _op_matrix(op: str, value: float, size: tuple[int, int]) -> torch.Tensor:
    """(3, 3) float64 output -> input map of one geometric op, in normalised coordinates.

    ``value``: degrees (rotate, counter-clockwise as displayed for positive values), shear factor,
    or fraction of the side (translate).  Defined in pixel space about the centre and conjugated
    by S = diag(W/2, H/2), the pixel-per-normalised-unit scale.
    """
    height, width = size
    m = torch.eye(3, dtype=torch.float64)
    if op == "flip":
        m[0, 0] = -1.0
        return m
    if op == "rotate":
        a = math.radians(value)
        m[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    elif op == "shear_x":
        m[0, 1] = value
    elif op == "shear_y":
        m[1, 0] = value
    elif op == "translate_x":
        m[0, 2] = value * width
    elif op == "translate_y":
        m[1, 2] = value * height
    else:
        raise ValueError(f"not a geometric op: {op}")
    scale = torch.diag(torch.tensor([width / 2, height / 2, 1.0], dtype=torch.float64))
    return torch.linalg.inv(scale) @ m @ scale


def _geometric_value(op: str, level: int, sign: float, params: StrongParams) -> float:
    top = {"rotate": params.max_rotate, "shear_x": params.max_shear, "shear_y": params.max_shear,
           "translate_x": params.max_translate, "translate_y": params.max_translate}[op]
    return sign * level * top / (LEVELS - 1)


def _theta(draw: _Draw, size: tuple[int, int], params: StrongParams) -> torch.Tensor:
    """Compose flip and the drawn geometric ops: x_out(p) = x_in(A_flip A_1 A_2 ... p)."""
    m = _op_matrix("flip", 0.0, size) if draw.flip else torch.eye(3, dtype=torch.float64)
    for op, level, sign in draw.ops:
        if op in GEOMETRIC:
            m = m @ _op_matrix(op, _geometric_value(op, level, sign, params), size)
    return m[:2]


# ------------------------------------------------------------------------------ photometric
def _enhance(level: int) -> float:
    """FixMatch's enhancement factor (brightness, color, contrast, sharpness): v·0.9/10 + 0.05."""
    return level * 0.9 / LEVELS + 0.05


_PHOTOMETRIC: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "autocontrast": lambda x, v: TF.autocontrast(x),
    "brightness": lambda x, v: TF.adjust_brightness(x, _enhance(v)),
    "color": lambda x, v: TF.adjust_saturation(x, _enhance(v)),
    "contrast": lambda x, v: TF.adjust_contrast(x, _enhance(v)),
    "equalize": lambda x, v: TF.equalize(x),
    "identity": lambda x, v: x,
    "posterize": lambda x, v: TF.posterize(x, int(v * 4 / LEVELS) + 4),                 # 4..7 bits
    "sharpness": lambda x, v: TF.adjust_sharpness(x, _enhance(v)),
    "solarize": lambda x, v: TF.solarize(x, (256 - int(v * 256 / LEVELS)) / 255),        # PIL threshold /255
}


def _photometric(image: torch.Tensor, draw: _Draw, params: StrongParams) -> torch.Tensor:
    """Blur, jitter and the drawn photometric ops on one (3, H, W) image in [0, 1]."""
    if draw.blur:
        kernel = 2 * math.ceil(3 * params.blur_sigma) + 1
        image = TF.gaussian_blur(image, [kernel, kernel], [params.blur_sigma, params.blur_sigma])
    for adjust, factor in draw.jitter:
        image = adjust(image, factor)
    for op, level, _ in draw.ops:
        if op not in GEOMETRIC:
            image = _PHOTOMETRIC[op](image, level)
    return image


# ---------------------------------------------------------------------------------- public
def strong_view(images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                params: StrongParams, generator: torch.Generator) -> tuple[torch.Tensor, Geometry]:
    """The strong view of a normalised batch (N, 3, H, W), (x/255 - mean)/std, and its geometry.

    Returns float32 images normalised the same way, on the images' device; out-of-frame and
    cut-out pixels are ``params.fill`` grey.  Runs in float32 even under autocast.
    """
    n, _, height, width = images.shape
    device = images.device
    draws = _draw(n, (height, width), params, generator)
    theta = torch.stack([_theta(d, (height, width), params) for d in draws]).float()
    boxes = torch.tensor([d.cutout for d in draws], dtype=torch.float64)
    boxes = (boxes / torch.tensor([height, width, height, width], dtype=torch.float64)).float()
    geometry = Geometry(theta.to(device), boxes.to(device), (height, width))
    with torch.autocast(device.type, enabled=False):
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        x = (images.float() * std_t + mean_t).clamp(0.0, 1.0)
        x = torch.stack([_photometric(x[i], d, params) for i, d in enumerate(draws)])
        x = warp(x, geometry, mode="bilinear", fill=params.fill)
        return (x - mean_t) / std_t, geometry


def _grid(geometry: Geometry, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    theta = geometry.theta.to(device=device, dtype=torch.float32)
    return F.affine_grid(theta, [len(theta), 1, *size], align_corners=False)


def _valid(grid: torch.Tensor, geometry: Geometry, size: tuple[int, int]) -> torch.Tensor:
    inside = (grid.abs() <= 1.0).all(dim=-1)
    return inside & ~_cutout_mask(geometry, size, grid.device)


def _cutout_mask(geometry: Geometry, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Pixels of a (h, w) grid whose centres lie in the cutout box (pixel-centre rule)."""
    height, width = geometry.size
    scale = torch.tensor([height, width, height, width], dtype=torch.float64, device=device)
    pixels = (geometry.boxes.to(device, torch.float64) * scale).round().long()
    return box_mask(pixels, geometry.size, size, device)


def valid_mask(geometry: Geometry, size: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """(N, h, w) bool: the pixel of the view at resolution ``size`` comes from inside the input
    frame and is not cut out (the pixels a loss on warped maps should count)."""
    device = torch.device(device) if device is not None else geometry.theta.device
    size = tuple(size)
    return _valid(_grid(geometry, size, device), geometry, size)


def warp(maps: torch.Tensor, geometry: Geometry, mode: str | None = None, fill: float | None = None) -> torch.Tensor:
    """Carry maps aligned with the weak crop onto the strong view, at their own resolution.

    - integer (N, h, w) label maps: nearest; out-of-frame and cut-out pixels -> ``fill``
      (default IGNORE); same dtype back;
    - float (N, C, h, w) or (N, h, w) maps: ``mode`` bilinear (default) or nearest; out-of-frame
      and cut-out pixels -> ``fill`` (default 0); float32 back, differentiable in ``maps``.

    Inside the frame, samples near its edge are clamped to the border pixels.
    """
    integer = not maps.is_floating_point()
    mode = mode or ("nearest" if integer else "bilinear")
    if integer and mode != "nearest":
        raise ValueError(f"integer label maps warp with mode 'nearest', not {mode!r}")
    if fill is None:
        fill = IGNORE if integer else 0.0
    squeeze = maps.ndim == 3
    x = maps[:, None] if squeeze else maps
    size = tuple(x.shape[-2:])
    with torch.autocast(maps.device.type, enabled=False):
        grid = _grid(geometry, size, maps.device)
        out = F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False)
        out = torch.where(_valid(grid, geometry, size)[:, None], out, torch.full_like(out, fill))
    out = out[:, 0] if squeeze else out
    return out.round().to(maps.dtype) if integer else out


# ----------------------------------------------------------------------------------- CutMix
def cutmix_boxes(n: int, height: int, width: int, generator: torch.Generator, area: float = 0.5,
                 p: float = 0.5) -> torch.Tensor:
    """CutMix boxes for a batch (as CPSL's released code draws them), (N, 4) int64 (y0, x0, y1, x1) pixels, CPU.

    With probability ``p`` (one draw for the batch: CPSL's L_con is gated per iteration) every
    sample gets a box of ``area`` of the image: height fraction area**u, u ~ U(0, 1), width
    fraction area / height fraction, sides rounded to pixels, position uniform over the places
    where it fits; otherwise all boxes are empty (zeros).  A box per sample is our choice.
    Always draws 1 + 3N uniforms, so what follows in the generator does not depend on the coin.
    """
    u = torch.rand(1 + 3 * n, generator=generator, dtype=torch.float64).tolist()
    boxes = torch.zeros(n, 4, dtype=torch.long)
    if u[0] >= p:
        return boxes
    for i in range(n):
        h_frac = area ** u[1 + 3 * i]
        box_h = min(height, max(1, round(h_frac * height)))
        box_w = min(width, max(1, round(area / h_frac * width)))
        y0 = min(int(u[2 + 3 * i] * (height - box_h + 1)), height - box_h)
        x0 = min(int(u[3 + 3 * i] * (width - box_w + 1)), width - box_w)
        boxes[i] = torch.tensor([y0, x0, y0 + box_h, x0 + box_w])
    return boxes


def box_mask(boxes: torch.Tensor, box_size: tuple[int, int], size: tuple[int, int],
             device: torch.device | str | None = None) -> torch.Tensor:
    """(N, h, w) bool: pixels of a (h, w) grid whose centres lie in integer pixel ``boxes`` given on
    a (H, W) = ``box_size`` grid.  Exact integer arithmetic: at h = H it is the box itself, and at a
    lower resolution it equals the pixel-centre ('nearest-exact') downsampling of the full mask."""
    (big_h, big_w), (h, w) = box_size, size
    boxes = boxes.to(device=device, dtype=torch.long)
    rows = (2 * torch.arange(h, device=boxes.device) + 1) * big_h          # 2·h·(row centre on H)
    cols = (2 * torch.arange(w, device=boxes.device) + 1) * big_w
    y0, x0, y1, x1 = (boxes[:, k, None] for k in range(4))
    in_rows = (rows >= 2 * y0 * h) & (rows < 2 * y1 * h)
    in_cols = (cols >= 2 * x0 * w) & (cols < 2 * x1 * w)
    return in_rows[:, :, None] & in_cols[:, None, :]


def paste(dst: torch.Tensor, src: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
    """A copy of ``dst`` with the ``boxes`` (pixel units of dst) taken from ``src``.

    Images (N, C, H, W) or label maps (N, H, W); None pastes nothing.  For CPSL's mixed label at 1/4
    resolution, paste the source label at crop resolution and then downsample with pixel-centre
    nearest ('nearest-exact'), as the fixed CPSL code does; :func:`box_mask` with a smaller ``size``
    gives the same box region at the low resolution directly.
    """
    if boxes is None:
        return dst.clone()
    if dst.shape != src.shape:
        raise ValueError(f"paste needs maps of one shape, got {tuple(dst.shape)} and {tuple(src.shape)}")
    size = tuple(dst.shape[-2:])
    mask = box_mask(boxes, size, size, dst.device)
    return torch.where(mask[:, None] if dst.ndim == 4 else mask, src, dst)
