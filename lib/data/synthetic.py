"""The embedded synthetic benchmark: labelled "source" street scenes, a "target" domain and a "night" domain.

With no dataset on disk the pipeline runs on this benchmark, so it has to be fast on a laptop CPU and still
show what domain adaptation is about.  Its design:

* **One scene grammar for every domain.**  A pinhole camera 1.6 m above a straight street; road, kerbs,
  sidewalks, facades with windows, parks, walls and fences, street furniture, people and vehicles are
  placed in metres and projected, so horizon, vanishing point, perspective and size-with-depth agree.
  Patches are painted far to near (painter's order decides visibility).  All 19 Cityscapes classes
  occur; the smallest ones (signs, lights, poles, riders, two-wheelers) are drawn larger than life so
  that a 19-class mIoU at low resolution measures something.
* **A modest layout shift** (``LayoutPriors``): the target camera has a lower horizon and a longer lens,
  streets hold more people, bicycles and trees and fewer trucks, and an ego-vehicle bonnet (label 0,
  unlabelled) shows at the bottom as in Cityscapes.
* **An appearance shift with two parts.**  A global part (saturation, white balance, exposure, gamma,
  vignetting, blur, sensor noise, JPEG) that a global colour transfer such as Reinhard or FDA can undo,
  and a class-specific part that it cannot: every class's palette moves in its own direction (terrain
  from dirt to grass, vegetation from vivid green to olive, windows from dark to bright, vivid cars to
  grey ones, grey sidewalks to red pavers), and some classes get target-only textures (foliage with
  gaps, overcast clouds, facade stains, a metal-lattice fence, a wet road mirroring the street, cast
  shadows).  Like real domains the class-specific shift is partial: 30% of the target's patches keep a
  source colour, so a stylised source model is right on some instances of every class, and self-training
  and distillation have something to spread from.
* **Night** is the target grammar and palette lit by an ambient moon-light, street lamps, the ego car's
  headlights, other cars' head/tail lights, traffic signals and lit windows, with strong sensor noise:
  dark and low in contrast, but the objects stay discernible.

``render_scene`` draws one image with its Cityscapes label-ID map; ``write_benchmark`` writes a whole
benchmark in the real raw layouts (GTA5 for the source, Cityscapes for the target, ACDC night for the
night domain) so that the ordinary readers and converters prepare it like real data.
"""
from __future__ import annotations

import colorsys
import io
import multiprocessing
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import scipy.io
from tqdm import tqdm

from lib.config import positive
from lib.data.classes import CITYSCAPES19, CLASS_INDEX, LABELID_LUT, TRAIN_TO_LABELID
from lib.errors import ConfigError
from lib.io import write_id_png, write_label_png, write_rgb

DOMAINS = ("source", "target", "night")


@dataclass(frozen=True)
class SplitCounts:
    train: int
    val: int

    def validate(self, where: str) -> None:
        positive(self.train, f"{where}.train", allow_zero=True)
        positive(self.val, f"{where}.val", allow_zero=True)


@dataclass(frozen=True)
class SynthesizeParams:
    counts: dict[str, SplitCounts]
    enabled: bool = True   # false on real data: the stage writes an empty folder
    height: int = 128
    width: int = 256
    seed: int = 0
    workers: int = 2

    def validate(self, where: str) -> None:
        if sorted(self.counts) != sorted(DOMAINS):
            raise ConfigError(f"params: {where}.counts must name exactly the domains {', '.join(DOMAINS)}")
        for key in ("height", "width", "workers"):
            positive(getattr(self, key), f"{where}.{key}")


SYNTHETIC_ROOT = Path("data/raw/synthetic")  # where the synthesize stage writes, relative to the project
SPLITS = ("train", "val")
DEFAULT_HEIGHT, DEFAULT_WIDTH = 128, 256
CAMERA_HEIGHT = 1.6  # metres above the road

LABEL_ID = {name: TRAIN_TO_LABELID[train_id] for name, train_id in CLASS_INDEX.items()}
LABEL_ID["unlabeled"] = 0

# ---------------------------------------------------------------------------------------------------------
# Layout priors: the only place where domains differ in what is in a scene.


FRONTAGE_KINDS = ("building", "park", "wall", "fence")  # what lines the street beyond the sidewalk


@dataclass(frozen=True)
class LayoutPriors:
    horizon: tuple[float, float]  # horizon row as a fraction of the image height
    focal: tuple[float, float]  # focal length as a fraction of the image width
    persons: tuple[int, int]  # inclusive ranges of counts per scene
    riders: tuple[int, int]
    parked_two_wheelers: tuple[int, int]
    cars: tuple[int, int]
    signs: tuple[int, int]
    traffic_lights: tuple[int, int]
    truck_probability: float
    bus_probability: float
    tram_probability: float
    street_tree_probability: float  # per tree slot along each kerb
    frontage_weights: tuple[float, float, float, float]  # of the FRONTAGE_KINDS
    ego_bonnet: bool


SOURCE_PRIORS = LayoutPriors(
    horizon=(0.36, 0.46), focal=(0.8, 0.95), persons=(1, 5), riders=(1, 2), parked_two_wheelers=(0, 3),
    cars=(2, 6), signs=(2, 4), traffic_lights=(2, 3), truck_probability=0.6, bus_probability=0.4,
    tram_probability=0.3, street_tree_probability=0.3, frontage_weights=(0.6, 0.14, 0.13, 0.13),
    ego_bonnet=False)
TARGET_PRIORS = LayoutPriors(
    horizon=(0.42, 0.52), focal=(0.9, 1.05), persons=(3, 8), riders=(1, 3), parked_two_wheelers=(1, 4),
    cars=(2, 7), signs=(2, 4), traffic_lights=(2, 3), truck_probability=0.3, bus_probability=0.3,
    tram_probability=0.3, street_tree_probability=0.5, frontage_weights=(0.5, 0.22, 0.14, 0.14),
    ego_bonnet=True)
PRIORS = {"source": SOURCE_PRIORS, "target": TARGET_PRIORS, "night": TARGET_PRIORS}

# ---------------------------------------------------------------------------------------------------------
# Materials and palettes.  A material is what a patch is made of; the label says which class it belongs to.


class Material(IntEnum):
    SKY = 0
    ASPHALT = 1
    MARKING = 2
    RAIL = 3
    PAVEMENT = 4
    GRASS = 5
    FACADE = 6
    WINDOW = 7
    WINDOW_LIT = 8  # a window that is lit at night; by day it looks like any window
    WALL = 9
    FENCE = 10
    POLE = 11
    LAMP = 12
    SIGN = 13
    SIGN_SYMBOL = 14
    SIGNAL_BOX = 15
    SIGNAL_LAMP = 16
    FOLIAGE = 17
    TRUNK = 18
    SKIN = 19
    CLOTHES = 20
    CAR_PAINT = 21
    TRUCK_PAINT = 22
    BUS_PAINT = 23
    TRAM_PAINT = 24
    FRAME = 25  # bicycle and motorcycle frames
    GLASS = 26
    TYRE = 27
    SPOKES = 28
    HEADLIGHT = 29
    TAILLIGHT = 30
    BONNET = 31


M = Material
GROUND = (M.ASPHALT, M.MARKING, M.RAIL, M.PAVEMENT, M.GRASS)
ROAD_SURFACE = (M.ASPHALT, M.MARKING, M.RAIL)

# Colour tables: per material, a list of HSV boxes ((hue deg), (saturation), (value)); a colour is drawn
# uniformly from one box chosen uniformly.  Repeating a box weights it.
HsvBox = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
WHITE: HsvBox = ((0, 360), (0, 0.04), (0.86, 0.95))
BLACK: HsvBox = ((0, 360), (0, 0.06), (0.07, 0.16))
SIGNS = (((0, 6), (0.8, 0.95), (0.78, 0.9)), ((210, 222), (0.8, 0.95), (0.65, 0.8)),
         ((46, 54), (0.85, 0.95), (0.88, 0.98)), WHITE)
SIGNAL_LAMPS = (((0, 6), (0.85, 1), (0.9, 1)), ((35, 45), (0.85, 1), (0.9, 1)),
                ((130, 150), (0.7, 0.9), (0.85, 1)))

