"""Atomic outputs and checked image reading/writing."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lib.errors import WRITE_ERRNOS, DataError, OutputError

cv2.setNumThreads(1)  # we parallelise across images; OpenCV's own threads would oversubscribe


def output_error(path: str | os.PathLike, err: OSError) -> OutputError:
    """One line naming the output that could not be written, and why (disk full, not a folder, ...)."""
    blocker = None
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in Path(path).parents if p.is_file()), None)
    reason = f"{blocker} is a file, not a folder" if blocker else err.strerror or str(err)
    return OutputError(f"{path}: could not be written ({reason}); any earlier version is left as it was")


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}"


def remove_stale_temporaries(path: Path) -> None:
    """Delete what a killed write of ``path`` left beside it (its temporary and retired copies)."""
    for stale in [*path.parent.glob(f".{glob.escape(path.name)}.tmp-*"),
                  *path.parent.glob(f".{glob.escape(path.name)}.old-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary sibling folder; on success it replaces ``final`` in one rename.

    On any exception the temporary folder is removed and ``final`` is left untouched, so a killed
    or failed stage never leaves a half-written output that looks finished.  A write that fails for
    want of space (or a folder that cannot be made) is a one-line OutputError naming the file as it
    would be named in ``final``.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        tmp = temporary_sibling(final)
        tmp.mkdir()
    except OSError as err:
        raise output_error(final, err) from None
    try:
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            err = output_error(err.filename or final, err)
        if isinstance(err, OutputError):   # name the file where it was going, not its temporary folder
            raise OutputError(str(err).replace(str(tmp), str(final))) from None
        raise
    old = temporary_sibling(final, "old")
    try:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except OSError as err:
        if old.exists() and not final.exists():
            old.rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise output_error(final, err) from None
    shutil.rmtree(old, ignore_errors=True)


def check_writable(final: str | os.PathLike) -> None:
    """Fail now, not after hours of work, when ``final`` could not be written: its folder is made
    and a temporary file created and removed there (a file in the way, a read-only mount, a full
    disk are one OutputError naming ``final``)."""
    final = Path(final)
    probe = temporary_sibling(final, "probe")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as err:
        raise output_error(final, err) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        raise output_error(path, err) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB, the pixel array as stored; a missing or undecodable file is a DataError
    naming it.  An EXIF orientation tag is ignored, as PIL (the reference loaders, and the prepare
    stage that measures every image) ignores it: rotating the image would misalign it with its label."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        reason = "file not found" if not Path(path).exists() else "not a readable image"
        raise DataError(f"{path}: {reason} (expected an RGB image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_rgb(path: str | os.PathLike, rgb: np.ndarray, jpeg_quality: int = 95) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if str(path).endswith(".jpg") else []
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params):
        raise OutputError(f"{path}: could not be written (OpenCV failed to encode or write the image)")


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """(H, W) uint8 label as stored (train IDs for prepared labels)."""
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None or lab.ndim != 2 or lab.dtype != np.uint8:
        raise DataError(f"{path}: not a readable single-channel 8-bit label PNG")
    return lab


def write_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(label, dtype=np.uint8)):
        raise OutputError(f"{path}: could not be written (OpenCV failed to encode or write the label PNG)")


def write_id_png(path: str | os.PathLike, ids: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Palette ('P') PNG whose pixel values are IDs, the way GTA5, Cityscapes and Mapillary ship them."""
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    pal = palette if palette is not None else np.stack([np.arange(256)] * 3, 1).astype(np.uint8)
    img.putpalette(pal.reshape(-1).tolist())
    img.save(path)
