"""A stylized copy of a prepared dataset: new images, the source's labels.

:func:`write_prepared_copy` renders every image of some splits of a prepared dataset with a
caller-given ``render`` function (FDA, Reinhard, a CycleGAN generator, ...) and writes the result as
a new prepared dataset (lib.data.prepared) that every training stage can read by its name:

- ``images/<split>/<id>.png``: the rendered images (the only files copied);
- ``index.csv``: the source rows, ``image`` pointing at the new PNG, ``label`` the source's label
  path unchanged (labels are shared, never copied);
- ``class_counts.csv`` / ``centroids.csv``: the source's rows of the copied ids (the labels did
  not change, so neither did their statistics);
- ``meta.json``: the source meta with ``name``, ``counts``, ``labelled`` and ``pixels_per_class``
  restricted to the copied splits, plus ``derived_from``, ``stylization`` and ``stats``.
"""
from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lib.data.prepared import (
    CENTROIDS,
    COUNTS,
    INDEX,
    INDEX_COLUMNS,
    META,
    load_index,
    load_meta,
    resolve,
)
from lib.errors import DataError
from lib.io import atomic_dir, read_rgb, write_json_atomic, write_rgb

# render(images uint8 (B, 3, H, W) on the device, ids) -> float (B, 3, H, W), nominally 0..255
Render = Callable[[torch.Tensor, list[str]], torch.Tensor]


def rows_of_splits(source: Path, splits) -> pd.DataFrame:
    """The source's rows of ``splits``, in split order then file order; a missing split is an error."""
    return pd.concat([load_index(source, split) for split in splits], ignore_index=True)


def equal_size_batches(heights, widths, batch_size: int) -> list[list[int]]:
    """Row numbers in runs of consecutive rows of one size, each run cut into chunks of batch_size.

    Keeping rows in order (rather than grouping all sizes) keeps the output independent of how
    sizes are spread; real GTA5 has only a few frames of another size, so few batches are short.
    """
    sizes = list(zip(heights, widths))
    batches: list[list[int]] = []
    for i, size in enumerate(sizes):
        if batches and len(batches[-1]) < batch_size and size == sizes[i - 1]:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


class _SourceImages(Dataset):
    """Row i of the index as a (3, H, W) uint8 tensor; the size must match the index's."""

    def __init__(self, rows: pd.DataFrame):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows.iloc[i]
        path = resolve(row["image"])
        rgb = read_rgb(path)
        if rgb.shape[:2] != (row["height"], row["width"]):
            raise DataError(f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]} but the index says "
                            f"{row['width']}x{row['height']}")
        return {"image": torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), "id": row["id"]}


