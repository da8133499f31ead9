"""fp32 against bf16 autocast on this machine: a training step and an inference pass of one model of the table.

    python bench/precision.py [--model warmup] [--steps 3] [--repeats 3] [--images 16] [--out results.json]

The training side is the own step of ``--model``, a row of the model table (``models`` or
``selftrained``, resolved as bench/loader_throughput.py resolves it; its inputs must exist as its
stage needs them): ``lib.train.stage.build_training_stage`` gives its model, method, batch size and
crop (bench/stepper.py), once in fp32 and once under bf16 autocast.  The inference side is
``predict_logits`` (lib.infer.inference) of the same model in eval mode on ``--images`` images of
the size of the first stored image of the row's source, as evaluation and pseudo-labelling run it.
Both are interleaved ``--repeats`` times (fp32, bf16, fp32, bf16, ...; medians count) and reported
as seconds and as the ratio bf16 / fp32 (< 1: bf16 is faster).  The inference side also reports how
far the two are apart: the largest logit difference and the share of pixels whose argmax agrees.

Whether the engine uses bf16 for ``precision: bf16`` is ``lib.device.effective``: on a
CPU without native bf16 (AVX512-BF16 / AMX) it runs fp32, and the training step's bf16 numbers
here (autocast forced, bf16 emulated) show why (the emulated path is slower).  The inference side
asks ``predict_logits`` for ``precision="bf16"`` as evaluation does, so it follows the same rule:
where bf16 is not native both of its runs are fp32.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loader_throughput import (  # noqa: E402
    draw,
    open_streams,
    require_inputs,
    training_row,
    with_workers,
)
from bench.stepper import FixedBatchTrainer  # noqa: E402
from lib.config import load_params  # noqa: E402
from lib.data.prepared import PREPARED_ROOT, load_index  # noqa: E402
from lib.device import effective, native_bf16, select_device  # noqa: E402
from lib.errors import exit_on_user_error  # noqa: E402
from lib.infer.inference import predict_logits  # noqa: E402
from lib.io import write_json_atomic  # noqa: E402
from lib.train.stage import build_training_stage  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def stored_size(source: str) -> tuple[int, int]:
    """(h, w) of the first image of the prepared dataset ``source`` as stored (the size evaluation runs at)."""
    first = load_index(PREPARED_ROOT / source).iloc[0]
    return int(first["height"]), int(first["width"])


def measure(model: str, steps: int, repeats: int, images: int) -> dict:
    params = load_params()
    row = with_workers(training_row(params, model), 0)
    require_inputs(params, row)
    device = select_device()
    trainers = {}
    for name, dtype in PRECISIONS.items():
        built = build_training_stage(row)     # the same seed and start: the same initial weights
        torch.manual_seed(0)
        trainers[name] = FixedBatchTrainer(built.method, draw(open_streams(built)), built.recipe.optim,
                                           built.recipe.schedule, device, dtype, channels_last=False,
                                           horizon=built.recipe.train.iters)
    height, width = stored_size(row.source)
    batch = torch.randn(images, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    inference_model = trainers["fp32"].method.model

    def infer(name: str) -> tuple[float, torch.Tensor]:
        inference_model.eval()
        start = time.perf_counter()
        logits = predict_logits(inference_model, batch, (height, width), precision=name)
        seconds = time.perf_counter() - start
        inference_model.train()
        return seconds, logits

    for name in PRECISIONS:       # first calls (oneDNN primitive creation) stay out of the timings
        trainers[name].step()
        infer(name)
    train_runs = {name: [] for name in PRECISIONS}
    infer_runs = {name: [] for name in PRECISIONS}
    for _ in range(repeats):
        for name in PRECISIONS:
            train_runs[name].append(trainers[name].seconds_per_iter(steps))
            infer_runs[name].append(infer(name)[0])
    _, full = infer("fp32")
    _, half = infer("bf16")
    train_median = {name: statistics.median(v) for name, v in train_runs.items()}
    infer_median = {name: statistics.median(v) for name, v in infer_runs.items()}
    return {
        "row": row.name, "method": row.recipe, "device": str(device), "threads": torch.get_num_threads(),
        "native_bf16": native_bf16(device),
        "engine_precision": effective(built.recipe.train.precision, device),
        "train": {"seconds_per_iter": train_median, "runs": train_runs, "steps": steps,
                  "images_per_iter": trainers["fp32"].images,
                  "ratio": train_median["bf16"] / train_median["fp32"]},
        "inference": {"seconds": infer_median, "runs": infer_runs, "images": images, "size": [height, width],
                      "ratio": infer_median["bf16"] / infer_median["fp32"],
                      "max_abs_logit_difference": float((half - full).abs().max()),
                      "argmax_agreement": float((half.argmax(1) == full.argmax(1)).float().mean())},
        "repeats": repeats,
    }


def print_table(result: dict) -> None:
    native = "native" if result["native_bf16"] else "NOT native: the engine runs fp32 for precision bf16"
    print(f"model {result['row']} (recipe {result['method']}), device {result['device']}, "
          f"threads {result['threads']}, bf16 {native}")
    train, infer = result["train"], result["inference"]
    print(f"{'':<34} {'fp32 s':>9} {'bf16 s':>9} {'bf16/fp32':>10}")
    print(f"{'training step (' + str(train['images_per_iter']) + ' images)':<34} "
          f"{train['seconds_per_iter']['fp32']:>9.3f} {train['seconds_per_iter']['bf16']:>9.3f} {train['ratio']:>10.3f}")
    print(f"{'inference (' + str(infer['images']) + ' x ' + 'x'.join(map(str, infer['size'])) + ')':<34} "
          f"{infer['seconds']['fp32']:>9.3f} {infer['seconds']['bf16']:>9.3f} {infer['ratio']:>10.3f}")
    print(f"inference agreement: argmax {100 * infer['argmax_agreement']:.2f} % of pixels, "
          f"largest logit difference {infer['max_abs_logit_difference']:.4f}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="warmup", help="a row of `models` or `selftrained` (default warmup)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats, args.images) < 1:
        parser.error("--steps, --repeats and --images must be >= 1")
    result = measure(args.model, args.steps, args.repeats, args.images)
    print_table(result)
    if args.out:
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
