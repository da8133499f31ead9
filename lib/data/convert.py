"""Raw dataset -> prepared dataset (the work of every ``prepare@<name>`` stage).

Three phases, so that bad input fails before the long work starts:
1. ``scan``: the reader walks the raw layout and pairs every image with its label;
2. ``check_headers``: every image and label header is opened (cheap): unreadable files, label/image
   size mismatches and label files of the wrong kind (RGB where IDs are expected, ...) fail here;
3. ``convert``: labels are decoded, mapped to train IDs (an unknown raw ID is an error), counted and
   written, in parallel with a progress bar, into a temporary folder renamed when complete.

Raw images are referenced, not copied, except under ``resize_crop`` (any layout, e.g. BlindNet's
Mapillary protocol): then the resized and cropped images are written as lossless PNGs beside the labels.
"""
from __future__ import annotations

import dataclasses
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from lib.config import parse, positive
from lib.data import prepared
from lib.data.classes import IGNORE, UNKNOWN, color_to_train_ids
from lib.data.readers import READERS, LabelFormat, RawSample
from lib.errors import ConfigError, DataError
from lib.io import atomic_dir, read_rgb, write_json_atomic, write_label_png, write_rgb

FORMAT_VERSION = 1
Image.MAX_IMAGE_PIXELS = None  # Mapillary images reach 20+ megapixels


@dataclass(frozen=True)
class PrepareParams:
    workers: int = 2
    # RobustNet class-uniform index: centroids per class in non-overlapping square tiles.
    centroid_tile: int = 1024
    # Decode every raw image once, so a corrupt file fails here and not hours into training.
    verify_images: bool = True
    # Real GTA5 holds a few frames whose label size differs from the image: fail, or skip and list them.
    size_mismatch: Literal["error", "skip"] = "error"

    def validate(self, where: str) -> None:
        positive(self.workers, f"{where}.workers")
        positive(self.centroid_tile, f"{where}.centroid_tile")


@dataclass(frozen=True)
class ResizeCrop:
    """BlindNet's Mapillary evaluation protocol (the released code, root0yang/BlindNet), applied when
    preparing the dataset.

    The image is resized to ``height`` rows, aspect kept (width ``int(w / h * height)``), bicubic
    (PIL); the label the same way, nearest; then both are centre-cropped to ``crop`` x ``crop``, the
    offset ``round((size - crop) / 2)`` (RobustNet's ResizeHeight + CenterCropPad).  BlindNet uses
    1024 / 1024, RobustNet 1536 / 1536.  A side shorter than ``crop`` (portrait images) is padded
    symmetrically, image black and label 255.  OUR CHOICE: the reference pads labels with 0 (road)
    and takes its crop origin from the unpadded size, so part of the pad counts as road and the
    image is shifted off-centre; we pad with ignore and keep the whole image centred.
    """

    height: int
    crop: int

    def validate(self, where: str) -> None:
        positive(self.height, f"{where}.height")
        positive(self.crop, f"{where}.crop")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    layout: str
    root: Path
    options: Any
    resize_crop: ResizeCrop | None = None     # generic key beside layout and root (not a reader option)


def parse_dataset_spec(name: str, raw: Any) -> DatasetSpec:
    where = f"datasets.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"params: {where} must be a mapping with 'layout' and 'root'")
    for key in ("layout", "root"):
        if not isinstance(raw.get(key), str):
            raise ConfigError(f"params: missing or non-text key '{where}.{key}'")
    if raw["root"].startswith("~"):
        raise ConfigError(f"params: {where}.root = {raw['root']!r}: '~' is not expanded (DVC takes the root "
                          "as the stage's dependency literally); write the full path")
    layout = raw["layout"]
    if layout not in READERS:
        raise ConfigError(f"params: {where}.layout = '{layout}' is not a known layout "
                          f"(expected one of {', '.join(READERS)})")
    rest = {k: v for k, v in raw.items() if k not in ("layout", "root", "resize_crop")}
    options = parse(READERS[layout].Options, rest, where)
    resize = raw.get("resize_crop")
    resize = None if resize is None else parse(ResizeCrop, resize, f"{where}.resize_crop")
    return DatasetSpec(name, layout, Path(raw["root"]), options, resize)


# --- phase 2: headers -------------------------------------------------------------------------

def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header; unreadable -> DataError naming the file."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return h, w
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as err:
        raise DataError(f"{path}: unreadable image ({type(err).__name__}; expected an image file, "
                        "e.g. PNG or JPEG)") from None