SOURCE_COLOURS: dict[Material, tuple[HsvBox, ...]] = {  # GTA-like: vivid, clean, bright
    M.SKY: (((200, 215), (0.6, 0.8), (0.8, 0.95)),),  # zenith colour of the gradient sky
    M.ASPHALT: (((20, 40), (0.04, 0.1), (0.36, 0.46)),),
    M.MARKING: (WHITE, ((45, 52), (0.8, 0.9), (0.85, 0.95))),
    M.RAIL: (((0, 30), (0, 0.1), (0.55, 0.7)),),
    M.PAVEMENT: (((30, 45), (0.05, 0.15), (0.62, 0.75)),),
    M.GRASS: (((26, 40), (0.45, 0.6), (0.45, 0.6)),),  # dry dirt
    M.FACADE: (((20, 45), (0.25, 0.45), (0.7, 0.88)), ((0, 20), (0.3, 0.5), (0.65, 0.85)),
               ((190, 220), (0.2, 0.4), (0.7, 0.85)), ((50, 70), (0.25, 0.4), (0.75, 0.9))),
    M.WINDOW: (((200, 220), (0.3, 0.5), (0.15, 0.28)),),
    M.WALL: (((35, 50), (0.15, 0.3), (0.6, 0.75)),),
    M.FENCE: (((20, 30), (0.5, 0.65), (0.4, 0.55)), ((140, 160), (0.35, 0.5), (0.35, 0.5))),
    M.POLE: (((0, 360), (0, 0.08), (0.3, 0.4)),),
    M.LAMP: (((40, 50), (0.05, 0.2), (0.7, 0.85)),),
    M.SIGN: SIGNS,
    M.SIGN_SYMBOL: (WHITE, BLACK),
    M.SIGNAL_BOX: (BLACK, ((45, 55), (0.7, 0.9), (0.7, 0.85))),
    M.SIGNAL_LAMP: SIGNAL_LAMPS,
    M.FOLIAGE: (((95, 125), (0.65, 0.85), (0.5, 0.68)),),
    M.TRUNK: (((20, 30), (0.5, 0.65), (0.3, 0.4)),),
    M.SKIN: (((15, 30), (0.3, 0.6), (0.45, 0.9)),),
    M.CLOTHES: (((0, 360), (0.55, 0.9), (0.35, 0.9)),),
    M.CAR_PAINT: (((0, 360), (0.7, 0.95), (0.55, 0.9)), ((0, 360), (0.7, 0.95), (0.55, 0.9)), WHITE, BLACK),
    M.TRUCK_PAINT: (((0, 360), (0.7, 0.9), (0.7, 0.9)), WHITE),
    M.BUS_PAINT: (((0, 10), (0.8, 0.9), (0.7, 0.85)), ((210, 225), (0.75, 0.9), (0.6, 0.8)),
                  ((120, 140), (0.6, 0.8), (0.5, 0.7))),
    M.TRAM_PAINT: (((45, 55), (0.75, 0.9), (0.85, 0.95)),),
    M.FRAME: (((0, 360), (0.7, 0.95), (0.5, 0.9)),),
    M.GLASS: (((195, 215), (0.35, 0.55), (0.2, 0.3)),),
    M.TYRE: (((0, 360), (0, 0.05), (0.06, 0.12)),),
    M.SPOKES: (((0, 360), (0, 0.05), (0.35, 0.45)),),
    M.HEADLIGHT: (((45, 55), (0, 0.15), (0.9, 1)),),
    M.TAILLIGHT: (((0, 5), (0.85, 0.95), (0.75, 0.9)),),
    M.BONNET: (BLACK,),
}

TARGET_COLOURS: dict[Material, tuple[HsvBox, ...]] = {  # Cityscapes-like; each class moves its own way
    **SOURCE_COLOURS,
    M.SKY: (((200, 220), (0.02, 0.12), (0.75, 0.92)),),  # overcast
    M.ASPHALT: (((200, 230), (0.05, 0.12), (0.22, 0.32)),),  # darker, bluish, often wet
    M.MARKING: (((40, 50), (0.05, 0.15), (0.62, 0.75)),),
    M.RAIL: (((20, 30), (0.1, 0.2), (0.45, 0.55)),),
    M.PAVEMENT: (((8, 22), (0.22, 0.38), (0.45, 0.58)), ((30, 40), (0.05, 0.12), (0.5, 0.6))),  # red pavers
    M.GRASS: (((75, 100), (0.35, 0.55), (0.38, 0.5)),),  # green grass
    M.FACADE: (((25, 40), (0.1, 0.25), (0.45, 0.62)), ((0, 15), (0.3, 0.45), (0.35, 0.5)),
               ((0, 360), (0, 0.05), (0.5, 0.7))),
    M.WINDOW: (((195, 215), (0.04, 0.12), (0.5, 0.7)),),  # bright reflections of the overcast sky
    M.WALL: (((25, 40), (0.05, 0.15), (0.38, 0.5)),),
    M.FENCE: (((90, 130), (0.08, 0.2), (0.32, 0.45)),),
    M.POLE: (((90, 150), (0.03, 0.1), (0.34, 0.46)),),
    M.LAMP: (((0, 360), (0, 0.05), (0.55, 0.65)),),
    M.SIGNAL_BOX: (BLACK,),
    M.FOLIAGE: (((55, 85), (0.4, 0.6), (0.28, 0.42)),),  # olive
    M.TRUNK: (((25, 40), (0.1, 0.25), (0.2, 0.3)),),
    M.CLOTHES: (((0, 360), (0.1, 0.5), (0.15, 0.6)), ((0, 360), (0, 0.2), (0.08, 0.25))),  # darker, duller
    M.CAR_PAINT: (((0, 360), (0, 0.06), (0.55, 0.8)), BLACK, WHITE, ((0, 360), (0.35, 0.6), (0.3, 0.6))),
    M.TRUCK_PAINT: (WHITE, ((0, 360), (0, 0.06), (0.5, 0.7)), ((0, 360), (0.4, 0.6), (0.5, 0.7))),
    M.BUS_PAINT: (((40, 50), (0.55, 0.75), (0.65, 0.8)), WHITE, ((205, 225), (0.45, 0.65), (0.45, 0.65))),
    M.TRAM_PAINT: (((350, 360), (0.65, 0.8), (0.5, 0.65)), ((45, 55), (0.45, 0.65), (0.7, 0.85)), WHITE),
    M.FRAME: (((0, 360), (0.2, 0.55), (0.2, 0.6)),),
    M.GLASS: (((190, 210), (0.05, 0.15), (0.35, 0.5)),),
    M.BONNET: (((0, 360), (0, 0.06), (0.18, 0.3)),),
}


@dataclass(frozen=True)
class Palette:
    """A domain's colours.  A ``familiar_share`` of its patches take the ``familiar`` (source) colours
    instead: the class-specific shift is partial, as between real domains, so a source model is right on
    some instances of every class and self-training has something to spread from."""

    colours: dict[Material, tuple[HsvBox, ...]]
    familiar: dict[Material, tuple[HsvBox, ...]] | None = None
    familiar_share: float = 0.0

    def colour(self, material: Material, rng: np.random.Generator) -> np.ndarray:
        familiar = self.familiar is not None and rng.random() < self.familiar_share
        return sample_colour((self.familiar if familiar else self.colours)[material], rng)


def sample_colour(boxes: tuple[HsvBox, ...], rng: np.random.Generator) -> np.ndarray:
    pick, hue, sat, val = rng.random(4)
    (h0, h1), (s0, s1), (v0, v1) = boxes[int(pick * len(boxes))]
    rgb = colorsys.hsv_to_rgb((h0 + hue * (h1 - h0)) / 360 % 1.0, s0 + sat * (s1 - s0), v0 + val * (v1 - v0))
    return np.array(rgb, np.float32)


TARGET_PALETTE = Palette(TARGET_COLOURS, familiar=SOURCE_COLOURS, familiar_share=0.3)
PALETTES = {"source": Palette(SOURCE_COLOURS), "target": TARGET_PALETTE, "night": TARGET_PALETTE}


# ---------------------------------------------------------------------------------------------------------
# Geometry: camera, projected primitives, and the canvas that rasterises them.


@dataclass(frozen=True)
class Camera:
    focal: float  # pixels
    horizon: float  # image row of the horizon
    centre_x: float  # image column of the vanishing point

    def project(self, x, y, z) -> np.ndarray:
        """World points (x right, y up, z forward; metres) -> (..., 2) pixel coordinates."""
        x, y, z = np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(z, np.float64)
        points = np.empty(np.broadcast_shapes(x.shape, y.shape, z.shape) + (2,))
        points[..., 0] = self.centre_x + self.focal * x / z
        points[..., 1] = self.horizon + self.focal * (CAMERA_HEIGHT - y) / z
        return points


def ground_quad(cam: Camera, x0, x1, z0, z1) -> np.ndarray:
    return cam.project([x0, x1, x1, x0], 0.0, [z0, z0, z1, z1])


def along_quad(cam: Camera, x, z0, z1, y0, y1) -> np.ndarray:
    """A vertical rectangle parallel to the street (a facade, a wall, a fence)."""
    return cam.project(x, [y0, y0, y1, y1], [z0, z1, z1, z0])


def across_quad(cam: Camera, z, x0, x1, y0, y1) -> np.ndarray:
    """A vertical rectangle facing the camera."""
    return cam.project([x0, x1, x1, x0], [y0, y0, y1, y1], z)


def box_outline(cam: Camera, x0, x1, y0, y1, z0, z1) -> np.ndarray:
    """Image outline of an axis-aligned box: the convex hull of its projected corners."""
    corners = cam.project([x0, x1] * 4, [y0, y0, y1, y1] * 2, [z0] * 4 + [z1] * 4)
    return cv2.convexHull(corners.astype(np.float32))[:, 0]


def ground_ellipse(cam: Camera, x, z, rx, rz, points: int = 12) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return cam.project(x + rx * np.cos(t), 0.0, np.maximum(z + rz * np.sin(t), 0.5))


@dataclass(frozen=True)
class Figure:
    """A flat figure standing at ``foot`` (pixels), drawn from a sketch in metres (x right, y up).

    ``squeeze`` scales the sketch horizontally: its sign says which way the figure faces, its size how much
    it is turned away from a side view.
    """

    foot: np.ndarray
    scale: float  # pixels per metre
    squeeze: float = 1.0

    def points(self, sketch) -> np.ndarray:
        return self.foot + np.asarray(sketch, np.float64) * (self.squeeze * self.scale, -self.scale)

    def limbs(self, *segments) -> np.ndarray:
        """(n, 4, 2) quads along the (start, end, width in metres) ``segments``."""
        starts = self.points([start for start, _, _ in segments])
        ends = self.points([end for _, end, _ in segments])
        direction = ends - starts
        length = np.maximum(np.hypot(direction[:, 0], direction[:, 1]), 1e-6)
        half_width = np.array([width for _, _, width in segments]) * self.scale / 2
        offset = np.stack([-direction[:, 1], direction[:, 0]], 1) * (half_width / length)[:, None]
        return np.stack([starts + offset, ends + offset, ends - offset, starts - offset], 1)

    def ellipse(self, centre, rx: float, ry: float) -> tuple[np.ndarray, np.ndarray]:
        return self.points(centre), np.array([abs(rx * self.squeeze), ry]) * self.scale


