"""Levers on the default demo's training step, as ratios in one run: output stride 16 against 8,
channels_last against NCHW, in fp32 (what a CPU without native bf16 computes).

    python bench/demo_levers.py [--batch 8] [--crop 64 128] [--depth 18] [--rounds 5] [--steps 4] [--out results.json]

Each variant trains the source-only objective (CE + 0.1 aux CE) of the default's DeepLabV2 with
AdamW on one fixed random batch.  Every round runs every variant once (warm-up step untimed, then
``--steps`` timed steps), the order rotating from round to round; the result per variant is the
median over rounds of its seconds per step, and its ratio to the first variant (stride 8, NCHW).
To see an AVX2-only CPU on one with AVX-512, run it under ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` (the JSON records both variables).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.losses.segmentation import cross_entropy  # noqa: E402
from lib.models import ModelParams, build_model  # noqa: E402

VARIANTS = {"stride 8, NCHW": (8, False), "stride 16, NCHW": (16, False),
            "stride 8, channels_last": (8, True), "stride 16, channels_last": (16, True)}


def step_seconds(model: torch.nn.Module, opt: torch.optim.Optimizer, image: torch.Tensor, label: torch.Tensor,
                 steps: int) -> float:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(image)
        size = label.shape[-2:]
        logits = torch.nn.functional.interpolate(out.logits, size, mode="bilinear", align_corners=True)
        aux = torch.nn.functional.interpolate(out.aux_logits, size, mode="bilinear", align_corners=True)
        (cross_entropy(logits, label) + 0.1 * cross_entropy(aux, label)).backward()
        opt.step()
    step()      # warm-up: allocator, oneDNN primitives
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, nargs=2, default=(64, 128))
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 3, *args.crop, generator=g)
    label = torch.randint(0, 19, (args.batch, *args.crop), generator=g)
    runs = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            stride, channels_last = VARIANTS[name]
            torch.manual_seed(0)
            model = build_model(ModelParams(arch="deeplabv2", depth=args.depth, bn="batch", output_stride=stride), 19)
            x = image
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                x = image.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            runs[name].append(step_seconds(model.train(), opt, x, label, args.steps))
    base = statistics.median(runs[names[0]])
    result = {"batch": args.batch, "crop": list(args.crop), "depth": args.depth, "rounds": args.rounds,
              "steps": args.steps, "threads": torch.get_num_threads(),
              "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
              "variants": {name: {"s_per_step": round(statistics.median(t), 4), "runs": [round(v, 4) for v in t],
                                  "ratio": round(statistics.median(t) / base, 3)} for name, t in runs.items()}}
    print(f"DeepLabV2-R{args.depth}, batch {args.batch} x {args.crop[0]}x{args.crop[1]}, fp32, "
          f"{args.rounds} rounds x {args.steps} steps, env {result['env']}")
    for name, row in result["variants"].items():
        print(f"  {name:<26} {row['s_per_step']:.4f} s/step  x{row['ratio']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
