"""Time our evaluation path against the official Cityscapes evaluator on the same PNGs.

    python bench/eval_speed.py [--images N] [--size HxW] [--device cpu|cuda] [--repeat R] [--out results.json]

Writes N ground-truth ``*_gtFine_labelIds.png`` (synthetic scenes from
``lib.data.synthetic.render_scene``, rendered at a quarter of the size and upscaled nearest) and
N predictions (the train-ID ground truth with blocky corruption, exported with
``export_label_ids``) into a temporary folder; then, in the same process,

(a) ``cityscapesscripts`` ``evaluateImgLists`` (no instance-level score, no pixel accuracy): PIL
    decodes both PNGs, and its compiled ``addToConfusionMatrix`` counts them if the installed
    package has it, else ``np.unique`` on a fused index (the PyPI wheel ships no addon, and its
    sdist not the ``.pyx`` to build one: the JSON records which ran);
(b) ours: both PNGs decoded by OpenCV, label ID -> train ID with ``cv2.LUT``,
    ``ConfusionMatrix.update`` (one bincount of the fused index), ``summarize``.

Both sides read the same files from the page cache and do the same work (two decodes, two maps
of the ground truth's ids, one count per image).  The repeats alternate which side runs first, and
the ratio is the median of the per-repeat ratios (each side's seconds are reported too).  Checks
that both mIoUs and the 19x19 matrices agree.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.data.classes import CITYSCAPES19, LABELID_LUT, TRAIN_TO_LABELID  # noqa: E402
from lib.data.synthetic import render_scene  # noqa: E402
from lib.infer.metrics import ConfusionMatrix, summarize  # noqa: E402
from lib.infer.report import export_label_ids  # noqa: E402
from lib.io import read_label_png, write_label_png  # noqa: E402

CITY = "benchcity"


def parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    if h < 4 or w < 4:
        raise argparse.ArgumentTypeError("size must be at least 4x4")
    return h, w


def write_pairs(root: Path, n: int, height: int, width: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    gt_files, pred_files = [], []
    block = 16
    for i in range(n):
        _, small = render_scene(i, "target", max(1, height // 4), max(1, width // 4))
        gt_ids = cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)
        train = LABELID_LUT[gt_ids]
        pred = np.where(train == 255, 0, train).astype(np.uint8)
        # blocky corruption: ~20% of 16x16 blocks get a random class
        bh, bw = -(-height // block), -(-width // block)
        blocks = np.where(rng.random((bh, bw)) < 0.2, rng.integers(0, 19, (bh, bw)), 255)
        blocks = np.repeat(np.repeat(blocks, block, 0), block, 1)[:height, :width]
        pred = np.where(blocks != 255, blocks, pred).astype(np.uint8)
        stem = f"{CITY}_{i:06d}_000019"
        gt_path = root / "gtFine" / "val" / CITY / f"{stem}_gtFine_labelIds.png"
        gt_path.parent.mkdir(parents=True, exist_ok=True)
        write_label_png(gt_path, gt_ids)
        pred_path = root / "results" / f"{stem}_pred.png"
        export_label_ids(pred, pred_path)
        gt_files.append(str(gt_path))
        pred_files.append(str(pred_path))
    return pred_files, gt_files


def official_addon() -> bool:
    """Whether ``cityscapesscripts`` counts with its compiled addon here."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
    return bool(cs_eval.CSUPPORT)


def run_official(pred_files: list[str], gt_files: list[str]) -> tuple[float, dict]:
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

    args = copy.copy(cs_eval.args)
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.quiet = True
    args.JSONOutput = False
    start = time.perf_counter()
    result = cs_eval.evaluateImgLists(pred_files, gt_files, args)
    return time.perf_counter() - start, result