_SUBPIXEL_BITS = 3


def _fixed_point(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points) * (1 << _SUBPIXEL_BITS)).astype(np.int32)


def light_pool(shape: tuple[int, int], polygon: np.ndarray, intensity: float) -> np.ndarray:
    """A light map with ``intensity`` inside ``polygon``; pools add up where they overlap."""
    pool = np.zeros(shape, np.float32)
    cv2.fillPoly(pool, [_fixed_point(polygon)], float(intensity), cv2.LINE_8, _SUBPIXEL_BITS)
    return pool


class Canvas:
    """Paints patches in painter's order into one patch-index map.

    Every patch carries a label ID, a material and one colour drawn from the domain's palette, so the
    label map and the flat-colour image come from the same rasterisation.  Beside it the canvas keeps
    the ground's cast shadows (used by sunny target looks) and its lamp light (used at night).
    """

    def __init__(self, height: int, width: int, rng: np.random.Generator, palette: Palette):
        self.rng = rng
        self.palette = palette
        self.index = np.zeros((height, width), np.uint16)  # patch 0 is the sky behind everything
        self.label_ids = [LABEL_ID["sky"]]
        self.materials = [M.SKY]
        self.colours = [palette.colour(M.SKY, rng)]
        self.shadow = np.zeros((height, width), np.uint8)
        self.light = np.zeros((height, width), np.float32)

    def _new_patch(self, cls: str, material: Material, colour) -> tuple[int, np.ndarray]:
        colour = self.palette.colour(material, self.rng) if colour is None else colour
        self.label_ids.append(LABEL_ID[cls])
        self.materials.append(material)
        self.colours.append(colour)
        return len(self.label_ids) - 1, colour

    def polygons(self, polygons, cls: str, material: Material, colour=None,
                 disjoint: bool = False) -> np.ndarray:
        """Fill ``polygons`` (a list of (n, 2) pixel arrays) as one patch; returns its colour.

        OpenCV fills several polygons of one call even-odd, punching holes where they overlap; only
        ``disjoint`` polygons (windows, road markings) are filled in one call.
        """
        patch, colour = self._new_patch(cls, material, colour)
        if isinstance(polygons, np.ndarray):
            points = list(_fixed_point(polygons))
        else:
            points = [_fixed_point(p) for p in polygons]
        for group in [points] if disjoint else [[p] for p in points]:
            cv2.fillPoly(self.index, group, patch, cv2.LINE_8, _SUBPIXEL_BITS)
        return colour

    def ellipse(self, centre, axes, cls: str, material: Material, colour=None) -> np.ndarray:
        patch, colour = self._new_patch(cls, material, colour)
        cv2.ellipse(self.index, tuple(_fixed_point(centre)), tuple(_fixed_point(np.maximum(axes, 0.3))),
                    0, 0, 360, patch, -1, cv2.LINE_8, _SUBPIXEL_BITS)
        return colour

    def cast_shadow(self, polygon: np.ndarray) -> None:
        cv2.fillPoly(self.shadow, [_fixed_point(polygon)], 1, cv2.LINE_8, _SUBPIXEL_BITS)

    def add_light(self, polygon: np.ndarray, intensity: float) -> None:
        self.light += light_pool(self.light.shape, polygon, intensity)

    def label_map(self) -> np.ndarray:
        return np.array(self.label_ids, np.uint8)[self.index]

    def material_map(self) -> np.ndarray:
        return np.array(self.materials, np.uint8)[self.index]

    def flat_colours(self) -> np.ndarray:
        return np.array(self.colours, np.float32)[self.index]


# ---------------------------------------------------------------------------------------------------------
# The scene grammar.


@dataclass(frozen=True)
class Street:
    road: tuple[float, float]  # x of the left and right kerbs (the camera is at x = 0)
    verge: tuple[float, float]  # width of the grass verge between kerb and sidewalk, per side
    sidewalk: tuple[float, float]  # sidewalk width, per side
    end: float  # depth of the cross street that closes the view
    tram_x: float | None  # centre of the tram track, when there is one

    def kerb(self, side: int) -> float:
        return self.road[1] if side > 0 else self.road[0]

    def verge_width(self, side: int) -> float:
        return self.verge[1] if side > 0 else self.verge[0]

    def on_sidewalk(self, side: int, fraction: float) -> float:
        """x of a point ``fraction`` of the way across the sidewalk (0 at the verge, 1 at the buildings)."""
        width = self.sidewalk[1] if side > 0 else self.sidewalk[0]
        return self.kerb(side) + side * (self.verge_width(side) + fraction * width)

    def frontage(self, side: int) -> float:
        """x where the sidewalk ends and the buildings begin."""
        return self.on_sidewalk(side, 1.0)


def near_biased_depth(rng: np.random.Generator, near: float, far: float) -> float:
    """Depths crowd near the camera, where objects are big enough to learn from."""
    return near + (far - near) * rng.random() ** 1.7


def sample_street(rng: np.random.Generator, tram: bool) -> Street:
    left, right = -rng.uniform(4.5, 9.0), rng.uniform(1.8, 4.0)
    verge = tuple(float(rng.uniform(1.0, 2.5)) if rng.random() < 0.3 else 0.0 for _ in range(2))
    tram_x = float(rng.uniform(left + 1.6, -0.5)) if tram else None
    return Street((left, right), verge, tuple(rng.uniform(2.5, 5.5, 2)), float(rng.uniform(60, 110)), tram_x)


def draw_ground(canvas: Canvas, cam: Camera, street: Street, rng: np.random.Generator) -> None:
    near, far = 0.5, street.end
    canvas.polygons([ground_quad(cam, -400, 400, near, far)], "sidewalk", M.PAVEMENT)
    for side in (-1, 1):
        verge = street.verge_width(side)
        if verge:
            kerb = street.kerb(side)
            canvas.polygons([ground_quad(cam, kerb, kerb + side * verge, near, far)], "terrain", M.GRASS)
    left, right = street.road
    canvas.polygons([ground_quad(cam, left, right, near, far)], "road", M.ASPHALT)
    centre_line = right - 3.5
    if centre_line - left > 2.5:
        dashes = [ground_quad(cam, centre_line - 0.08, centre_line + 0.08, z, z + 3.0)
                  for z in np.arange(rng.uniform(1, 9), far, 9.0)]
        canvas.polygons(dashes, "road", M.MARKING, disjoint=True)
    if rng.random() < 0.35:
        z = rng.uniform(8, 25)
        stripes = [ground_quad(cam, x, x + 0.5, z, z + 3.0) for x in np.arange(left + 0.3, right - 0.4, 1.0)]
        canvas.polygons(stripes, "road", M.MARKING, disjoint=True)
    if street.tram_x is not None:
        rails = [ground_quad(cam, street.tram_x + dx - 0.06, street.tram_x + dx + 0.06, near, far)
                 for dx in (-0.72, 0.72)]
        canvas.polygons(rails, "road", M.RAIL, disjoint=True)


def window_grid(rng: np.random.Generator, u0: float, u1: float, height: float):
    """Window rectangles on a facade as (n, 4) arrays of facade coordinates u (along) and y (up)."""
    floor, bay = rng.uniform(3.0, 3.6), rng.uniform(2.4, 3.4)
    width, tall = bay * rng.uniform(0.4, 0.6), floor * rng.uniform(0.4, 0.55)
    centres = np.arange(u0 + bay / 2, u1 - bay / 2 + 1e-6, bay)
    bottoms = np.arange(floor, height - tall - 0.8, floor)
    if rng.random() < 0.5:  # shop windows
        bottoms = np.concatenate([[0.5], bottoms])
    uc, yb = np.meshgrid(centres, bottoms)
    uc, yb = uc.ravel(), yb.ravel()
    yt = yb + np.where(yb < 0.9, 2.0, tall)
    u = np.stack([uc - width / 2, uc + width / 2, uc + width / 2, uc - width / 2], 1)
    y = np.stack([yb, yb, yt, yt], 1)
    return u, y


def draw_windows(canvas: Canvas, quads: np.ndarray) -> None:
    """Windows too small to see are dropped; about a third of the rest are lit at night."""
    if len(quads) == 0:
        return
    quads = quads[np.ptp(quads[:, :, 0], axis=1) >= 1.0]
    lit = canvas.rng.random(len(quads)) < 0.35
    colour = canvas.palette.colour(M.WINDOW, canvas.rng)  # lit or not, by day they look alike
    for material, chosen in ((M.WINDOW, ~lit), (M.WINDOW_LIT, lit)):
        if chosen.any():
            canvas.polygons(quads[chosen], "building", material, colour, disjoint=True)


