"""The checked torch file I/O every checkpoint of the project goes through.

Files are plain dicts of tensors, numbers and strings, written to a temporary file and renamed,
and read back with ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling (a
pickled object smuggled into a checkpoint) is refused with a clear error instead of executed.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from lib.errors import DataError
from lib.io import output_error, remove_stale_temporaries, temporary_sibling

MODEL_FILE = "model.pt"
ZIP_MAGIC = b"PK\x03\x04"      # torch.save's zip format
PICKLE_MAGIC = b"\x80"          # its legacy format: a pickle stream (protocol 2 and up)


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary sibling renamed over ``path``; a failed write (disk full, a file
    where the folder should be) is a one-line OutputError and leaves ``path`` as it was."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)     # a SIGKILLed run's half-written copy
        # through a Python file object: torch's own file writer hides the OS error behind a RuntimeError
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        cause = err if isinstance(err, OSError) else err.__context__
        if not isinstance(cause, OSError):
            raise
        raise output_error(path, cause) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def load_checked(path: str | os.PathLike, what: str) -> dict:
    """``torch.load`` with weights_only=True; every failure is a one-line DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:4] != ZIP_MAGIC and head[:1] != PICKLE_MAGIC:
        raise DataError(f"{path}: not a readable {what} (not a PyTorch file: expected one written by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Unsupported global" in str(err) or "Unsupported operand" in str(err):
            first = "it contains pickled Python objects, which are refused (weights_only=True)"
        elif "weights_only" in str(err):
            first = f"a damaged or truncated PyTorch file: {type(err).__name__}"
        raise DataError(f"{path}: not a readable {what} ({first})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a {what} (expected a dict, found {type(obj).__name__})")
    return obj
