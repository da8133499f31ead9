"""GPU measurements at the published sizes: step speed and memory, CPSL stage 1's footprint, a tiny repro.

    python bench/gpu.py [--out bench-gpu.json] [--steps 10] [--measure deeplabv2 cpsl repro]
    python bench/gpu.py --dry-run          # the same code on CPU at tiny sizes (also: --device cpu)

(a) ``deeplabv2``: one training iteration of the GTA5 -> Cityscapes DeepLabV2-ResNet-101 setting at
    the sizes and batches its presets give: presets/gta5_cityscapes_deeplabv2.yaml's recipe
    ``recipes.advent`` (source 720x1280, batch 1) trained source-only (the base has no row of its
    own: here it is copied to ``recipes.source_only`` with a row ``source_only`` from its ImageNet
    weights, as a preset adds one), and presets/gta5_cityscapes_advent.yaml's row ``advent`` (the
    same plus the 512x1024 target and AdvEnt's discriminators), in fp32 and in bf16 autocast with
    channels_last: images/s, peak ``torch.cuda.max_memory_allocated`` and the ratios bf16/fp32;
(b) ``cpsl``: CPSL stage 1 at the paper's batch on one GPU (presets/gta5_cityscapes_cpsl.yaml's row
    ``selftrained.stage1``, recipe ``recipes.cpsl_stage1``: 4 source + 4 target crops of 512x896,
    ResNet-101 with the 256-d CPSL head, a 65536-pixel memory, soft pseudo-labels of 19 classes at
    the logits' stride with their sampling grids, as the loader hands them): peak memory and speed of its training step, both precisions;
(c) ``repro``: the whole default pipeline (the CPSL chain) on the tiny params of the end-to-end tests
    (tests/test_pipeline.py), copied to a temporary git repository and run by ``dvc repro``: wall time.

Each row is resolved from params.yaml with the preset (and its bases) laid over it, as
``python -m lib.preset`` lays it (``lib.table.find_training_row``), and its recipe parsed as its
training stage parses it (``lib.train.stage.parse_recipe``); the model is built from the recipe's
``model`` block (``build_model``) and the method by its ``build`` with a stage context, as
``build_training_stage`` does.  Nothing is read from disk: the model keeps its random
initialisation whatever the row's ``from`` (nothing is downloaded; the context's ``start`` still
says what ``from`` is), the soft pseudo-labels are random prototypes with a uniform prior, and the
batches are random tensors of the recipe's shapes.  The steps are the engine's (bench/stepper.py)
after ``--warmup-steps`` untimed ones; an out-of-memory step is reported as such.  Without a CUDA
device the script says so in one line and exits 2, unless ``--dry-run`` (``--device cpu``) runs
everything on CPU at tiny sizes (ResNet-18, 32x64 crops, a short memory, CPU bf16 autocast, the
tiny repro without the chain) to exercise the code paths.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stepper import FixedBatchTrainer  # noqa: E402
from lib.config import PARAMS_FILE, merged  # noqa: E402
from lib.data.streams import NORMALIZATION  # noqa: E402
from lib.io import write_json_atomic  # noqa: E402
from lib.methods.base import StageContext, method_class  # noqa: E402
from lib.models import build_model  # noqa: E402
from lib.preset import apply  # noqa: E402
from ruamel.yaml import YAML  # noqa: E402
from lib.pseudo.artifact import PseudoLabels  # noqa: E402
from lib.pseudo.stream import SOFT_GRID, soft_grid  # noqa: E402
from lib.table import SCRATCH, TrainingRow, find_training_row, table  # noqa: E402
from lib.train.stage import Recipe, parse_recipe  # noqa: E402

NUM_CLASSES = 19
GIB = 2**30
PRECISIONS = {"fp32": (None, False), "bf16+channels_last": (torch.bfloat16, True)}
DEEPLABV2_PRESET, ADVENT_PRESET = "gta5_cityscapes_deeplabv2.yaml", "gta5_cityscapes_advent.yaml"
CPSL_PRESET = "gta5_cityscapes_cpsl.yaml"
# the base's recipe trained source-only: one more row, as a preset adds one
SOURCE_ONLY_ROW = {"recipe": "source_only", "from": "deeplab_imagenet"}
# --dry-run: every size shrunk so the whole script runs in seconds on a CPU
# ResNet-18 has no Caffe layout (that is a Bottleneck variant): the dry run uses the torchvision one
TINY_RECIPE = {"model": {"depth": 18, "head_width": 32, "style": "torchvision"},
               "data": {"crop": [32, 64], "resize": None, "scale": None}}
TINY_METHOD = {"cpsl_stage1": {"queue_length": 64, "samples_per_image": 16}}


def preset_params(name: str) -> dict:
    """params.yaml with presets/<name> (and its bases) laid over it, as ``python -m lib.preset`` lays
    them, as plain values (ruamel's scalars fail the params' type checks)."""
    return json.loads(json.dumps(apply(YAML().load((ROOT / PARAMS_FILE).read_text()), ROOT / "presets" / name)))


def start_kind(params: dict, row: TrainingRow) -> str:
    """What the row's ``from`` is, as the stage tells its method (``StageContext.start``)."""
    if row.start == SCRATCH:
        return "scratch"
    return "weights" if row.start in table(params, "weights") else "model"