def to_uint8(rendered: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Round and clip to uint8; also returns how many values lay outside [0, 255] before clipping."""
    clipped = int(((rendered < 0) | (rendered > 255)).sum())
    return rendered.round().clamp_(0, 255).to(torch.uint8), clipped


def _check_rendered(rendered: torch.Tensor, images: torch.Tensor, ids: list[str]) -> None:
    if rendered.shape != images.shape:
        raise ValueError(f"render returned shape {tuple(rendered.shape)} for images of shape {tuple(images.shape)}")
    if not torch.isfinite(rendered).all():
        raise ValueError(f"render returned non-finite values in the batch starting with id {ids[0]}")


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """(H, W, 3) images of one height in a row, separated by white columns."""
    spacer = np.full((images[0].shape[0], gap, 3), 255, np.uint8)
    parts = [part for image in images for part in (image, spacer)][:-1]
    return np.concatenate(parts, axis=1)


def write_prepared_copy(source: Path, out: Path, render: Render, *, splits, batch_size: int,
                        device: torch.device, desc: str, meta: dict, workers: int = 0,
                        examples: Path | None = None, n_examples: int = 4) -> dict:
    """Render the images of ``splits`` of prepared dataset ``source`` into prepared dataset ``out``.

    ``out`` is written atomically and its index paths are ``out / images / <split> / <id>.png`` as
    given, so pass it relative to the project root (``data/prepared/<name>``) like every prepared
    dataset.  Images are loaded with ``workers`` DataLoader workers in batches of at most
    ``batch_size`` consecutive images of one size, moved to ``device`` and rendered; the output is
    rounded and clipped to uint8, and the fraction of clipped values is recorded (FDA itself does
    not clip).  ``meta`` describes the stylization (it lands in meta.json as ``stylization``).
    With ``examples``, the first ``n_examples`` images are also written there (atomically) as
    ``<id>.png`` panels "source | rendered" for DVC image plots.  Returns the stats of meta.json.
    """
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"{out}: a stylized copy cannot replace its source (the labels live there)")
    rows = rows_of_splits(source, splits)
    source_meta = load_meta(source)
    batches = equal_size_batches(rows["height"], rows["width"], batch_size)
    loader = DataLoader(_SourceImages(rows), batch_sampler=batches, num_workers=workers,
                        pin_memory=device.type == "cuda")
    clipped = values = 0
    panels: list[tuple[str, np.ndarray]] = []
    # cv2 releases the GIL while encoding, so threads write PNGs while the next batch loads and renders
    with atomic_dir(out) as tmp, concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for split in splits:
            (tmp / "images" / split).mkdir(parents=True)
        pending: list[concurrent.futures.Future] = []
        with tqdm(total=len(rows), desc=desc, unit="img") as progress:
            for batch_rows, batch in zip(batches, loader):
                images, ids = batch["image"].to(device, non_blocking=True), batch["id"]
                with torch.no_grad():
                    rendered = render(images, ids)
                _check_rendered(rendered, images, ids)
                result, n_clipped = to_uint8(rendered)
                clipped, values = clipped + n_clipped, values + rendered.numel()
                result = result.permute(0, 2, 3, 1).cpu().numpy()
                for future in pending:  # one batch in flight: bounded memory, and errors surface early
                    future.result()
                pending = [pool.submit(write_rgb, tmp / "images" / split / f"{sample_id}.png", image)
                           for sample_id, split, image in zip(ids, rows["split"].iloc[batch_rows], result)]
                if examples is not None and len(panels) < n_examples:
                    sources = batch["image"].permute(0, 2, 3, 1).numpy()
                    panels += [(i, side_by_side(s, r)) for i, s, r in zip(ids, sources, result)]
                progress.update(len(ids))
            for future in pending:
                future.result()
        stats = {"images": len(rows), "clipped_fraction": clipped / max(values, 1)}
        _write_tables(source, tmp, rows, out)
        write_json_atomic(tmp / META, _derived_meta(source_meta, source, out, rows, meta, stats))
        if examples is not None:  # inside the dataset's atomic block: a failure here leaves neither
            with atomic_dir(examples) as panel_dir:
                for sample_id, panel in panels[:n_examples]:
                    write_rgb(panel_dir / f"{sample_id}.png", panel)
    return stats


def _write_tables(source: Path, tmp: Path, rows: pd.DataFrame, out: Path) -> None:
    index = rows[INDEX_COLUMNS].copy()
    index["image"] = [str(out / "images" / split / f"{i}.png") for i, split in zip(index["id"], index["split"])]
    index.to_csv(tmp / INDEX, index=False)
    ids = set(rows["id"])
    for table in (COUNTS, CENTROIDS):
        if (source / table).is_file():
            df = pd.read_csv(source / table, dtype={"id": str})
            df[df["id"].isin(ids)].to_csv(tmp / table, index=False)


def _derived_meta(source_meta: dict, source: Path, out: Path, rows: pd.DataFrame, stylization: dict,
                  stats: dict) -> dict:
    splits = list(dict.fromkeys(rows["split"]))
    meta = dict(source_meta, name=out.name, derived_from=source.name, stylization=stylization, stats=stats)
    meta["counts"] = {s: int((rows["split"] == s).sum()) for s in splits}
    meta["labelled"] = {s: int(((rows["split"] == s) & (rows["label"] != "")).sum()) for s in splits}
    if "pixels_per_class" in source_meta and (source / COUNTS).is_file():
        counts = pd.read_csv(source / COUNTS, dtype={"id": str})
        counts = counts[counts["id"].isin(set(rows["id"]))]
        meta["pixels_per_class"] = {c: int(counts[c].sum()) for c in source_meta["pixels_per_class"]}
    return meta