def draw_building_along(canvas: Canvas, cam: Camera, side: int, x: float, z0: float, z1: float,
                        height: float) -> None:
    """A building whose facade runs along the street at ``x``, with its end wall facing the camera at z0."""
    rng = canvas.rng
    colour = canvas.polygons([along_quad(cam, x, z0, z1, 0, height)], "building", M.FACADE)
    canvas.polygons([across_quad(cam, z0, x, x + side * 15, 0, height)], "building", M.FACADE, colour * 0.75)
    u, y = window_grid(rng, z0, z1, height)
    draw_windows(canvas, cam.project(x, y, u))
    if side < 0:  # the sun stands low behind the left-hand buildings, which shade the sidewalk and road
        reach = height * rng.uniform(0.4, 0.9)
        canvas.cast_shadow(ground_quad(cam, x, x - side * reach, max(z0, 0.5), z1))


def draw_building_across(canvas: Canvas, cam: Camera, z: float, x0: float, x1: float, height: float) -> None:
    canvas.polygons([across_quad(cam, z, x0, x1, 0, height)], "building", M.FACADE)
    u, y = window_grid(canvas.rng, x0, x1, height)
    draw_windows(canvas, cam.project(u, y, z))


CROWN_ANGLES = np.linspace(0, 2 * np.pi, 14, endpoint=False)


def draw_tree(canvas: Canvas, cam: Camera, x: float, z: float, trunk: float, crown: float) -> None:
    """A trunk under a crown of two or three ragged, overlapping blobs that shades the ground beside it."""
    rng = canvas.rng
    fig = Figure(cam.project(x, 0.0, z), cam.focal / z)
    trunk_width = rng.uniform(0.3, 0.45)
    canvas.polygons(fig.limbs(((0, 0), (0, trunk + crown * 0.5), trunk_width)), "vegetation", M.TRUNK)
    blobs = rng.integers(2, 4)
    centres = np.stack([rng.uniform(-0.5, 0.5, blobs) * crown,
                        trunk + crown * rng.uniform(0.7, 1.3, blobs)], 1)
    radius = crown * rng.uniform(0.65, 0.9, (blobs, 1)) * rng.uniform(0.8, 1.15, (blobs, CROWN_ANGLES.size))
    ragged_circles = np.stack([radius * np.cos(CROWN_ANGLES), 1.15 * radius * np.sin(CROWN_ANGLES)], -1)
    outlines = centres[:, None] + ragged_circles
    canvas.polygons(fig.points(outlines), "vegetation", M.FOLIAGE)
    canvas.cast_shadow(ground_ellipse(cam, x + crown, z, crown, crown * 0.7))


def draw_tree_line(canvas: Canvas, cam: Camera, x: np.ndarray, z: np.ndarray) -> None:
    """A dense row of crowns as one polygon with a ragged top, standing on the baseline (x, z)."""
    tops = canvas.rng.uniform(5, 11, len(x))
    outline = np.concatenate([cam.project(x, tops, z), cam.project(x[::-1], 0.0, z[::-1])])
    canvas.polygons([outline], "vegetation", M.FOLIAGE)


def baseline(start: float, stop: float, spacing: float = 2.5) -> np.ndarray:
    return np.linspace(start, stop, max(2, int(abs(stop - start) / spacing)))


def draw_hedge(canvas: Canvas, cam: Camera, x: float, z0: float, z1: float, height: float) -> None:
    canvas.polygons([along_quad(cam, x, z0, z1, 0, height)], "vegetation", M.FOLIAGE)


def draw_frontage(canvas: Canvas, cam: Camera, street: Street, side: int, priors: LayoutPriors) -> None:
    """The side of the street beyond the sidewalk: a row of segments, painted far to near."""
    rng = canvas.rng
    segments, z = [], 0.5
    while z < street.end:
        length = rng.uniform(10, 30)
        kind = FRONTAGE_KINDS[rng.choice(len(FRONTAGE_KINDS), p=priors.frontage_weights)]
        segments.append((kind, z, min(z + length, street.end)))
        z += length
    x = street.frontage(side)
    for kind, z0, z1 in reversed(segments):
        if kind == "building":
            draw_building_along(canvas, cam, side, x + side * rng.uniform(0, 1.5), z0, z1, rng.uniform(8, 24))
            continue
        behind = rng.random()  # what stands behind the park, wall or fence: a building, trees or nothing
        if behind < 0.45:
            set_back = x + side * rng.uniform(12, 20)
            draw_building_along(canvas, cam, side, set_back, z0, z1, rng.uniform(10, 25))
        elif behind < 0.8:
            z = baseline(z0, z1)
            draw_tree_line(canvas, cam, np.full(len(z), x + side * rng.uniform(6, 12)), z)
        canvas.polygons([ground_quad(cam, x, x + side * 12, z0, z1)], "terrain", M.GRASS)
        for tz in np.arange(min(z1, 40) - rng.uniform(1, 4), z0, -rng.uniform(5, 9)):
            if rng.random() < 0.7:
                tx = x + side * rng.uniform(2, 5)
                draw_tree(canvas, cam, tx, tz, rng.uniform(2, 4), rng.uniform(2, 3.5))
        if kind == "park" and rng.random() < 0.5:
            draw_hedge(canvas, cam, x + side * 0.3, z0, z1, rng.uniform(0.8, 1.5))
        elif kind == "wall":
            canvas.polygons([along_quad(cam, x, z0, z1, 0, rng.uniform(1.2, 3.0))], "wall", M.WALL)
        elif kind == "fence":
            canvas.polygons([along_quad(cam, x, z0, z1, 0, rng.uniform(1.0, 2.0))], "fence", M.FENCE)


def draw_street_end(canvas: Canvas, cam: Camera, street: Street, width: int) -> None:
    """The cross street that closes the view (as far as the camera sees it): buildings and trees facing it."""
    rng = canvas.rng
    x, right = (np.array([-5.0, width + 5.0]) - cam.centre_x) * street.end / cam.focal
    x -= rng.uniform(0, 10)
    while x < right:
        span = rng.uniform(8, 25)
        if rng.random() < 0.65:
            draw_building_across(canvas, cam, street.end, x, x + span, rng.uniform(5, 20))
        else:
            tree_x = baseline(x, x + span)
            draw_tree_line(canvas, cam, tree_x, np.full(len(tree_x), street.end - 2))
        x += span


# --- street furniture -------------------------------------------------------------------------------------


def draw_street_lamp(canvas: Canvas, cam: Camera, x: float, z: float, side: int) -> None:
    rng = canvas.rng
    height, arm = rng.uniform(7, 9), rng.uniform(1.2, 2.2)
    fig = Figure(cam.project(x, 0.0, z), cam.focal / z)
    canvas.polygons(fig.limbs(((0, 0), (0, height), 0.3),
                              ((0, height - 0.1), (-side * arm, height + 0.2), 0.18)), "pole", M.POLE)
    head = ((-side * (arm - 0.1), height + 0.05), (-side * (arm + 0.6), height + 0.05), 0.3)
    canvas.polygons(fig.limbs(head), "pole", M.LAMP)
    canvas.add_light(ground_ellipse(cam, x - side * arm, z, 6, 6), rng.uniform(0.7, 1.1))


def draw_sign(canvas: Canvas, cam: Camera, x: float, z: float) -> None:
    rng = canvas.rng
    fig = Figure(cam.project(x, 0.0, z), cam.focal / z)
    size, bottom = rng.uniform(0.9, 1.3), rng.uniform(1.9, 2.6)
    canvas.polygons(fig.limbs(((0, 0), (0, bottom + size * 0.5), 0.2)), "pole", M.POLE)
    cy, r = bottom + size / 2, size / 2
    shape = rng.integers(4)
    if shape == 0:  # round
        canvas.ellipse(*fig.ellipse((0, cy), r, r), "traffic sign", M.SIGN)
        canvas.ellipse(*fig.ellipse((0, cy), 0.65 * r, 0.65 * r), "traffic sign", M.SIGN_SYMBOL)
        return
    if shape == 1:  # triangle, pointing up or down
        tip = rng.choice([-1, 1])
        outline = np.array([(-r, cy - tip * 0.85 * r), (r, cy - tip * 0.85 * r), (0, cy + tip * r)])
    elif shape == 2:  # diamond
        outline = np.array([(0, cy - r), (r, cy), (0, cy + r), (-r, cy)])
    else:  # information panel
        outline = np.array([(-1.3 * r, cy - 0.8 * r), (1.3 * r, cy - 0.8 * r), (1.3 * r, cy + 0.8 * r),
                            (-1.3 * r, cy + 0.8 * r)])
    centroid = outline.mean(0)
    canvas.polygons([fig.points(outline)], "traffic sign", M.SIGN)
    canvas.polygons([fig.points(centroid + 0.6 * (outline - centroid))], "traffic sign", M.SIGN_SYMBOL)


def draw_signal_head(canvas: Canvas, fig: Figure, x: float, bottom: float) -> None:
    """A traffic-light housing (drawn larger than life) with one lamp lit."""
    w, h = 0.6, 1.5
    housing = [(x - w / 2, bottom), (x + w / 2, bottom), (x + w / 2, bottom + h), (x - w / 2, bottom + h)]
    canvas.polygons([fig.points(housing)], "traffic light", M.SIGNAL_BOX)
    lit = canvas.rng.integers(3)
    lamp = fig.ellipse((x, bottom + h * (0.2 + 0.3 * lit)), 0.15, 0.15)
    canvas.ellipse(*lamp, "traffic light", M.SIGNAL_LAMP)