def run_ours(pred_files: list[str], gt_files: list[str], device: str) -> tuple[float, float, dict, np.ndarray]:
    start = time.perf_counter()
    decode = 0.0
    lut = LABELID_LUT.astype(np.uint8)
    cm = ConfusionMatrix(19, device)
    for pred_path, gt_path in zip(pred_files, gt_files):
        t0 = time.perf_counter()
        pred = cv2.LUT(read_label_png(pred_path), lut)
        gt = cv2.LUT(read_label_png(gt_path), lut)
        decode += time.perf_counter() - t0
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    summary = summarize(cm.matrix, CITYSCAPES19.names)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, decode, summary, cm.numpy()


def interleaved(pred_files: list[str], gt_files: list[str], device: str, repeat: int) -> tuple[list, list]:
    """``repeat`` runs of each side, the first side alternating from one repeat to the next."""
    official, ours = [], []
    for r in range(repeat):
        sides = [lambda: official.append(run_official(pred_files, gt_files)),
                 lambda: ours.append(run_ours(pred_files, gt_files, device))]
        for side in (sides if r % 2 == 0 else sides[::-1]):
            side()
    return official, ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--size", type=parse_size, default=(1024, 2048), help="HxW (default 1024x2048)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats (the first side alternates)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the official evaluator is single-threaded, "
                             "and OpenMP threads on a loaded 2-core machine slow small ops down a lot)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    height, width = opts.size

    with tempfile.TemporaryDirectory(prefix="eval_speed_") as tmp:
        t0 = time.perf_counter()
        pred_files, gt_files = write_pairs(Path(tmp), opts.images, height, width)
        print(f"wrote {opts.images} prediction/GT pairs at {height}x{width} "
              f"in {time.perf_counter() - t0:.1f} s")
        if opts.device.startswith("cuda"):  # initialise CUDA outside the timings
            torch.zeros(1, device=opts.device)

        official_runs, ours_runs = interleaved(pred_files, gt_files, opts.device, opts.repeat)
    theirs = official_runs[0][1]
    _, _, summary, matrix = ours_runs[0]
    ratios = [o[0] / t[0] for o, t in zip(ours_runs, official_runs)]
    ratio = float(np.median(ratios))
    official_s = float(np.median([t[0] for t in official_runs]))
    ours_s = float(np.median([o[0] for o in ours_runs]))
    decode_s = float(np.median([o[1] for o in ours_runs]))
    addon = official_addon()

    label_ids = [TRAIN_TO_LABELID[t] for t in range(19)]
    their_matrix = np.array(theirs["confMatrix"], np.int64)[np.ix_(label_ids, label_ids)]
    their_miou = 100.0 * theirs["averageScoreClasses"]
    agree = abs(their_miou - summary["mIoU"]) < 1e-6 and np.array_equal(matrix, their_matrix)
    n = opts.images
    counting = "compiled addon" if addon else "np.unique, no compiled addon installed"
    print(f"official cityscapesscripts: {official_s:8.2f} s  {n / official_s:8.1f} images/s  "
          f"mIoU {their_miou:.6f}  (PIL decode, {counting})")
    print(f"ours ({opts.device:>4}):               {ours_s:8.2f} s  {n / ours_s:8.1f} images/s  "
          f"mIoU {summary['mIoU']:.6f}  (OpenCV decode + cv2.LUT {decode_s:.2f} s, "
          f"counting {ours_s - decode_s:.2f} s)")
    print(f"ratio ours/official, median of {opts.repeat} interleaved repeats: {ratio:.3f} "
          f"(each: {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"mIoU and confusion matrix agree: {agree}")
    if opts.out:
        opts.out.write_text(json.dumps({"images": n, "size": [height, width], "device": opts.device,
                                        "repeat": opts.repeat, "official_s": official_s, "ours_s": ours_s,
                                        "decode_s": decode_s, "ratio": ratio, "ratios": ratios,
                                        "official_decoder": "PIL", "official_addon": addon,
                                        "ours_decoder": "OpenCV + cv2.LUT", "agree": bool(agree)}, indent=2))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
