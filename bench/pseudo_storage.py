"""Disk of a hard pseudo-label set at Cityscapes' size: the stored confidence, as the writer stores it
(a uint8 code exact at the set's threshold, in a PNG) against a float16 map (2 bytes a pixel).

    python bench/pseudo_storage.py [--images 8] [--size 1024 2048] [--classes 19] [--stride 8]
                                   [--logit-scale 12] [--threshold 0.95] [--out FILE]

Each frame's maps come the way the writer's do: logits at the network's output stride (DeepLabV2:
8), smooth within regions of one class, upsampled bilinearly to the image; the label is their
argmax and the confidence the maximum of their softmax (float32).  ``--logit-scale`` sets how sure
the constructed model is; the share of pixels above the threshold is reported beside the sizes
(CPSL keeps the pixels above 0.95).  Per map: the bytes of a float16 ``.npy``, of the code PNG
(lib.pseudo.artifact.encode_confidence, lib.io.write_label_png) and of the label PNG, and whether
each form keeps exactly the pixels the float32 map keeps.  Extrapolated to Cityscapes train (2975).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.io import write_label_png  # noqa: E402
from lib.pseudo.artifact import CODE_KEPT, encode_confidence  # noqa: E402

CITYSCAPES_TRAIN = 2975


def constructed_maps(rng: np.random.Generator, size: tuple[int, int], classes: int, stride: int,
                     logit_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(label uint8, confidence float32) of one frame: logits at ``size / stride`` made of class
    regions (each cell of a coarse grid favours one class) plus noise, upsampled bilinearly."""
    h, w = (-(-s // stride) + 1 for s in size)
    region = rng.integers(0, classes, (max(h // 8, 1), max(w // 8, 1)))
    favoured = np.kron(region, np.ones((8, 8), np.int64))[:h, :w]
    favoured = np.pad(favoured, ((0, h - favoured.shape[0]), (0, w - favoured.shape[1])), mode="edge")
    logits = rng.normal(0.0, 1.0, (classes, h, w)).astype(np.float32)
    logits[favoured, np.arange(h)[:, None], np.arange(w)[None, :]] += 2.0
    up = F.interpolate(torch.from_numpy(logits * logit_scale / 4)[None], size=size, mode="bilinear",
                       align_corners=True)[0]
    conf, label = torch.softmax(up, 0).max(0)
    return label.numpy().astype(np.uint8), conf.numpy()


def measure(args) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(args.images):
            label, conf = constructed_maps(rng, tuple(args.size), args.classes, args.stride, args.logit_scale)
            kept = conf.astype(np.float64) > args.threshold
            code = encode_confidence(conf, args.threshold)
            np.save(folder / "f16.npy", conf.astype(np.float16))
            write_label_png(folder / "code.png", code)
            write_label_png(folder / "label.png", label)
            rows.append({"float16_npy": (folder / "f16.npy").stat().st_size,
                         "code_png": (folder / "code.png").stat().st_size,
                         "label_png": (folder / "label.png").stat().st_size,
                         "kept_share": float(kept.mean()),
                         "code_mask_exact": bool(np.array_equal(code >= CODE_KEPT, kept)),
                         "float16_mask_exact": bool(np.array_equal(
                             conf.astype(np.float16).astype(np.float64) > args.threshold, kept))})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("float16_npy", "code_png", "label_png", "kept_share")}
    return {"size": args.size, "classes": args.classes, "stride": args.stride, "logit_scale": args.logit_scale,
            "threshold": args.threshold, "images": args.images, "per_image_bytes": mean,
            "code_mask_exact": all(r["code_mask_exact"] for r in rows),
            "float16_mask_exact": all(r["float16_mask_exact"] for r in rows),
            "cityscapes_train_gb": {k: mean[k] * CITYSCAPES_TRAIN / 1e9 for k in ("float16_npy", "code_png", "label_png")},
            "code_over_float16": mean["code_png"] / mean["float16_npy"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048])
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--logit-scale", type=float, default=12.0)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    res = measure(args)
    gb = res["cityscapes_train_gb"]
    print(f"per image at {args.size[0]}x{args.size[1]} ({res['per_image_bytes']['kept_share']:.1%} of pixels above "
          f"{args.threshold}): float16 {res['per_image_bytes']['float16_npy'] / 2**20:.2f} MB, code PNG "
          f"{res['per_image_bytes']['code_png'] / 2**20:.2f} MB ({res['code_over_float16']:.3f}x), label PNG "
          f"{res['per_image_bytes']['label_png'] / 2**20:.2f} MB")
    print(f"Cityscapes train ({CITYSCAPES_TRAIN}): float16 {gb['float16_npy']:.1f} GB, code {gb['code_png']:.2f} GB, "
          f"labels {gb['label_png']:.2f} GB; kept mask exact: code {res['code_mask_exact']}, "
          f"float16 {res['float16_mask_exact']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