def draw_traffic_light(canvas: Canvas, cam: Camera, street: Street, side: int, z: float) -> None:
    rng = canvas.rng
    x = street.kerb(side) + side * 0.5
    fig = Figure(cam.project(x, 0.0, z), cam.focal / z)
    if rng.random() < 0.4:  # a gantry over the road
        reach = rng.uniform(3, 6)
        canvas.polygons(fig.limbs(((0, 0), (0, 6.0), 0.3), ((0, 5.8), (-side * reach, 5.8), 0.2)),
                        "pole", M.POLE)
        draw_signal_head(canvas, fig, -side * reach * 0.8, 4.4)
    else:
        top = rng.uniform(3.0, 3.8)
        canvas.polygons(fig.limbs(((0, 0), (0, top), 0.25)), "pole", M.POLE)
        draw_signal_head(canvas, fig, 0.0, top - 0.2)


# --- people and two-wheelers ------------------------------------------------------------------------------


def draw_person(canvas: Canvas, cam: Camera, x: float, z: float, height: float) -> None:
    """A pedestrian, stockier than life so that people stay learnable at low resolution."""
    rng = canvas.rng
    fig = Figure(cam.project(x, 0.0, z), cam.focal / z * height / 1.75, rng.uniform(0.75, 1.0))
    stride, swing = rng.uniform(0, 0.22), rng.uniform(-0.15, 0.15)
    legs = fig.limbs(((-0.1, 0.9), (-0.1 - stride, 0.0), 0.2), ((0.1, 0.9), (0.1 + stride, 0.0), 0.2))
    canvas.polygons(legs, "person", M.CLOTHES)
    torso = fig.points([(-0.24, 0.82), (0.24, 0.82), (0.28, 1.48), (-0.28, 1.48)])
    arms = fig.limbs(((-0.27, 1.42), (-0.32 + swing, 0.82), 0.13), ((0.27, 1.42), (0.32 - swing, 0.82), 0.13))
    canvas.polygons([torso, *arms], "person", M.CLOTHES)
    canvas.ellipse(*fig.ellipse((0, 1.61), 0.14, 0.16), "person", M.SKIN)


def draw_wheel(canvas: Canvas, fig: Figure, centre, radius: float, hub: float, cls: str) -> None:
    canvas.ellipse(*fig.ellipse(centre, radius, radius), cls, M.TYRE)
    canvas.ellipse(*fig.ellipse(centre, hub, hub), cls, M.SPOKES)


def draw_bicycle(canvas: Canvas, fig: Figure) -> tuple[tuple[float, float], tuple[float, float]]:
    """A side-view bicycle facing +x; returns where a rider's seat and handlebar are."""
    rear, front, crank = (-0.55, 0.35), (0.55, 0.35), (0.0, 0.3)
    seat, bar = (-0.15, 0.95), (0.45, 1.05)
    for hub in (rear, front):
        draw_wheel(canvas, fig, hub, 0.36, 0.27, "bicycle")
    head_tube = (0.42, 0.9)
    frame = fig.limbs((rear, crank, 0.08), (crank, seat, 0.08), (seat, head_tube, 0.08),
                      (crank, head_tube, 0.08), (rear, seat, 0.07), (head_tube, front, 0.08),
                      (head_tube, bar, 0.07), ((-0.3, 0.98), (0.0, 0.98), 0.08))
    canvas.polygons(frame, "bicycle", M.FRAME)
    return seat, bar


def draw_motorcycle(canvas: Canvas, fig: Figure) -> tuple[tuple[float, float], tuple[float, float]]:
    rear, front = (-0.7, 0.33), (0.7, 0.33)
    for hub in (rear, front):
        draw_wheel(canvas, fig, hub, 0.34, 0.18, "motorcycle")
    body = [(-0.8, 0.5), (0.5, 0.42), (0.78, 0.7), (0.5, 1.0), (-0.15, 0.95), (-0.75, 0.85)]
    canvas.polygons([fig.points(body), *fig.limbs(((0.5, 0.9), front, 0.1))], "motorcycle", M.FRAME)
    canvas.polygons([fig.points([(-0.3, 0.35), (0.2, 0.35), (0.25, 0.7), (-0.3, 0.7)])], "motorcycle", M.TYRE)
    return (-0.25, 0.9), (0.5, 1.05)


def draw_rider(canvas: Canvas, fig: Figure, seat, bar, helmet: bool) -> None:
    sx, sy = seat
    shoulder, knee, foot = (sx + 0.28, sy + 0.58), (sx + 0.38, sy - 0.25), (sx + 0.22, 0.3)
    canvas.polygons(fig.limbs((seat, knee, 0.16), (knee, foot, 0.13)), "rider", M.CLOTHES)
    canvas.polygons(fig.limbs((seat, shoulder, 0.36), (shoulder, bar, 0.1)), "rider", M.CLOTHES)
    head = (shoulder[0] + 0.06, shoulder[1] + 0.18)
    r = 0.16 if helmet else 0.12
    canvas.ellipse(*fig.ellipse(head, r, r * 1.1), "rider", M.CLOTHES if helmet else M.SKIN)


def draw_two_wheeler(canvas: Canvas, cam: Camera, x: float, z: float, ridden: bool) -> None:
    rng = canvas.rng
    facing = rng.choice([-1.0, 1.0])
    fig = Figure(cam.project(x, 0.0, z), cam.focal / z, facing * rng.uniform(0.45, 1.0))
    motor = rng.random() < 0.4
    seat, bar = draw_motorcycle(canvas, fig) if motor else draw_bicycle(canvas, fig)
    if ridden:
        draw_rider(canvas, fig, seat, bar, helmet=motor)


# --- vehicles ---------------------------------------------------------------------------------------------


def draw_vehicle_lights(canvas: Canvas, cam: Camera, cls: str, x0: float, x1: float, y: float, z: float,
                        oncoming: bool) -> None:
    """Head lights face the camera on oncoming vehicles, tail lights on the others; both light up at night."""
    lamps = [across_quad(cam, z, x0 + 0.05, x0 + 0.4, y, y + 0.22),
             across_quad(cam, z, x1 - 0.4, x1 - 0.05, y, y + 0.22)]
    canvas.polygons(lamps, cls, M.HEADLIGHT if oncoming else M.TAILLIGHT)
    if oncoming:
        canvas.add_light(ground_quad(cam, x0 - 0.5, x1 + 0.5, max(z - 14, 1.0), z), 0.5)


def draw_car(canvas: Canvas, cam: Camera, x: float, z: float, oncoming: bool) -> None:
    box = partial(box_outline, cam)
    length = canvas.rng.uniform(3.9, 4.8)
    x0, x1 = x - 0.9, x + 0.9
    canvas.polygons([box(x0 + 0.05, x1 - 0.05, 0, 0.45, z + 0.2, z + length - 0.2)], "car", M.TYRE)
    paint = canvas.polygons([box(x0, x1, 0.3, 1.0, z, z + length)], "car", M.CAR_PAINT)
    canvas.polygons([box(x0 + 0.15, x1 - 0.15, 1.0, 1.45, z + 1.0, z + length - 1.2)], "car", M.GLASS)
    roof = box(x0 + 0.18, x1 - 0.18, 1.42, 1.5, z + 1.1, z + length - 1.3)
    canvas.polygons([roof], "car", M.CAR_PAINT, paint)
    draw_vehicle_lights(canvas, cam, "car", x0, x1, 0.7, z, oncoming)


def draw_truck(canvas: Canvas, cam: Camera, x: float, z: float, oncoming: bool) -> None:
    """A cab and a cargo box; whichever is nearer the camera is painted last."""
    box = partial(box_outline, cam)
    cab, cargo = 2.2, canvas.rng.uniform(5, 8)
    x0, x1 = x - 1.25, x + 1.25
    cab_z, cargo_z = (z, z + cab) if oncoming else (z + cargo, z)

    def draw_cab():
        canvas.polygons([box(x0 + 0.05, x1 - 0.05, 0.6, 2.9, cab_z, cab_z + cab)], "truck", M.TRUCK_PAINT)
        windscreen = box(x0 + 0.04, x1 - 0.04, 1.8, 2.6, cab_z + 0.1, cab_z + cab - 0.6)
        canvas.polygons([windscreen], "truck", M.GLASS)

    def draw_cargo():
        canvas.polygons([box(x0, x1, 0.9, 3.8, cargo_z, cargo_z + cargo)], "truck", M.TRUCK_PAINT)

    canvas.polygons([box(x0 + 0.1, x1 - 0.1, 0, 0.9, z + 0.3, z + cab + cargo - 0.3)], "truck", M.TYRE)
    for draw in (draw_cargo, draw_cab) if oncoming else (draw_cab, draw_cargo):
        draw()
    draw_vehicle_lights(canvas, cam, "truck", x0, x1, 0.7, z, oncoming)


def draw_long_body(canvas: Canvas, cam: Camera, cls: str, x0: float, x1: float, z: float, length: float,
                   wheels: float, body: tuple[float, float], glass: tuple[float, float], paint):
    """Wheels, a painted box and a band of windows along it (buses, trams); returns the paint colour."""
    box = partial(box_outline, cam)
    canvas.polygons([box(x0 + 0.1, x1 - 0.1, 0, wheels, z + 0.5, z + length - 0.5)], cls, M.TYRE)
    painted = canvas.polygons([box(x0, x1, *body, z, z + length)], cls, paint)
    canvas.polygons([box(x0 - 0.01, x1 + 0.01, *glass, z - 0.01, z + length - 0.3)], cls, M.GLASS)
    return painted


def draw_bus(canvas: Canvas, cam: Camera, x: float, z: float, oncoming: bool) -> None:
    length = canvas.rng.uniform(11, 13)
    x0, x1 = x - 1.25, x + 1.25
    draw_long_body(canvas, cam, "bus", x0, x1, z, length, 0.4, (0.3, 3.1), (1.3, 2.5), M.BUS_PAINT)
    draw_vehicle_lights(canvas, cam, "bus", x0, x1, 0.6, z, oncoming)


