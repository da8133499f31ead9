"""Data loader against model throughput of one model row: the loader must never be the bottleneck.

    python bench/loader_throughput.py [--model warmup] [--workers 0 1 2] [--batches 30] [--steps 5]
                                      [--repeats 3] [--out results.json]

``--model`` names a row of params.yaml's model table (``models`` or ``selftrained``), resolved as
its ``train@<name>`` / ``selftrain@<name>`` stage resolves it (``lib.table.find_training_row``).
The script builds nothing itself: it runs the stage's own set-up
(``lib.train.stage.build_training_stage``: the recipe with the row's overrides, prepared data, the
``from`` artifact, pseudo-labels and their labeller, method, streams), everything the stage hands
the engine (lib.train.loop), and never trains.  So the streams are the stage's real ones: its
datasets, transforms, sampler, batch size and workers.  The row's inputs must exist as its stage
would need them: data/models/<from> (``scratch`` is written by the ``scratch`` stage) and, for a
self-trained row, its pseudo-label set; a missing one is a one-line error naming the stage to run.
A row asking for several processes (``train.processes``) is measured in one.

It then measures, interleaved ``--repeats`` times (loader, model, loader, model, ...; medians count):

(a) loader images/s: batches drawn from every stream of the method, one of each per iteration as
    the engine draws them, with no model; once with the configured ``workers`` and once with each
    of ``--workers`` (the recipe's ``data.workers`` and ``target_data.workers`` both set to it).  The
    prefetched batches are drained first, untimed, so a block times what the workers produce rather
    than what they buffered while the model ran;
(b) model images/s: ``--steps`` training steps of the row's method (model forward, backward,
    optimizer steps) on one fixed batch already on the device (bench/stepper.py), in the
    arithmetic the engine would use for the recipe's precision (lib.device);
(c) their ratio loader/model, which must stay above 1.

Both rates count the images of all streams per iteration.  On a CPU-only machine the loader
workers and the model share the cores during training, so the ratio measured here (each side alone)
is an upper bound there; on a GPU the model's side runs on the device and the ratio is what it says.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stepper import FixedBatchTrainer, images_in  # noqa: E402
from lib.config import load_params, merged  # noqa: E402
from lib.data.streams import DataParams  # noqa: E402
from lib.device import effective, select_device  # noqa: E402
from lib.errors import DataError, exit_on_user_error  # noqa: E402
from lib.io import write_json_atomic  # noqa: E402
from lib.models.files import MODEL_FILE  # noqa: E402
from lib.pseudo.artifact import META, PSEUDO_ROOT  # noqa: E402
from lib.table import SCRATCH, TrainingRow, find_training_row, table  # noqa: E402
from lib.train.stage import MODELS_ROOT, BuiltStage, build_training_stage  # noqa: E402

PREFETCH_FACTOR = 2   # torch DataLoader's default, which lib.data.dataset.infinite_batches keeps


def training_row(params: dict, name: str) -> TrainingRow:
    """The row of ``models`` or ``selftrained`` that trains data/models/<name>, resolved as its
    stage resolves it, in one process (one process's loader against one process's model: the
    ratio each torchrun worker sees)."""
    row = find_training_row(params, name)
    if (row.raw.get("train") or {}).get("processes", 1) != 1:
        row = dataclasses.replace(row, raw=merged(row.raw, {"train": {"processes": 1}}))
    return row


def start_stage(params: dict, start: str) -> str:
    """The stage that writes data/models/<start>."""
    if start == SCRATCH:
        return SCRATCH
    if start in table(params, "weights"):
        return f"weights@{start}"
    return f"{'selftrain' if start in table(params, 'selftrained') else 'train'}@{start}"


def require_inputs(params: dict, row: TrainingRow) -> None:
    """The artifacts the row's stage reads besides the datasets (its ``from``, its pseudo-label
    set): a missing one is a one-line error naming the stage that writes it."""
    start = MODELS_ROOT / row.start / MODEL_FILE
    if not start.is_file():
        raise DataError(f"{start}: not found (the start of {row.where}, `from: {row.start}`); "
                        f"run `dvc repro {start_stage(params, row.start)}` first")
    if row.pseudo is not None and not (PSEUDO_ROOT / row.pseudo / META).is_file():
        raise DataError(f"{PSEUDO_ROOT / row.pseudo}: pseudo-label set not found (read by {row.where}); "
                        f"run `dvc repro pseudo_label@{row.pseudo}` first")


def with_workers(row: TrainingRow, workers: int) -> TrainingRow:
    """``row`` with every stream's loader workers set to ``workers`` (the recipe's ``data.workers``
    and, where the recipe has one, ``target_data.workers``)."""
    raw = merged(row.raw, {"data": {"workers": workers}})
    if isinstance(raw.get("target_data"), dict):
        raw = merged(raw, {"target_data": {"workers": workers}})
    return dataclasses.replace(row, raw=raw)


def configured_workers(raw: dict) -> int:
    """The loader workers a recipe asks for (the larger of its two streams' when they differ)."""
    data = raw.get("data") or {}
    target = {**data, **raw["target_data"]} if isinstance(raw.get("target_data"), dict) else data
    return max(int(d.get("workers", DataParams.workers)) for d in (data, target))


def open_streams(built: BuiltStage) -> dict:
    """One live iterator per stream the method reads, from iteration 0."""
    return {name: built.streams[name](0) for name in built.method.streams}


def draw(iterators: dict) -> dict:
    return {name: next(it) for name, it in iterators.items()}


def loader_seconds(iterators: dict, workers: int, batches: int) -> tuple[float, int]:
    """(seconds, images) to draw ``batches`` iterations, after draining what the workers buffered."""
    for _ in range(PREFETCH_FACTOR * workers):
        draw(iterators)
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        images += images_in(draw(iterators))
    return time.perf_counter() - start, images


def measure(name: str, worker_counts: list[int], batches: int, steps: int, repeats: int) -> dict:
    params = load_params()
    row = training_row(params, name)
    require_inputs(params, row)
    configured = configured_workers(row.raw)
    built = build_training_stage(row)
    iterators = {configured: open_streams(built)}
    for w in sorted(set(worker_counts) - {configured}):
        iterators[w] = open_streams(build_training_stage(with_workers(row, w)))
    settings = sorted(iterators)

    train_params = built.recipe.train
    device = select_device()
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = train_params.cudnn_benchmark
    trainer = FixedBatchTrainer(
        built.method, draw(iterators[configured]), built.recipe.optim, built.recipe.schedule, device,
        autocast=torch.bfloat16 if effective(train_params.precision, device) == "bf16" else None,
        channels_last=cuda and train_params.channels_last, horizon=train_params.iters)

    for w in settings:   # worker start-up and first decodes stay out of the timings
        loader_seconds(iterators[w], w, 1)
    trainer.step()
    loader_runs: dict[int, list[float]] = {w: [] for w in settings}
    model_runs: list[float] = []
    for _ in range(repeats):
        for w in settings:
            seconds, images = loader_seconds(iterators[w], w, batches)
            loader_runs[w].append(images / seconds)
        model_runs.append(trainer.images / trainer.seconds_per_iter(steps))

    model_rate = statistics.median(model_runs)
    loader = [{"workers": w, "configured": w == configured, "images_per_s": statistics.median(loader_runs[w]),
               "runs": loader_runs[w], "ratio": statistics.median(loader_runs[w]) / model_rate} for w in settings]
    return {
        "row": row.name, "table": row.table, "stage": row.stage, "method": row.recipe,
        "streams": {stream: list(b["image"].shape) for stream, b in trainer.batch.items()},
        "images_per_iter": trainer.images, "device": str(device), "threads": torch.get_num_threads(),
        "precision": "bf16" if trainer.autocast is not None else "fp32",
        "model": {"images_per_s": model_rate, "runs": model_runs, "steps": steps},
        "loader": loader, "batches": batches, "repeats": repeats,
        "ratio": next(entry["ratio"] for entry in loader if entry["configured"]),
    }


def print_table(result: dict) -> None:
    shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in result["streams"].items())
    print(f"model {result['row']} ({result['stage']}, recipe {result['method']}), {shapes}, "
          f"device {result['device']}, {result['precision']}, threads {result['threads']}")
    print(f"model: {result['model']['images_per_s']:8.1f} images/s  (forward + backward + step, "
          f"{result['model']['steps']} steps x {result['repeats']})")
    print(f"{'workers':>10} {'loader images/s':>16} {'loader/model':>13}")
    for row in result["loader"]:
        mark = " (configured)" if row["configured"] else ""
        print(f"{row['workers']:>10} {row['images_per_s']:>16.1f} {row['ratio']:>13.2f}{mark}")
    verdict = "the loader keeps up" if result["ratio"] > 1 else "THE LOADER IS THE BOTTLENECK"
    print(f"ratio loader/model at the configured workers = {result['ratio']:.2f}  (must be > 1: {verdict})")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="warmup", help="a row of `models` or `selftrained` (default warmup)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="worker counts measured besides the configured one")
    parser.add_argument("--batches", type=int, default=30, help="iterations drawn per loader block")
    parser.add_argument("--steps", type=int, default=5, help="training steps per model block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.workers) < 0 or min(args.batches, args.steps, args.repeats) < 1:
        parser.error("--workers must be >= 0 and --batches, --steps, --repeats >= 1")
    result = measure(args.model, args.workers, args.batches, args.steps, args.repeats)
    print_table(result)
    if args.out:
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