def tiny(row: TrainingRow) -> TrainingRow:
    """The row with its recipe shrunk for --dry-run."""
    raw = merged(row.raw, TINY_RECIPE)
    if isinstance(raw.get("target_data"), dict):
        raw = merged(raw, {"target_data": TINY_RECIPE["data"]})
    if row.recipe in TINY_METHOD:
        raw = merged(raw, {"method": TINY_METHOD[row.recipe]})
    return dataclasses.replace(row, raw=raw)


@dataclass(frozen=True)
class Step:
    """One measured training step: a row of a preset's model table and what its stage would hand it."""

    label: str
    row: TrainingRow
    start: str               # StageContext.start: scratch | weights | model
    soft_labels: bool        # the target stream carries soft pseudo-labels (a `soft` pseudo-label set)


def preset_step(label: str, params: dict, name: str, shrink: bool) -> Step:
    row = find_training_row(params, name)
    form = (table(params, "pseudo_labels").get(row.pseudo) or {}).get("form") if row.pseudo else None
    return Step(label, tiny(row) if shrink else row, start_kind(params, row), form == "soft")


def deeplabv2_steps(shrink: bool) -> list[Step]:
    """Source-only on the base's recipe, and the AdvEnt row, at ADVENT's sizes."""
    base = preset_params(DEEPLABV2_PRESET)
    base["recipes"]["source_only"] = copy.deepcopy(base["recipes"]["advent"])
    base["models"]["source_only"] = dict(SOURCE_ONLY_ROW)
    return [preset_step(DEEPLABV2_PRESET.removesuffix(".yaml"), base, "source_only", shrink),
            preset_step(ADVENT_PRESET.removesuffix(".yaml"), preset_params(ADVENT_PRESET), "advent", shrink)]


def cpsl_step(shrink: bool) -> Step:
    return preset_step("cpsl_stage1", preset_params(CPSL_PRESET), "stage1", shrink)


def soft_pseudo_labels(width: int) -> PseudoLabels:
    """What a ``soft`` pseudo-label set hands CPSL stage 1: random prototypes and a uniform prior."""
    generator = torch.Generator().manual_seed(0)
    return PseudoLabels(Path("random"), {"form": "soft", "num_classes": NUM_CLASSES}, pd.DataFrame({"id": []}),
                        torch.randn(NUM_CLASSES, width, generator=generator),
                        torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES))