def label_header(path: Path) -> tuple[tuple[int, int], str]:
    try:
        with Image.open(path) as im:
            return (im.size[1], im.size[0]), im.mode
    except Exception as err:
        raise DataError(f"{path}: unreadable label ({type(err).__name__})") from None


def check_label_mode(path: Path, mode: str, fmt: LabelFormat) -> None:
    if fmt.kind == "ids" and mode not in ("L", "P"):
        what = "an RGB label" if mode.startswith("RGB") else f"a '{mode}' label"
        raise DataError(f"{path}: {what} where single-channel 8-bit label IDs are expected ({fmt.expected})")
    if fmt.kind == "color" and mode not in ("RGB", "RGBA", "P"):
        raise DataError(f"{path}: a single-channel '{mode}' label where RGB colour labels are expected")


def check_headers(samples: list[RawSample], fmt: LabelFormat, size_mismatch: str
                  ) -> tuple[list[RawSample], dict[str, tuple[int, int]], list[dict]]:
    """Sizes of all images; label headers checked.  Returns kept samples, sizes, skipped records."""
    kept, sizes, skipped = [], {}, []
    for s in tqdm(samples, desc="check headers", unit="img", disable=len(samples) < 2000, file=sys.stderr):
        size = image_size(s.image)
        if s.label is not None:
            label_size, mode = label_header(s.label)
            check_label_mode(s.label, mode, fmt)
            if label_size != size:
                msg = (f"{s.label}: label size {label_size[1]}x{label_size[0]} differs from its image "
                       f"{s.image} ({size[1]}x{size[0]})")
                if size_mismatch == "error":
                    raise DataError(msg + "; set prepare.size_mismatch: skip to drop such frames")
                skipped.append({"id": s.id, "reason": msg})
                continue
        kept.append(s)
        sizes[s.id] = size
    return kept, sizes, skipped


# --- phase 3: conversion ----------------------------------------------------------------------

def decode_label(path: Path, fmt: LabelFormat) -> np.ndarray:
    """Raw label file -> (H, W) uint8 train IDs (IGNORE = 255); unknown raw IDs are an error."""
    if fmt.kind == "synthia":
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise DataError(f"{path}: unreadable label (expected a 16-bit SYNTHIA GT/LABELS PNG)")
        if raw.dtype != np.uint16 or raw.ndim != 3:
            raise DataError(f"{path}: {raw.dtype} {raw.ndim}-D label where a 16-bit multi-channel "
                            "SYNTHIA GT/LABELS PNG is expected")
        raw = raw[..., 2]  # OpenCV stores channels reversed (BGR): the file's channel 0 is the last
        if raw.max(initial=0) >= 256:
            bad = int(raw.max())
            raise DataError(f"{path}: unknown label ID {bad} (expected {fmt.expected})")
        raw = raw.astype(np.uint8)
    else:
        try:
            with Image.open(path) as im:
                if fmt.kind == "color":
                    return color_to_train_ids(np.asarray(im.convert("RGB")), fmt.classes)
                raw = np.asarray(im)
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{path}: unreadable label ({type(err).__name__}: {err})") from None
    ids = fmt.lut[raw]
    unknown = ids == UNKNOWN
    if unknown.any():
        bad = np.unique(raw[unknown])[:8].tolist()
        raise DataError(f"{path}: unknown label ID(s) {bad} (expected {fmt.expected})")
    return ids


def verify_image(path: Path) -> None:
    """Decode the image with PIL and with the decoder training reads it with (lib.io.read_rgb): a file
    one of them refuses (a PNG without its IEND chunk passes PIL) fails here, not hours later."""
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except Exception as err:
        raise DataError(f"{path}: corrupt or truncated image ({type(err).__name__}: {err})") from None
    try:
        decoded = read_rgb(path)
    except DataError:
        raise DataError(f"{path}: corrupt image (OpenCV, the decoder training reads it with, cannot decode it)") from None
    if decoded.shape[1::-1] != size:
        raise DataError(f"{path}: OpenCV decodes {decoded.shape[1]}x{decoded.shape[0]}, PIL {size[0]}x{size[1]} "
                        "(expected one image size)")


