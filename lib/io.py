"""Atomic outputs and checked image reading/writing."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lib.errors import DataError

cv2.setNumThreads(1)  # we parallelise across images; OpenCV's own threads would oversubscribe


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    On any exception the temporary folder is removed and ``final`` is left untouched, so a killed
    or failed stage never leaves a half-written output that looks finished.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB; a missing or undecodable file is a DataError naming it."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        reason = "file not found" if not Path(path).exists() else "not a readable image"
        raise DataError(f"{path}: {reason} (expected an RGB image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_rgb(path: str | os.PathLike, rgb: np.ndarray, jpeg_quality: int = 95) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if str(path).endswith(".jpg") else []
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
        raise DataError(f"{path}: could not write image")


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """(H, W) uint8 label as stored (train IDs for prepared labels)."""
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None or lab.ndim != 2 or lab.dtype != np.uint8:
        raise DataError(f"{path}: not a readable single-channel 8-bit label PNG")
    return lab


def write_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(label, dtype=np.uint8)):
        raise DataError(f"{path}: could not write label PNG")


def write_id_png(path: str | os.PathLike, ids: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Palette ('P') PNG whose pixel values are IDs, the way GTA5, Cityscapes and Mapillary ship them."""
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    pal = palette if palette is not None else np.stack([np.arange(256)] * 3, 1).astype(np.uint8)
    img.putpalette(pal.reshape(-1).tolist())
    img.save(path)