def draw_tram(canvas: Canvas, cam: Camera, x: float, z: float, oncoming: bool) -> None:
    box = partial(box_outline, cam)
    length = canvas.rng.uniform(22, 30)
    x0, x1 = x - 1.3, x + 1.3
    paint = draw_long_body(canvas, cam, "train", x0, x1, z, length, 0.45, (0.35, 3.4), (1.2, 2.4), M.TRAM_PAINT)
    roof = box(x - 0.6, x + 0.6, 3.4, 3.8, z + length * 0.3, z + length * 0.6)
    canvas.polygons([roof], "train", M.TRAM_PAINT, paint * 0.6)
    middle = z + length * 0.45
    pantograph = Figure(cam.project(x, 0.0, middle), cam.focal / middle)
    canvas.polygons(pantograph.limbs(((-0.5, 3.8), (0.3, 4.6), 0.1), ((0.3, 4.6), (-0.3, 5.3), 0.1)),
                    "train", M.POLE, np.full(3, 0.2, np.float32))
    draw_vehicle_lights(canvas, cam, "train", x0, x1, 0.8, z, oncoming)


# --- placing everything -----------------------------------------------------------------------------------


class RoadSpace:
    """Footprints of what stands on the road, so that vehicles never overlap."""

    def __init__(self):
        self.footprints: list[tuple[float, float, float, float]] = []

    def claim(self, x: float, half_width: float, z: float, length: float) -> bool:
        """Take the footprint (with a gap of a metre or two around it) unless something stands there."""
        x0, x1, z0, z1 = x - half_width - 0.3, x + half_width + 0.3, z - 2, z + length + 2
        if any(x0 < b1 and b0 < x1 and z0 < c1 and c0 < z1 for b0, b1, c0, c1 in self.footprints):
            return False
        self.footprints.append((x0, x1, z0, z1))
        return True


# kind -> (draw, half width, longest length) in metres
VEHICLES = {"car": (draw_car, 0.9, 4.8), "truck": (draw_truck, 1.25, 10.2), "bus": (draw_bus, 1.25, 13.0),
            "train": (draw_tram, 1.3, 30.0)}


def lane_centres(street: Street) -> list[tuple[float, bool]]:
    """(x, oncoming) of the traffic lanes and the parking strips along both kerbs."""
    left, right = street.road
    lanes = [(right - 1.75, False), (left + 1.75, True), (right - 1.0, False), (left + 1.0, True)]
    if right - left > 9:
        lanes.append(((left + right) / 2, False))
    return lanes


def place_vehicles(rng: np.random.Generator, street: Street, priors: LayoutPriors, has_tram: bool):
    """(near depth, draw callable) for every vehicle, including two-wheelers with riders on the road."""
    road, placed = RoadSpace(), []
    if has_tram:
        z = near_biased_depth(rng, 6, 35)
        road.claim(street.tram_x, 1.3, z, 30)
        placed.append((z, partial(draw_tram, x=street.tram_x, z=z, oncoming=bool(rng.random() < 0.5))))
    kinds = ["car"] * rng.integers(priors.cars[0], priors.cars[1] + 1)
    kinds += ["truck"] * int(rng.random() < priors.truck_probability)
    kinds += ["bus"] * int(rng.random() < priors.bus_probability)
    lanes = lane_centres(street)
    for kind in kinds:
        draw, half_width, length = VEHICLES[kind]
        for _ in range(8):
            x, oncoming = lanes[rng.integers(len(lanes))]
            z = near_biased_depth(rng, 5.5, 70)
            if road.claim(x, half_width, z, length):
                placed.append((z, partial(draw, x=x, z=z, oncoming=oncoming)))
                break
    for _ in range(rng.integers(priors.riders[0], priors.riders[1] + 1)):
        x = street.road[1] - rng.uniform(0.6, 1.6) if rng.random() < 0.7 else rng.uniform(*street.road)
        z = near_biased_depth(rng, 5, 35)
        if road.claim(x, 0.4, z, 2):
            placed.append((z, partial(draw_two_wheeler, x=x, z=z, ridden=True)))
    return placed


def place_sidewalk_objects(rng: np.random.Generator, street: Street, priors: LayoutPriors):
    """(near depth, draw callable) for street furniture, street trees, pedestrians and parked two-wheelers."""
    placed = []
    for side in (-1, 1):
        for z in np.arange(rng.uniform(3, 14), street.end * 0.8, rng.uniform(18, 30)):
            placed.append((z, partial(draw_street_lamp, x=street.on_sidewalk(side, 0.12), z=z, side=side)))
        for z in np.arange(rng.uniform(3, 10), min(street.end * 0.8, 50), rng.uniform(7, 12)):
            if rng.random() < priors.street_tree_probability:
                on_verge = street.verge_width(side) > 0
                x = street.kerb(side) + side * 0.7 if on_verge else street.on_sidewalk(side, 0.2)
                placed.append((z, partial(draw_tree, x=x, z=z, trunk=rng.uniform(2.2, 3.2),
                                          crown=rng.uniform(1.6, 2.8))))
    for _ in range(rng.integers(priors.signs[0], priors.signs[1] + 1)):
        side, z = rng.choice([-1, 1], p=[0.3, 0.7]), near_biased_depth(rng, 5, 35)
        placed.append((z, partial(draw_sign, x=street.on_sidewalk(side, rng.uniform(0.1, 0.3)), z=z)))
    for _ in range(rng.integers(priors.traffic_lights[0], priors.traffic_lights[1] + 1)):
        side, z = rng.choice([-1, 1], p=[0.3, 0.7]), near_biased_depth(rng, 6, 40)
        placed.append((z, partial(draw_traffic_light, street=street, side=side, z=z)))
    groups = rng.integers(priors.persons[0], priors.persons[1] + 1)
    for _ in range(groups):
        side, z = rng.choice([-1, 1]), near_biased_depth(rng, 4, 35)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            x, zp = street.on_sidewalk(side, rng.uniform(0.15, 0.9)), z + rng.uniform(-1, 1)
            placed.append((zp, partial(draw_person, x=x, z=max(zp, 3.5), height=rng.uniform(1.6, 2.0))))
    for _ in range(rng.integers(priors.parked_two_wheelers[0], priors.parked_two_wheelers[1] + 1)):
        side, z = rng.choice([-1, 1]), near_biased_depth(rng, 4, 30)
        placed.append((z, partial(draw_two_wheeler, x=street.on_sidewalk(side, rng.uniform(0.1, 0.9)), z=z,
                                  ridden=False)))
    return placed


def draw_bonnet(canvas: Canvas, height: int, width: int) -> None:
    """The ego vehicle's bonnet at the bottom of the frame (unlabelled, as in Cityscapes)."""
    rise = height * canvas.rng.uniform(0.04, 0.07)
    centre, axes = (width / 2, height + width * 0.25 - rise), (width * 0.8, width * 0.25)
    canvas.ellipse(centre, axes, "unlabeled", M.BONNET)


def build_scene(rng: np.random.Generator, domain: str, height: int, width: int) -> tuple[Canvas, Camera]:
    """Lay out and rasterise one street: ground, the street's end, both frontages, then everything standing
    on the road and sidewalks from far to near."""
    priors = PRIORS[domain]
    cam = Camera(focal=width * rng.uniform(*priors.focal), horizon=height * rng.uniform(*priors.horizon),
                 centre_x=width * (0.5 + rng.uniform(-0.1, 0.1)))
    has_tram = rng.random() < priors.tram_probability
    street = sample_street(rng, has_tram)
    canvas = Canvas(height, width, rng, PALETTES[domain])
    draw_ground(canvas, cam, street, rng)
    draw_street_end(canvas, cam, street, width)
    for side in (-1, 1):
        draw_frontage(canvas, cam, street, side, priors)
    objects = place_vehicles(rng, street, priors, has_tram) + place_sidewalk_objects(rng, street, priors)
    for _, draw in sorted(objects, key=lambda item: -item[0]):
        draw(canvas=canvas, cam=cam)
    if priors.ego_bonnet:
        draw_bonnet(canvas, height, width)
    return canvas, cam


# ---------------------------------------------------------------------------------------------------------
# Appearance.  Every look starts from the canvas's flat colours (the per-class palette) and adds textures,
# sky, lighting and a camera; the three looks differ in all of these.


def material_flags(materials) -> np.ndarray:
    """A lookup table material -> bool, so that a mask is one indexing operation."""
    flags = np.zeros(len(Material), bool)
    flags[list(materials)] = True
    return flags


IS_ROAD_SURFACE = material_flags(ROAD_SURFACE)
IS_GROUND = material_flags(GROUND)