def read_image(path: Path) -> Image.Image:
    """The decoded RGB image (PIL, as the reference loaders decode it); a bad file is a DataError."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:
        raise DataError(f"{path}: corrupt or truncated image ({type(err).__name__}: {err})") from None


def _centre_window(size: int, crop: int) -> tuple[slice, slice]:
    """(source, destination) slices of a centre crop of ``size`` to ``crop``, or of a centred pad."""
    if size >= crop:
        offset = int(round((size - crop) / 2))      # RobustNet's CenterCrop offset (round half to even)
        return slice(offset, offset + crop), slice(0, crop)
    before = (crop - size) // 2
    return slice(0, size), slice(before, before + size)


def resize_and_centre_crop(image: Image.Image, label: np.ndarray | None, protocol: ResizeCrop
                           ) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` (RGB) and its train-ID ``label`` under ``protocol`` (see :class:`ResizeCrop`):
    (crop, crop, 3) uint8 and (crop, crop) uint8, padding black / 255."""
    w, h = image.size
    size = (int(w / h * protocol.height), protocol.height)
    rgb = np.asarray(image.resize(size, Image.BICUBIC))
    (ys, yd), (xs, xd) = _centre_window(size[1], protocol.crop), _centre_window(size[0], protocol.crop)
    out = np.zeros((protocol.crop, protocol.crop, 3), np.uint8)
    out[yd, xd] = rgb[ys, xs]
    if label is None:
        return out, None
    resized = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    out_label = np.full((protocol.crop, protocol.crop), IGNORE, np.uint8)
    out_label[yd, xd] = resized[ys, xs]
    return out, out_label


