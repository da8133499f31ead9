"""Training-loop overhead: the engine against a bare forward/backward loop, same model, same batch.

    python bench/train_overhead.py [--iters 40] [--repeats 3] [--batch 8] [--crop 96 192] [--arch deeplabv2]
                                   [--depth 18] [--log-every 10] [--checkpoint-every 100] [--out results.json]

Both loops train the source-only objective (CE + 0.1 aux CE) of a randomly initialised model with
SGD and the poly schedule on one fixed in-memory batch, so the data loader is out of the picture and
the difference is what the engine (``lib.train.loop.train``) adds: moving batches, the NaN guard's
per-iteration sync, scheduler and method dispatch, DVCLive logging every ``--log-every``
iterations, tqdm and checkpoints every ``--checkpoint-every``.
Both sides time the same span: from a built model to the end of its last step (the bare loop's
optimizer and scheduler construction inside it, as the engine's are).  The repeats come in pairs
whose order alternates (bare then engine, engine then bare, ...) so that neither side always runs
on warmer caches; the ratio is the median of the per-pair ratios, reported with their range, and
the target is engine/bare <= 1.05.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.device import select_device  # noqa: E402
from lib.losses.segmentation import cross_entropy  # noqa: E402
from lib.methods.base import ParamGroup  # noqa: E402
from lib.methods.source_only import SourceOnly, SourceOnlyParams  # noqa: E402
from lib.models import ModelParams, build_model  # noqa: E402
from lib.train.loop import TrainParams, train  # noqa: E402
from lib.train.optim import (  # noqa: E402
    OptimizerParams,
    ScheduleParams,
    build_optimizer,
    build_scheduler,
)

OPTIM = OptimizerParams(type="sgd", lr=0.01)
SCHEDULE = ScheduleParams(power=0.9)


def make_model(args):
    torch.manual_seed(0)
    return build_model(ModelParams(arch=args.arch, depth=args.depth, bn="batch"), 19)


def bare(args, batch) -> float:
    device = select_device()
    model = make_model(args).to(device).train()
    image, label = batch["image"].to(device), batch["label"].to(device)
    start = time.perf_counter()
    opt = build_optimizer([ParamGroup(model.backbone_parameters()), ParamGroup(model.head_parameters(), True)], OPTIM)
    sched = build_scheduler(opt, args.iters, SCHEDULE)
    for _ in range(args.iters):
        opt.zero_grad(set_to_none=True)
        out = model(image)
        loss = cross_entropy(out.logits, label) + 0.1 * cross_entropy(out.aux_logits, label)
        loss.backward()
        opt.step()
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.iters


def engine(args, batch) -> float:
    method = SourceOnly(make_model(args), SourceOnlyParams(aux_weight=0.1))
    params = TrainParams(iters=args.iters, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                         precision="fp32", channels_last=False)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(method, {"source": lambda start_it: itertools.repeat(batch)}, params, {"model": OPTIM}, SCHEDULE,
              Path(tmp) / "ckpt", Path(tmp) / "live", fingerprint="bench", desc="engine")
        return (time.perf_counter() - start) / args.iters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5, help="pairs of runs, their order alternating")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, nargs=2, default=(96, 192))
    parser.add_argument("--arch", default="deeplabv2")
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(args.batch, 3, *args.crop, generator=g),
             "label": torch.randint(0, 19, (args.batch, *args.crop), generator=g)}
    bare(args, batch)   # warm-up: allocator, thread pools
    times = {"bare": [], "engine": []}
    for r in range(args.repeats):
        for side in (("bare", "engine") if r % 2 == 0 else ("engine", "bare")):
            times[side].append((bare if side == "bare" else engine)(args, batch))
    ratios = [e / b for b, e in zip(times["bare"], times["engine"])]
    ratio = statistics.median(ratios)
    b, e = statistics.median(times["bare"]), statistics.median(times["engine"])
    print(f"device {select_device()}, threads {torch.get_num_threads()}, {args.arch}-{args.depth}, "
          f"batch {args.batch} x {args.crop[0]}x{args.crop[1]}, {args.iters} iterations x {args.repeats}")
    print(f"bare loop  {b:.4f} s/iter   (runs: {', '.join(f'{t:.4f}' for t in times['bare'])})")
    print(f"engine     {e:.4f} s/iter   (runs: {', '.join(f'{t:.4f}' for t in times['engine'])})")
    print(f"ratio engine/bare = {ratio:.3f}, median of {args.repeats} alternating pairs "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}; target <= 1.05)")
    if args.out:
        args.out.write_text(json.dumps({"device": str(select_device()), "threads": torch.get_num_threads(),
                                        "bare_s_per_iter": b, "engine_s_per_iter": e, "ratio": ratio, "ratios": ratios,
                                        "runs": times, "iters": args.iters, "batch": args.batch,
                                        "crop": list(args.crop)}, indent=2))


if __name__ == "__main__":
    main()