def build_method(step: Step):
    """(recipe, method) with random weights, as ``build_training_stage`` builds them."""
    recipe, method_params = parse_recipe(step.row)
    model = build_model(recipe.model, NUM_CLASSES)
    pseudo = soft_pseudo_labels(model.embedding_channels) if step.soft_labels else None
    context = StageContext(num_classes=NUM_CLASSES, pseudo=pseudo, normalize=NORMALIZATION[recipe.normalize],
                           start=step.start)
    return recipe, method_class(step.row.recipe).build(model, method_params, context)


def random_batch(recipe: Recipe, streams: tuple[str, ...], soft_labels: bool) -> dict[str, dict]:
    """Tensors of the shapes the recipe's streams deliver: labelled source, target with soft labels if asked."""
    generator = torch.Generator().manual_seed(0)
    batch = {}
    for name in streams:
        data = recipe.stream_data(name)
        n, (h, w) = data.batch_size, data.crop
        sample = {"image": torch.randn(n, 3, h, w, generator=generator)}
        if name == "source":
            label = torch.randint(0, NUM_CLASSES, (n, h, w), generator=generator)
            label[:, : h // 8] = 255                       # an ignored band, as real labels have
            sample["label"] = label
        elif soft_labels:     # as the loader hands them: the stored map (logits' stride) and its grid
            cells = (-(-h // 8) + 1, -(-w // 8) + 1)
            sample["soft"] = F.softmax(4 * torch.randn(n, NUM_CLASSES, *cells, generator=generator), dim=1).half()
            sample[SOFT_GRID] = torch.from_numpy(soft_grid((h, w), cells, cells)).permute(2, 0, 1).expand(n, 2, h, w)
        batch[name] = sample
    return batch


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_step(step: Step, device: torch.device, precision: str, warmup_steps: int, steps: int) -> dict:
    """Images/s and peak memory of the row's training step in one precision (a fresh method each time)."""
    torch.manual_seed(0)
    recipe, method = build_method(step)
    batch = random_batch(recipe, method.streams, step.soft_labels)
    autocast, channels_last = PRECISIONS[precision]
    torch.backends.cudnn.benchmark = recipe.train.cudnn_benchmark
    trainer = None
    try:
        trainer = FixedBatchTrainer(method, batch, recipe.optim, recipe.schedule, device, autocast, channels_last,
                                    horizon=recipe.train.iters)
        for _ in range(warmup_steps):
            trainer.step()
        trainer.reset_peak_memory()
        seconds = trainer.seconds_per_iter(steps)
        peak = trainer.peak_memory_bytes()
        return {"images_per_s": trainer.images / seconds, "seconds_per_iter": seconds,
                "peak_memory_gib": None if peak is None else peak / GIB, "images_per_iter": trainer.images}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        del trainer, method, batch
        release(device)


def compare_precisions(step: Step, device: torch.device, warmup_steps: int, steps: int) -> dict:
    recipe, _ = parse_recipe(step.row)
    runs = {p: time_step(step, device, p, warmup_steps, steps) for p in PRECISIONS}
    fp32, bf16 = runs["fp32"], runs["bf16+channels_last"]
    ok = "error" not in fp32 and "error" not in bf16
    return {
        "name": step.label, "row": step.row.where, "method": step.row.recipe,
        "model": f"{recipe.model.arch}-{recipe.model.depth} ({recipe.model.head} head)",
        "streams": {s: [recipe.stream_data(s).batch_size, *recipe.stream_data(s).crop]
                    for s in method_class(step.row.recipe).streams},
        "runs": runs,
        "ratio_images_per_s_bf16_over_fp32": bf16["images_per_s"] / fp32["images_per_s"] if ok else None,
        "ratio_peak_memory_bf16_over_fp32": (bf16["peak_memory_gib"] / fp32["peak_memory_gib"]
                                             if ok and fp32["peak_memory_gib"] else None),
    }


def tiny_repro(with_chain: bool, targets: list[str], device: torch.device) -> dict:
    """Wall time of ``dvc repro`` on the end-to-end tests' tiny params in a fresh temporary project."""
    from tests.test_pipeline import ENV, make_project, tiny_params
    env = dict(ENV, CUDA_VISIBLE_DEVICES="") if device.type == "cpu" else ENV
    with tempfile.TemporaryDirectory(prefix="bench_repro_") as tmp:
        project = make_project(Path(tmp), tiny_params(chain=with_chain))
        start = time.perf_counter()
        done = subprocess.run(["dvc", "repro", *targets], cwd=project, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"dvc repro failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return {"wall_s": wall, "chain": with_chain, "targets": targets,
            "stages_run": done.stdout.count("Running stage")}


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU, {torch.get_num_threads()} threads"


def print_table(result: dict) -> None:
    print(f"device {result['device']}, torch {result['torch']}{', DRY RUN (tiny sizes)' if result['dry_run'] else ''}")
    entries = result.get("deeplabv2", []) + ([result["cpsl"]] if "cpsl" in result else [])
    for entry in entries:
        streams = " + ".join(f"{s} {b}x{h}x{w}" for s, (b, h, w) in entry["streams"].items())
        print(f"  {entry['name']}: {entry['row']} (recipe {entry['method']}), {entry['model']}, {streams}")
    if entries:
        print(f"{'measurement':<28} {'precision':<19} {'images/s':>9} {'s/iter':>8} {'peak GiB':>9}")
    for entry in entries:
        for precision, run in entry["runs"].items():
            if "error" in run:
                print(f"{entry['name']:<28} {precision:<19} {run['error']:>28}")
                continue
            peak = "-" if run["peak_memory_gib"] is None else f"{run['peak_memory_gib']:.2f}"
            print(f"{entry['name']:<28} {precision:<19} {run['images_per_s']:>9.2f} {run['seconds_per_iter']:>8.3f} "
                  f"{peak:>9}")
    for entry in entries:
        speed, memory = entry["ratio_images_per_s_bf16_over_fp32"], entry["ratio_peak_memory_bf16_over_fp32"]
        print(f"ratio bf16/fp32 {entry['name']}: images/s {'-' if speed is None else f'{speed:.2f}'}, "
              f"peak memory {'-' if memory is None else f'{memory:.2f}'}")
    if "repro" in result:
        r = result["repro"]
        print(f"tiny dvc repro ({'CPSL chain' if r['chain'] else 'warm-up only'}"
              f"{', targets ' + ' '.join(r['targets']) if r['targets'] else ''}): {r['stages_run']} stages "
              f"in {r['wall_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the dry run (tiny sizes), for checking the code without a GPU")
    parser.add_argument("--dry-run", action="store_true", help="same as --device cpu")
    parser.add_argument("--measure", nargs="+", choices=("deeplabv2", "cpsl", "repro"),
                        default=["deeplabv2", "cpsl", "repro"])
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default 10; dry run 2)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default 3; dry run 1)")
    parser.add_argument("--repro-target", nargs="*", default=[],
                        help="stages for `dvc repro` (default: the whole pipeline)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    dry = args.dry_run or args.device == "cpu"
    if not dry and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); "
              "--dry-run runs the same measurements on CPU at tiny sizes", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    steps = args.steps or (2 if dry else 10)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if dry else 3)

    result = {"device": describe(device), "torch": torch.__version__, "dry_run": dry, "steps": steps,
              "warmup_steps": warmup_steps}
    if "deeplabv2" in args.measure:
        result["deeplabv2"] = [compare_precisions(step, device, warmup_steps, steps) for step in deeplabv2_steps(dry)]
    if "cpsl" in args.measure:
        result["cpsl"] = compare_precisions(cpsl_step(dry), device, warmup_steps, steps)
    if "repro" in args.measure:
        release(device)
        result["repro"] = tiny_repro(with_chain=not dry, targets=args.repro_target, device=device)
    print_table(result)
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