def class_counts(label: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(label.ravel(), minlength=256)[:num_classes].astype(np.int64)


def tile_centroids(label: np.ndarray, num_classes: int, tile: int) -> list[tuple[int, int, int]]:
    """(class, cy, cx) for every class present in every full ``tile`` x ``tile`` tile.

    RobustNet uses only full tiles from (0, 0).  OUR CHOICE: a side shorter than ``tile`` is taken
    as one tile spanning that side, so small images (the synthetic benchmark) are still indexed.
    """
    h, w = label.shape
    th, tw = min(tile, h), min(tile, w)
    rows = []
    for y0 in range(0, h - th + 1, th):
        for x0 in range(0, w - tw + 1, tw):
            block = label[y0:y0 + th, x0:x0 + tw].ravel()
            pos = np.flatnonzero(block < num_classes)
            cls = block[pos]
            ys, xs = np.divmod(pos, tw)
            n = np.bincount(cls, minlength=num_classes)
            sy = np.bincount(cls, weights=ys, minlength=num_classes)
            sx = np.bincount(cls, weights=xs, minlength=num_classes)
            for c in np.flatnonzero(n):
                rows.append((int(c), y0 + int(sy[c] / n[c]), x0 + int(sx[c] / n[c])))
    return rows


@dataclass(frozen=True)
class _Job:
    sample: RawSample
    label_out: Path | None
    fmt: LabelFormat
    tile: int
    verify: bool
    image_out: Path | None = None           # with resize_crop: where the resized image goes
    resize_crop: ResizeCrop | None = None


def _convert_one(job: _Job) -> tuple[np.ndarray | None, list[tuple[int, int, int]]]:
    if job.resize_crop is not None:
        image = read_image(job.sample.image)         # decoding it verifies it
    elif job.verify:
        verify_image(job.sample.image)
    label = None if job.label_out is None else decode_label(job.sample.label, job.fmt)
    if job.resize_crop is not None:
        rgb, label = resize_and_centre_crop(image, label, job.resize_crop)
        write_rgb(job.image_out, rgb)
    if label is None:
        return None, []
    write_label_png(job.label_out, label)
    n = job.fmt.classes.num_classes
    return class_counts(label, n), tile_centroids(label, n, job.tile)


def _run_parallel(jobs: list[_Job], workers: int, desc: str):
    bar = dict(desc=desc, total=len(jobs), unit="img", file=sys.stderr, mininterval=1.0)
    if workers == 1 or len(jobs) < 2 * workers:
        yield from tqdm(map(_convert_one, jobs), **bar)
        return
    with ProcessPoolExecutor(workers) as pool:
        try:
            yield from tqdm(pool.map(_convert_one, jobs, chunksize=8), **bar)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def prepare_dataset(spec: DatasetSpec, out_dir: Path, params: PrepareParams) -> dict:
    """Scan, check and convert ``spec`` into ``out_dir`` (atomically).  Returns the meta dict."""
    reader = READERS[spec.layout]
    fmt = reader.label_format(spec.options)
    samples = reader.scan(spec.root, spec.options)
    if not samples:
        raise DataError(f"{spec.root}: no samples found for the requested splits")
    seen: dict[str, RawSample] = {}
    for s in samples:
        if s.id in seen:
            raise DataError(f"{s.image}: sample id '{s.id}' also used by {seen[s.id].image}")
        seen[s.id] = s
    samples, sizes, skipped = check_headers(samples, fmt, params.size_mismatch)
    if not samples:
        raise DataError(f"{spec.root}: every one of the {len(skipped)} frames was skipped (prepare.size_mismatch: "
                        f"skip; first: {skipped[0]['reason']}); expected labels of their images' size")
    resize = spec.resize_crop
    if resize is not None:
        sizes = {sample_id: (resize.crop, resize.crop) for sample_id in sizes}

    with atomic_dir(out_dir) as tmp:
        for split in {s.split for s in samples}:
            (tmp / "labels" / split).mkdir(parents=True)
            if resize is not None:
                (tmp / "images" / split).mkdir(parents=True)
        jobs = [_Job(s, None if s.label is None else tmp / "labels" / s.split / f"{s.id}.png",
                     fmt, params.centroid_tile, params.verify_images,
                     None if resize is None else tmp / "images" / s.split / f"{s.id}.png", resize)
                for s in samples]
        results = list(_run_parallel(jobs, params.workers, f"prepare {spec.name}"))
        meta = _write_tables(tmp, out_dir, spec, fmt, samples, sizes, results, skipped, params)
    return meta


def _write_tables(tmp: Path, out_dir: Path, spec: DatasetSpec, fmt: LabelFormat,
                  samples: list[RawSample], sizes: dict, results: list, skipped: list,
                  params: PrepareParams) -> dict:
    names = list(fmt.classes.names)
    index = pd.DataFrame({
        "id": [s.id for s in samples],
        "split": [s.split for s in samples],
        "image": [str(s.image) if spec.resize_crop is None else str(out_dir / "images" / s.split / f"{s.id}.png")
                  for s in samples],
        "label": ["" if s.label is None else str(out_dir / "labels" / s.split / f"{s.id}.png")
                  for s in samples],
        "height": [sizes[s.id][0] for s in samples],
        "width": [sizes[s.id][1] for s in samples],
    }, columns=prepared.INDEX_COLUMNS)
    index.to_csv(tmp / prepared.INDEX, index=False)

    labelled = [(s, r) for s, r in zip(samples, results) if r[0] is not None]
    counts = pd.DataFrame([r[0] for _, r in labelled], columns=names, dtype=np.int64)
    counts.insert(0, "id", [s.id for s, _ in labelled])
    counts.to_csv(tmp / prepared.COUNTS, index=False)
    centroids = pd.DataFrame([(s.id, *row) for s, r in labelled for row in r[1]],
                             columns=["id", "class", "cy", "cx"])
    centroids.to_csv(tmp / prepared.CENTROIDS, index=False)

    splits = sorted({s.split for s in samples})
    reader = READERS[spec.layout]
    expected = reader.expected_counts(spec.options)
    found = {sp: int((index["split"] == sp).sum()) for sp in splits}
    found_total = sum(found.values()) + len(skipped)
    notes = [f"{sp}: {found.get(sp, 0)} images, the full public dataset has {n}"
             for sp, n in expected.items() if sp != "total" and found.get(sp, 0) != n]
    if "total" in expected and found_total != expected["total"]:
        notes.append(f"{found_total} frames, the full public dataset has {expected['total']}")
    pixels = counts[names].sum().astype(int).tolist() if len(counts) else [0] * len(names)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "layout": spec.layout,
        "root": str(spec.root),
        "options": dataclasses.asdict(spec.options),
        "class_protocol": fmt.classes.name,
        "num_classes": fmt.classes.num_classes,
        "class_names": names,
        "ignore_index": IGNORE,
        "counts": found,
        "labelled": {sp: int(((index["split"] == sp) & (index["label"] != "")).sum()) for sp in splits},
        "pixels_per_class": dict(zip(names, pixels)),
        "centroid_tile": params.centroid_tile,
        "skipped": skipped,
        "count_notes": notes,
        "paths_relative_to": "project root",
    }
    if spec.resize_crop is not None:     # only then, so the meta of every other dataset stays as it was
        meta["resize_crop"] = dataclasses.asdict(spec.resize_crop)
    write_json_atomic(tmp / prepared.META, meta)
    return meta
