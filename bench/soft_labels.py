"""Peak memory of the loader per soft-labelled sample: the stored map read at its own size (the loss
samples it, lib.pseudo.stream) against the map upsampled to the image before the transforms.

    python bench/soft_labels.py [--size 1024 2048] [--classes 19] [--stride 8] [--out FILE]

One Cityscapes-sized frame and its stored soft label (float16, the logits' grid of DeepLabV2 at
output stride 8 with ceil-mode pooling, as the soft form writes it) go through CPSL stage 1's target
transforms (resize to 1024x2048, rescale U(0.537, 1.611), 512x896 crop, flip, normalise).  Each
way runs in its own process; its figure is the rise of the process's peak resident memory during
the loads (the peak reset after the set-up) over the same loads without a label.  The stored-size
figure includes reading the label at the crop, which training does in the loss.  Prints a table
and writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAYS = ("none", "full_size", "stored_size")


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0                           # kB
    except OSError:
        pass
    return None


def reset_peak() -> float:
    """Resident memory now, with the peak reset to it (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mb("VmRSS") or peak_mb()


def peak_mb() -> float:
    """The process's peak resident memory since the last :func:`reset_peak`."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def one_process(way: str, size: tuple[int, int], classes: int, stride: int, draws: int) -> dict:
    """Set up, then load ``draws`` transformed samples the chosen way; the peak resident memory."""
    import numpy as np
    import pandas as pd
    import torch

    from lib.data.streams import DataParams, train_transforms
    from lib.pseudo.artifact import PseudoLabels
    from lib.pseudo.stream import SOFT_GRID, soft_at, soft_grid

    torch.set_num_threads(1)
    cells = (-(-size[0] // stride) + 1, -(-size[1] // stride) + 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "soft").mkdir()
        rng = np.random.default_rng(0)
        stored = rng.random((classes, *cells), dtype=np.float32)
        np.save(path / "soft/frame.npy", (stored / stored.sum(0)).astype(np.float16))
        index = pd.DataFrame({"id": ["frame"], "height": [size[0]], "width": [size[1]], "soft": ["soft/frame.npy"]})
        labels = PseudoLabels(path, {"form": "soft", "num_classes": classes}, index, None, None)
        image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        data = DataParams(resize=(1024, 2048), scale=(0.537, 1.611), crop=(512, 896), flip=True)
        transforms = train_transforms(data, "imagenet")
        before = reset_peak()
        for k in range(draws):
            generator = np.random.default_rng([0, k])
            if way == "full_size":
                sample = transforms({"image": image, "soft": labels.sample("frame")["soft"]}, generator)
                soft = sample["soft"]
            elif way == "stored_size":
                sample = transforms({"image": image, SOFT_GRID: soft_grid(size, cells, cells)}, generator)
                soft = soft_at(torch.from_numpy(labels.stored_soft("frame"))[None], sample[SOFT_GRID][None],
                               tuple(sample["image"].shape[-2:]))[0]
            else:
                sample = transforms({"image": image}, generator)
                soft = None
            del sample, soft
        return {"way": way, "peak_rise_mb": peak_mb() - before, "peak_mb": peak_mb()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)      # one measuring process
    args = parser.parse_args(argv)
    if args.way:
        print(json.dumps(one_process(args.way, tuple(args.size), args.classes, args.stride, args.draws)))
        return
    rows = {}
    for way in WAYS:
        out = subprocess.run([sys.executable, __file__, "--way", way, "--size", *map(str, args.size),
                              "--classes", str(args.classes), "--stride", str(args.stride),
                              "--draws", str(args.draws)], capture_output=True, text=True, check=True)
        rows[way] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["none"]["peak_rise_mb"]
    result = {"size": list(args.size), "classes": args.classes, "stride": args.stride,
              "per_sample_mb": {way: rows[way]["peak_rise_mb"] - base for way in ("full_size", "stored_size")}}
    full, stored = result["per_sample_mb"]["full_size"], result["per_sample_mb"]["stored_size"]
    result["ratio"] = stored / full if full > 0 else None
    print(f"loader peak memory per soft-labelled {args.size[0]}x{args.size[1]} sample, {args.classes} classes, "
          f"over the same load without a label:")
    print("| way | MB |\n|---|---|")
    print(f"| upsampled to the image, then transformed | {full:.0f} |")
    print(f"| stored size + sampling grid, read at the crop | {stored:.0f} |")
    print(f"ratio: {result['ratio']:.3f}")
    if args.out:
        from lib.io import write_json_atomic
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