def unit_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance uniform noise; four times cheaper than Gaussian and as good for pixels."""
    raw = np.frombuffer(rng.bytes(int(np.prod(shape))), np.uint8).reshape(shape)
    return (raw.astype(np.float32) - 127.5) * (1 / 73.9)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Zero-mean, unit-variance noise whose blobs are about ``cell`` pixels wide."""
    h, w = shape
    grid = unit_noise(rng, (h // cell + 3, w // cell + 3))
    field = cv2.resize(grid, (grid.shape[1] * cell, grid.shape[0] * cell), interpolation=cv2.INTER_CUBIC)
    field = field[cell:cell + h, cell:cell + w]
    return (field - field.mean()) / (field.std() + 1e-6)


TEXTURE_CELLS = (2, 6, 20)  # fine, medium and coarse blobs, in pixels


def texture_table(default, overrides: dict[Material, tuple[float, float, float]]) -> np.ndarray:
    """(materials, 3) relative amplitudes of the noise scales of TEXTURE_CELLS."""
    table = np.tile(np.array(default, np.float32), (len(Material), 1))
    for material, amplitudes in overrides.items():
        table[material] = amplitudes
    return table


SOURCE_TEXTURE = texture_table((0.015, 0.02, 0.03), {
    M.SKY: (0, 0, 0), M.FOLIAGE: (0.05, 0.06, 0.08), M.GRASS: (0.04, 0.05, 0.05)})
TARGET_TEXTURE = texture_table((0.02, 0.02, 0.03), {
    M.SKY: (0, 0, 0),  # clouds instead
    M.ASPHALT: (0.05, 0.1, 0.15), M.PAVEMENT: (0.1, 0.08, 0.1), M.GRASS: (0.15, 0.1, 0.1),
    M.FACADE: (0.06, 0.12, 0.2), M.WALL: (0.1, 0.12, 0.15), M.FOLIAGE: (0.15, 0.12, 0.15),
    M.GLASS: (0.04, 0.1, 0.1), M.BONNET: (0.02, 0.05, 0.1)})


def apply_textures(rgb: np.ndarray, material: np.ndarray, table: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Multiplicative noise at three scales, as strong as each material's row of ``table`` says."""
    gain = np.ones(material.shape, np.float32)
    for scale, cell in enumerate(TEXTURE_CELLS):
        gain += table[material, scale] * smooth_noise(rng, material.shape, cell)
    return rgb * gain[..., None]


def target_only_textures(rgb: np.ndarray, material: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class textures that no global colour transform can produce: leaves with gaps, a metal lattice fence."""
    out = rgb.copy()
    foliage = material == M.FOLIAGE
    leaves = smooth_noise(rng, material.shape, 2)[foliage]
    out[foliage] *= np.where(leaves > 0.5, 0.45, 1.0 + 0.15 * leaves)[:, None]
    fence = material == M.FENCE
    rows, cols = np.nonzero(fence)
    out[fence] *= np.where((cols % 3 == 0) | (rows % 4 == 0), 1.25, 0.55)[:, None]
    return out


def rows_with(mask: np.ndarray) -> slice:
    """The band of rows that holds every True of ``mask`` (sky lies above the horizon, road below it)."""
    rows = np.flatnonzero(mask.any(1))
    return slice(rows[0], rows[-1] + 1) if rows.size else slice(0, 0)


def gradient_sky(rgb: np.ndarray, material: np.ndarray, zenith: np.ndarray, horizon: float) -> np.ndarray:
    """A clean, vivid sky: deep at the top, pale at the horizon."""
    sky = material == M.SKY
    t = np.clip(np.arange(rgb.shape[0], dtype=np.float32) / max(horizon, 1.0), 0, 1)[:, None] ** 0.8
    pale = 0.35 * zenith + 0.65 * np.array([0.95, 0.97, 1.0], np.float32)
    colour_of_row = zenith * (1 - t) + pale * t
    out = rgb.copy()
    out[sky] = np.broadcast_to(colour_of_row[:, None], rgb.shape)[sky]
    return out


def overcast_sky(rgb: np.ndarray, material: np.ndarray, base: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Grey, textured clouds with the odd patch of pale blue."""
    band = rows_with(material == M.SKY)
    sky = material[band] == M.SKY
    shape = sky.shape
    if not sky.any():
        return rgb
    clouds = 0.65 * smooth_noise(rng, shape, 24) + 0.35 * smooth_noise(rng, shape, 8)
    darker_above = np.linspace(0.85, 1.0, shape[0], dtype=np.float32)[:, None]
    brightness = (darker_above * (1 + 0.16 * clouds))[sky][:, None]
    gap = np.clip(-(clouds[sky] + 1.0) * 2, 0, 1)[:, None]
    out = rgb.copy()
    out[band][sky] = base * brightness * (1 - gap) + np.array([0.5, 0.63, 0.8], np.float32) * gap
    return out


def wet_road(rgb: np.ndarray, material: np.ndarray, strength: float) -> np.ndarray:
    """A wet road mirrors what stands on it: each road pixel reflects the scene above its nearest edge."""
    road = IS_ROAD_SURFACE[material]
    band = rows_with(road)
    road = road[band]
    rows = np.arange(band.start, band.stop)[:, None]
    edge = np.maximum.accumulate(np.where(road, band.start - 1, rows), axis=0)  # last non-road row above
    mirrored_rows = np.clip(2 * edge - rows, 0, rgb.shape[0] - 1)
    mirror = rgb[mirrored_rows, np.arange(rgb.shape[1])[None, :]]
    mirror = cv2.GaussianBlur(mirror, (0, 0), sigmaX=0.7, sigmaY=2.0)
    out = rgb.copy()
    out[band][road] = rgb[band][road] * ((1 - strength) * 0.85) + mirror[road] * strength
    return out


def shade_ground(rgb: np.ndarray, material: np.ndarray, shadow: np.ndarray, darkness: float) -> np.ndarray:
    """Darken the ground inside the cast shadows; what stands in front of a shadow stays lit."""
    shaded = (shadow > 0) & IS_GROUND[material]
    out = rgb.copy()
    out[shaded] *= darkness
    return out


def vignette(rgb: np.ndarray, strength: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    y, x = np.ogrid[-1:1:complex(0, h), -1:1:complex(0, w)]
    return rgb * (1 - strength * (x ** 2 + y ** 2) / 2).astype(np.float32)[..., None]


def jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    _, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def camera_response(rgb: np.ndarray, rng: np.random.Generator, *, saturation: float, exposure: float,
                    gamma: float, vignetting: float, blur: float, noise: float,
                    jpeg: int | None) -> np.ndarray:
    """A camera's global effects: saturation, white balance, exposure and gamma are what a global colour
    transfer can undo; vignetting, blur, sensor noise and compression it cannot."""
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    rgb = rgb * saturation + grey[..., None] * (1 - saturation)
    white_balance = rng.uniform(0.9, 1.1, 3).astype(np.float32)
    rgb = np.clip(rgb * (white_balance * exposure), 0, 1) ** gamma
    rgb = vignette(rgb, vignetting)
    if blur:
        rgb = cv2.GaussianBlur(rgb, (0, 0), blur)
    rgb = rgb + unit_noise(rng, rgb.shape) * noise
    out = cv2.convertScaleAbs(np.clip(rgb, 0, 1), alpha=255)  # rounds; numpy's uint8 cast is far slower
    return jpeg_round_trip(out, jpeg) if jpeg else out


def source_look(canvas: Canvas, cam: Camera, rng: np.random.Generator) -> np.ndarray:
    """GTA-like: saturated, bright, vivid sky, flat fills and crisp edges."""
    material = canvas.material_map()
    rgb = apply_textures(canvas.flat_colours(), material, SOURCE_TEXTURE, rng)
    rgb = gradient_sky(rgb, material, canvas.colours[0], cam.horizon)
    return camera_response(rgb, rng, saturation=1.2, exposure=rng.uniform(1.0, 1.1), gamma=1.0,
                           vignetting=0.0, blur=0.0, noise=0.006, jpeg=None)


def target_albedo(canvas: Canvas, material: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The target's surfaces before light and camera: shared by the day and night looks."""
    rgb = apply_textures(canvas.flat_colours(), material, TARGET_TEXTURE, rng)
    return target_only_textures(rgb, material, rng)


def target_look(canvas: Canvas, cam: Camera, rng: np.random.Generator) -> np.ndarray:
    """Cityscapes-like: overcast or sunny with cast shadows, often a wet road, a real camera's response."""
    material = canvas.material_map()
    rgb = target_albedo(canvas, material, rng)
    rgb = overcast_sky(rgb, material, canvas.colours[0], rng)
    if rng.random() < 0.5:
        rgb = shade_ground(rgb, material, canvas.shadow, rng.uniform(0.45, 0.6))
    if rng.random() < 0.6:
        rgb = wet_road(rgb, material, rng.uniform(0.2, 0.4))
    return camera_response(rgb, rng, saturation=rng.uniform(0.55, 0.8), exposure=rng.uniform(0.8, 1.2),
                           gamma=rng.uniform(0.8, 1.25), vignetting=rng.uniform(0.15, 0.35),
                           blur=rng.uniform(0.4, 0.9), noise=rng.uniform(0.008, 0.02),
                           jpeg=int(rng.integers(30, 71)))


def emission_table(emission: dict[Material, tuple[float, float, float]]) -> np.ndarray:
    table = np.zeros((len(Material), 3), np.float32)
    for material, colour in emission.items():
        table[material] = colour
    return table


# Light emitted at night, linear RGB (above 1 saturates the camera).  Signal lamps glow in their own colour.
NIGHT_EMISSION = emission_table({M.WINDOW_LIT: (1.0, 0.78, 0.45), M.LAMP: (1.6, 1.4, 1.1),
                                 M.HEADLIGHT: (2.0, 2.0, 1.8), M.TAILLIGHT: (1.4, 0.12, 0.08)})


def night_glow(canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) light emitted by each patch, every patch (a facade's lit windows, a lamp) as bright as
    it happens to be."""
    materials = np.array(canvas.materials)
    emission = NIGHT_EMISSION[materials] * rng.uniform(0.6, 1.2, (len(materials), 1)).astype(np.float32)
    signals = materials == M.SIGNAL_LAMP
    emission[signals] = np.array(canvas.colours, np.float32)[signals] * 1.6
    return emission[canvas.index]


def ego_headlight_beam(cam: Camera, shape: tuple[int, int]) -> np.ndarray:
    """The ego car's low beams: brightest just ahead, fading with distance."""
    return sum(light_pool(shape, ground_quad(cam, -2.5, 2.5, 2.0, far), intensity)
               for far, intensity in ((30, 0.25), (16, 0.3), (9, 0.35)))


def night_sky(rgb: np.ndarray, material: np.ndarray, horizon: float, rng: np.random.Generator) -> np.ndarray:
    """Dark blue with the orange glow of the city near the horizon and faint clouds."""
    band = rows_with(material == M.SKY)
    sky = material[band] == M.SKY
    if not sky.any():
        return rgb
    height_above = np.clip((horizon - np.arange(rgb.shape[0], dtype=np.float32)[band]) / rgb.shape[0], 0, 1)
    glow = np.exp(-height_above / 0.18)[:, None] * np.array([0.16, 0.1, 0.06], np.float32)
    colour_of_row = np.array([0.02, 0.03, 0.07], np.float32) + glow
    clouds = 1 + 0.25 * smooth_noise(rng, sky.shape, 16)
    out = rgb.copy()
    out[band][sky] = np.broadcast_to(colour_of_row[:, None], sky.shape + (3,))[sky] * clouds[sky][:, None]
    return out


def night_look(canvas: Canvas, cam: Camera, rng: np.random.Generator) -> np.ndarray:
    """The target at night: moon-light, lamp pools, head/tail lights, lit windows, glare and heavy noise."""
    material = canvas.material_map()
    albedo = target_albedo(canvas, material, rng)
    lamp_colour = np.array([(1.0, 0.72, 0.4), (0.95, 0.97, 1.0)][rng.integers(2)], np.float32)
    pools = canvas.light + ego_headlight_beam(cam, material.shape)
    lamp_light = cv2.GaussianBlur(pools, (0, 0), material.shape[0] / 40)
    ambient = rng.uniform(0.16, 0.26) * np.array([0.8, 0.9, 1.15], np.float32)
    rgb = albedo * (ambient + lamp_light[..., None] * lamp_colour)
    rgb = night_sky(rgb, material, cam.horizon, rng)
    glow = night_glow(canvas, rng)
    emitting = glow.any(-1)
    rgb[emitting] = glow[emitting]
    rgb += cv2.GaussianBlur(glow, (0, 0), 2.0) * 0.8
    if rng.random() < 0.6:
        rgb = wet_road(rgb, material, rng.uniform(0.25, 0.45))
    return camera_response(rgb, rng, saturation=rng.uniform(0.6, 0.85), exposure=rng.uniform(1.0, 1.4),
                           gamma=rng.uniform(0.7, 0.85), vignetting=rng.uniform(0.2, 0.4),
                           blur=rng.uniform(0.5, 0.9), noise=rng.uniform(0.02, 0.04),
                           jpeg=int(rng.integers(30, 61)))


LOOKS = {"source": source_look, "target": target_look, "night": night_look}


def render_scene(seed: int, domain: str, height: int = DEFAULT_HEIGHT,
                 width: int = DEFAULT_WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (H, W, 3) uint8 RGB and (H, W) uint8 Cityscapes label IDs (0 = unlabelled).

    Deterministic in (seed, domain); the domains share the scene grammar, not the scenes.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain '{domain}' (expected one of {', '.join(DOMAINS)})")
    rng = np.random.default_rng([seed, DOMAINS.index(domain)])
    canvas, cam = build_scene(rng, domain, height, width)
    return LOOKS[domain](canvas, cam, rng), canvas.label_map()


# ---------------------------------------------------------------------------------------------------------
# Writing a benchmark in the real raw layouts.

GTA5_DIR, CITYSCAPES_DIR, ACDC_DIR = "gta5", "cityscapes", "acdc"
# Invented names in the real naming schemes; like Cityscapes, train and val come from different cities.
TARGET_CITIES = {"train": ("arnsfeld", "brelingen", "corvenstadt"), "val": ("dornhagen", "elmsrode")}
NIGHT_SEQUENCES = {"train": ("GOPR0417", "GOPR0423", "GOPR0431"), "val": ("GOPR0502", "GOPR0517")}


def labelid_palette() -> np.ndarray:
    """The Cityscapes colours at the label-ID indices, as GTA5's palette label PNGs carry them."""
    palette = np.zeros((256, 3), np.uint8)
    for train_id, colour in enumerate(CITYSCAPES19.colors):
        palette[TRAIN_TO_LABELID[train_id]] = colour
    return palette


GTA5_PALETTE = labelid_palette()
MAT_HEADER_TEXT_BYTES = 116


@dataclass(frozen=True)
class SampleFiles:
    domain: str
    split: str
    index: int  # position within its domain's split: with the seed, it alone decides the scene
    image: Path
    label: Path


def sample_files(out_root: Path, domain: str, split: str, index: int, source_train: int) -> SampleFiles:
    """Where sample ``index`` of ``split`` goes in its domain's real layout."""
    if domain == "source":  # GTA5: frames numbered 1..N, train first; split.mat says which is which
        name = f"{index + 1 + (source_train if split == 'val' else 0):05d}.png"
        root = out_root / GTA5_DIR
        return SampleFiles(domain, split, index, root / "images" / name, root / "labels" / name)
    if domain == "target":
        cities = TARGET_CITIES[split]
        city = cities[index % len(cities)]
        stem = f"{city}_{index // len(cities):06d}_000019"
        root = out_root / CITYSCAPES_DIR
        return SampleFiles(domain, split, index,
                           root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                           root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    sequences = NIGHT_SEQUENCES[split]
    sequence = sequences[index % len(sequences)]
    stem = f"{sequence}_frame_{index // len(sequences):06d}"
    root = out_root / ACDC_DIR
    return SampleFiles(domain, split, index,
                       root / "rgb_anon" / "night" / split / sequence / f"{stem}_rgb_anon.png",
                       root / "gt" / "night" / split / sequence / f"{stem}_gt_labelTrainIds.png")


def scene_seed(seed: int, split: str, index: int) -> int:
    return int(np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(1)[0])


def write_label(files: SampleFiles, label_ids: np.ndarray) -> None:
    """Each layout's own label format: label IDs in GTA5 palette PNGs and Cityscapes 'L' PNGs, train IDs
    in ACDC's 'L' PNGs."""
    if files.domain == "source":
        write_id_png(files.label, label_ids, GTA5_PALETTE)
    elif files.domain == "target":
        write_label_png(files.label, label_ids)
    else:
        write_label_png(files.label, LABELID_LUT[label_ids])


def write_sample(files: SampleFiles, seed: int, height: int, width: int) -> None:
    rgb, label_ids = render_scene(scene_seed(seed, files.split, files.index), files.domain, height, width)
    write_rgb(files.image, rgb)
    write_label(files, label_ids)


def check_counts(counts: dict[str, dict[str, int]]) -> None:
    for domain, per_split in counts.items():
        if domain not in DOMAINS or not set(per_split) <= set(SPLITS):
            raise ValueError(f"synthetic counts: expected {{domain: {{split: n}}}} with domains in "
                             f"{DOMAINS} and splits in {SPLITS}, got {domain}: {per_split}")


def write_benchmark(out_root: str | Path, height: int, width: int, counts: dict[str, dict[str, int]],
                    seed: int, workers: int = 1, progress: bool = True) -> None:
    """Render the benchmark into ``out_root`` in the real raw layouts.

    ``counts`` = {domain: {split: n}} for domains source (-> ``gta5/``, GTA5 layout with ``split.mat``),
    target (-> ``cityscapes/``) and night (-> ``acdc/``, native layout, condition 'night').  Every image
    depends only on (seed, domain, split, index), never on ``workers``.
    """
    check_counts(counts)
    out_root = Path(out_root)
    source_train = counts.get("source", {}).get("train", 0)
    jobs = [sample_files(out_root, domain, split, i, source_train)
            for domain, per_split in counts.items() for split, n in per_split.items() for i in range(n)]
    for folder in {f.image.parent for f in jobs} | {f.label.parent for f in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    if "source" in counts:
        write_gta5_split(out_root / GTA5_DIR / "split.mat", source_train, counts["source"].get("val", 0))
    render = partial(write_sample, seed=seed, height=height, width=width)
    with tqdm(total=len(jobs), desc="synthesize", unit="img", disable=not progress) as bar:
        if workers > 1:
            with multiprocessing.Pool(workers) as pool:
                for _ in pool.imap_unordered(render, jobs, chunksize=16):
                    bar.update()
        else:
            for job in jobs:
                render(job)
                bar.update()


def write_gta5_split(path: Path, train: int, val: int) -> None:
    """GTA5's ``split.mat``: 1-based frame numbers as column vectors, no test frames."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"trainIds": np.arange(1, train + 1, dtype=np.int32).reshape(-1, 1),
                              "valIds": np.arange(train + 1, train + val + 1, dtype=np.int32).reshape(-1, 1),
                              "testIds": np.zeros((0, 1), np.int32)})
    mat = bytearray(buffer.getvalue())
    # The first 116 bytes of a MAT 5 file are free text, where scipy puts the creation time; a fixed text
    # keeps the benchmark byte-identical from run to run.
    header = b"MATLAB 5.0 MAT-file, GTA5 split of the synthetic benchmark"
    mat[:MAT_HEADER_TEXT_BYTES] = header.ljust(MAT_HEADER_TEXT_BYTES)
    path.write_bytes(bytes(mat))
