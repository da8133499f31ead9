"""GPU measurements of the published recipes: step speed by precision, memory at the paper batches,
inference, NCCL, and from them the GPU hours of every recipe.

    python bench/gpu.py [--out gpu.json] [--budget-s 400] [--measure precision presets inference nccl compile repro]
    python bench/gpu.py --dry-run          # the same code on CPU at tiny sizes (also: --device cpu)
    python bench/gpu.py --hours gpu.json   # no GPU: GPU hours into bench/results/recipes.{json,md}, tables to gpu.md

``precision``: one training iteration of DeepLabV2-ResNet-101 at the GTA5 -> Cityscapes sizes, in fp32,
    bf16 autocast and bf16 + channels_last: presets/gta5_cityscapes_deeplabv2.yaml's recipe
    ``recipes.advent`` (source 720x1280, batch 1) trained source-only (the base has no row of its own:
    here it is copied to ``recipes.source_only`` with a row ``source_only`` from its ImageNet weights,
    as a preset adds one), presets/gta5_cityscapes_advent.yaml's row ``advent`` (the same plus the
    512x1024 target and AdvEnt's discriminators), and CPSL stage 1 (presets/gta5_cityscapes_cpsl.yaml's
    ``selftrained.stage1``: 4 source + 4 target crops of 512x896, the 256-d CPSL head, a 65536-pixel
    memory, soft pseudo-labels of 19 classes at the logits' stride with their sampling grids);
``presets``: every training stage of every published preset (``train@``, ``selftrain@``,
    ``cyclegan_train@``) at its own batch and sizes, in fp32 (NCHW; the presets train fp32 with
    ``channels_last: true``, not measured here) and in bf16 + channels_last:
    seconds per iteration and peak memory (``max_memory_allocated`` and ``max_memory_reserved``), and
    whether that peak plus the CUDA context fits an 80 GB and a 24 GB card; rows that step the same
    thing (the same recipe, start and pseudo-label form) are measured once;
``inference``: DeepLabV2-ResNet-101 on a 2048x1024 frame (whole, whole + flip, mmseg's sliding
    512x1024 windows + flip; fp32 and bf16 + channels_last) with 500 Cityscapes val images
    extrapolated, and every evaluation, pseudo-labelling and translation stage of every preset at its
    own protocol, precision and image size;
``nccl``: the tiny end-to-end params' warm-up with ``backend: nccl``: ``dvc repro train@warmup``, then
    the same stage under ``torchrun --nproc_per_node 1`` (``processes: 1``);
``compile``: the source-only step in bf16 + channels_last with its model compiled (``torch.compile``);
``repro``: the whole default pipeline on the end-to-end tests' tiny params in a temporary git
    repository, by ``dvc repro``: wall time.

Each row is resolved from params.yaml with the preset (and its bases) laid over it, as
``python -m lib.preset`` lays it (``lib.table.find_training_row``), and its recipe parsed as its
training stage parses it (``lib.train.stage.parse_recipe``); the model is built from the recipe's
``model`` block (``build_model``) and the method by its ``build`` with a stage context, as
``build_training_stage`` does (a KD round's teacher: its labeller's architecture).  Nothing is read
from disk: the models keep their random initialisation whatever the row's ``from`` (nothing is
downloaded; the context's ``start`` still says what ``from`` is), soft pseudo-labels are random
prototypes with a uniform prior, hard ones random classes with 40 % ignored, and the batches random
tensors of the recipe's shapes.  The steps are the engine's (bench/stepper.py) after
``--warmup-steps`` untimed ones; an out-of-memory step is reported as such, and a failed row or
section as its error, the others still measured.  ``--budget-s`` starts no row or section after
that many seconds (the skipped ones are listed), and ``--out`` is rewritten after every section, so
one prepared GPU run always leaves what it measured.  Without a CUDA device the script says so in
one line and exits 2, unless ``--dry-run`` (``--device cpu``) runs everything on CPU at tiny sizes
(ResNet-18, 32x64 crops, a short memory, CPU bf16 autocast, the tiny repro without the chain).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.recipes import HOST_STAGES, REAL_SIZES, write_results  # noqa: E402
from bench.recipes import published_presets as recipe_presets  # noqa: E402
from bench.stepper import FixedBatchTrainer, synchronize  # noqa: E402
from lib.config import PARAMS_FILE, merged, parse  # noqa: E402
from lib.data.paired import STYLIZED  # noqa: E402
from lib.data.streams import NORMALIZATION  # noqa: E402
from lib.infer.inference import inference_layout, predict_logits  # noqa: E402
from lib.infer.params import InferenceParams  # noqa: E402
from lib.io import write_json_atomic  # noqa: E402
from lib.methods.base import StageContext, method_class  # noqa: E402
from lib.models import build_model  # noqa: E402
from lib.models.cyclegan import CycleGANModelParams, build_generator  # noqa: E402
from lib.preset import apply  # noqa: E402
from lib.pseudo.artifact import PseudoLabels  # noqa: E402
from lib.pseudo.stream import SOFT_GRID, soft_grid  # noqa: E402
from lib.pseudo.writer import PseudoParams  # noqa: E402
from lib.stylize.cyclegan import CycleGAN, FrozenSegmenter  # noqa: E402
from lib.stylize.cyclegan import parse_params as parse_cyclegan  # noqa: E402
from lib.table import SCRATCH, TrainingRow, find_training_row, table  # noqa: E402
from lib.train.stage import Recipe, parse_recipe  # noqa: E402

NUM_CLASSES = 19
GIB = 2**30
# training arithmetic: (autocast dtype, channels_last); the published presets pin fp32
PRECISIONS = {"fp32": (None, False), "bf16": (torch.bfloat16, False), "bf16+channels_last": (torch.bfloat16, True)}
PRESET_PRECISIONS = ("fp32", "bf16+channels_last")     # every preset row: fp32 (NCHW) and the fast setting
# the cards a user rents, as their memory in GiB (an 80 GB A100/H100 holds 80 GiB, a 24 GB RTX 4090 24 GiB),
# less what the CUDA context and cuDNN's workspace keep outside PyTorch's allocator (about 1 GiB)
CARDS_GIB = {"80 GB": 80.0, "24 GB": 24.0}
CONTEXT_GIB = 1.0
DEEPLABV2_PRESET, ADVENT_PRESET = "gta5_cityscapes_deeplabv2.yaml", "gta5_cityscapes_advent.yaml"
CPSL_PRESET = "gta5_cityscapes_cpsl.yaml"
# the base's recipe trained source-only: one more row, as a preset adds one
SOURCE_ONLY_ROW = {"recipe": "source_only", "from": "deeplab_imagenet"}
# --dry-run: every size shrunk so the whole script runs in seconds on a CPU
# ResNet-18 has no Caffe layout (that is a Bottleneck variant): the dry run uses the torchvision one
TINY_RECIPE = {"model": {"depth": 18, "head_width": 32, "style": "torchvision"},
               "data": {"crop": [32, 64], "resize": None, "scale": None}}
TINY_METHOD = {"cpsl_stage1": {"queue_length": 64, "samples_per_image": 16}}
TINY_CYCLEGAN = {"model": {"ngf": 8, "ndf": 8, "n_blocks": 2}, "data": {"crop": [32, 32], "batch_size": 1}}


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
    hard_labels: bool = False        # ... or hard ones (``pseudo``: class ids, 255 where not kept)
    teacher: Any = None              # the model block of the set's labeller, for a method that needs a teacher


def preset_step(label: str, params: dict, name: str, shrink: bool) -> Step:
    """The training row ``name`` of ``params`` with what its stage would hand its method."""
    row = find_training_row(params, name)
    entry = (table(params, "pseudo_labels").get(row.pseudo) or {}) if row.pseudo else {}
    form, teacher = entry.get("form"), None
    if method_class(row.recipe).needs_teacher:
        labeller = find_training_row(params, entry["model"].split("/")[0])
        teacher = parse_recipe(tiny(labeller) if shrink else labeller)[0].model
    return Step(label, tiny(row) if shrink else row, start_kind(params, row), form == "soft",
                hard_labels=form is not None and form != "soft", teacher=teacher)


def deeplabv2_steps(shrink: bool) -> list[Step]:
    """Source-only on the base's recipe, and the AdvEnt row, at ADVENT's sizes."""
    base = preset_params(DEEPLABV2_PRESET)
    base["recipes"]["source_only"] = copy.deepcopy(base["recipes"]["advent"])
    base["models"]["source_only"] = dict(SOURCE_ONLY_ROW)
    return [preset_step(DEEPLABV2_PRESET.removesuffix(".yaml"), base, "source_only", shrink),
            preset_step(ADVENT_PRESET.removesuffix(".yaml"), preset_params(ADVENT_PRESET), "advent", shrink)]


def cpsl_step(shrink: bool) -> Step:
    """CPSL stage 1 as presets/gta5_cityscapes_cpsl.yaml trains it."""
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
    teacher = None if step.teacher is None else build_model(step.teacher, NUM_CLASSES).eval().requires_grad_(False)
    context = StageContext(num_classes=NUM_CLASSES, pseudo=pseudo, normalize=NORMALIZATION[recipe.normalize],
                           start=step.start, teacher=teacher, source_frames=random_frames(recipe.data.crop))
    return recipe, method_class(step.row.recipe).build(model, method_params, context)


def random_frames(size: tuple[int, int]):
    """``StageContext.source_frames`` of random (1, 3, H, W) frames (RobustNet ISW's statistics,
    which its ``statistics_iter`` keeps beyond the benched steps)."""
    def frames(count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(1, 3, *size, generator=generator) for _ in range(count))
    return frames


def random_batch(recipe: Recipe, streams: tuple[str, ...], soft_labels: bool, hard_labels: bool = False,
                 stylized: bool = False) -> dict[str, dict]:
    """Tensors of the shapes the recipe's streams deliver: labelled source, target with soft or hard
    pseudo-labels if asked, and with ``stylized`` each stream's restyled view (CISS's paired streams)."""
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
        elif hard_labels:   # kept pixels and 255 elsewhere, as a thresholded set hands them
            pseudo = torch.randint(0, NUM_CLASSES, (n, h, w), generator=generator)
            pseudo[torch.rand(n, h, w, generator=generator) < 0.4] = 255
            sample["pseudo"] = pseudo
        if stylized:
            sample[STYLIZED] = torch.randn(n, 3, h, w, generator=generator)
        batch[name] = sample
    return batch


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def method_bench(step: Step) -> Callable[[], Trained]:
    """What ``time_step`` steps for a preset row: its method with random weights and a random batch."""
    def build() -> Trained:
        recipe, method = build_method(step)
        batch = random_batch(recipe, method.streams, step.soft_labels, step.hard_labels,
                             stylized=method.stream_stylization() is not None)
        return Trained(method, batch, recipe.optim, recipe.schedule, recipe.train.cudnn_benchmark, recipe.train.iters)
    return build


@dataclass
class Trained:
    """One method ready to step: its batch, optimisers and schedule as its stage would set them up."""

    method: object
    batch: dict
    optim: dict
    schedule: object
    cudnn_benchmark: bool
    horizon: int


def time_step(build: Callable[[], Trained], device: torch.device, precision: str, warmup_steps: int, steps: int,
              compile_model: bool = False) -> dict:
    """Images/s and peak memory of one training step in one precision (a fresh method each time).

    ``compile_model``: the method's ``model`` compiled in place (``nn.Module.compile``, the default
    inductor backend) before the untimed steps, which then include the compilation."""
    torch.manual_seed(0)
    trained = build()
    autocast, channels_last = PRECISIONS[precision]
    torch.backends.cudnn.benchmark = trained.cudnn_benchmark
    trainer = None
    try:
        trainer = FixedBatchTrainer(trained.method, trained.batch, trained.optim, trained.schedule, device, autocast,
                                    channels_last, horizon=trained.horizon)
        if compile_model:
            trained.method.model.compile()
        start = time.perf_counter()
        for _ in range(warmup_steps):
            trainer.step()
        synchronize(device)
        warm = time.perf_counter() - start
        trainer.reset_peak_memory()
        seconds = trainer.seconds_per_iter(steps)
        peak, reserved = trainer.peak_memory_bytes(), peak_reserved(device)
        return {"images_per_s": trainer.images / seconds, "seconds_per_iter": seconds,
                "peak_memory_gib": None if peak is None else peak / GIB,
                "peak_reserved_gib": None if reserved is None else reserved / GIB,
                "images_per_iter": trainer.images, "untimed_s": warm}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        del trainer, trained
        release(device)


def peak_reserved(device: torch.device) -> int | None:
    """Peak of what PyTorch's caching allocator held from the driver (what another process could not use)."""
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def compare_precisions(step: Step, device: torch.device, warmup_steps: int, steps: int) -> dict:
    """The row's training step in every one of PRECISIONS, and their ratios to fp32."""
    recipe, _ = parse_recipe(step.row)
    runs = {p: guarded(time_step, method_bench(step), device, p, warmup_steps, steps) for p in PRECISIONS}
    return {"name": step.label, "row": step.row.where, "method": step.row.recipe,
            "model": f"{recipe.model.arch}-{recipe.model.depth} ({recipe.model.head} head)",
            "streams": stream_shapes(recipe, step.row.recipe), "runs": runs, **ratios(runs)}


def stream_shapes(recipe: Recipe, method: str) -> dict[str, list[int]]:
    """[batch, height, width] of each stream the method reads."""
    return {s: [recipe.stream_data(s).batch_size, *recipe.stream_data(s).crop] for s in method_class(method).streams}


def ratios(runs: dict) -> dict:
    """Each precision's images/s and peak memory over fp32's (None where either side failed)."""
    out = {}
    fp32 = runs.get("fp32") or {"error": "not run"}
    for precision, run in runs.items():
        if precision == "fp32":
            continue
        ok = "error" not in fp32 and "error" not in run
        key = precision.replace("+", "_")
        out[f"ratio_images_per_s_{key}_over_fp32"] = run["images_per_s"] / fp32["images_per_s"] if ok else None
        out[f"ratio_peak_memory_{key}_over_fp32"] = (run["peak_memory_gib"] / fp32["peak_memory_gib"]
                                                    if ok and fp32["peak_memory_gib"] else None)
    return out


# --- every training row of every published preset, at its paper batch ------------------------------

def cyclegan_stage(params: dict, shrink: bool):
    """The preset's ``cyclegan`` section parsed as its stage parses it (shrunk for --dry-run)."""
    return parse_cyclegan(merged(params["cyclegan"], TINY_CYCLEGAN) if shrink else params["cyclegan"])


def segmenter_recipe(params: dict, stage, shrink: bool) -> Recipe | None:
    """The recipe of the frozen segmenter of a CycleGAN with semantic consistency (None without one)."""
    if stage.cyclegan.semantic is None:
        return None
    row = find_training_row(params, stage.cyclegan.semantic.model)
    return parse_recipe(tiny(row) if shrink else row)[0]


def cyclegan_bench(params: dict, shrink: bool) -> Callable[[], Trained]:
    """The preset's CycleGAN (its ``cyclegan`` section: 4 networks, the image pools, the semantic
    segmenter if it has one) on random [-1, 1] crops of its batch."""
    stage = cyclegan_stage(params, shrink)
    recipe = segmenter_recipe(params, stage, shrink)

    def build() -> Trained:
        segmenter = None
        if recipe is not None:      # the frozen model: its row's architecture, random weights
            segmenter = FrozenSegmenter(build_model(recipe.model, NUM_CLASSES), *NORMALIZATION[recipe.normalize])
        method = CycleGAN(stage.model, stage.cyclegan, stage.train.seed, segmenter)
        generator = torch.Generator().manual_seed(0)
        n, (h, w) = stage.data.batch_size, stage.data.crop
        batch = {s: {"image": torch.rand(n, 3, h, w, generator=generator) * 2 - 1} for s in method.streams}
        return Trained(method, batch, stage.optim, stage.schedule, stage.train.cudnn_benchmark, stage.train.iters)
    return build


def training_rows(preset: str, shrink: bool) -> list[dict]:
    """One entry per training stage of the preset: its stage name, what it steps and a key shared by
    the rows that step the same thing (the same recipe, start, pseudo-label form and teacher)."""
    params = preset_params(f"{preset}.yaml")
    rows = []
    for name in [*table(params, "models"), *table(params, "selftrained")]:
        step = preset_step(preset, params, name, shrink)
        recipe, _ = parse_recipe(step.row)
        teacher = None if step.teacher is None else dataclasses.asdict(step.teacher)
        key = json.dumps([step.row.recipe, step.row.raw, step.start, step.soft_labels, step.hard_labels, teacher],
                         sort_keys=True, default=str)
        rows.append({"preset": preset, "stage": f"{'train' if step.row.table == 'models' else 'selftrain'}@{name}",
                     "key": key, "build": method_bench(step), "method": step.row.recipe,
                     "model": f"{recipe.model.arch}-{recipe.model.depth}",
                     "streams": stream_shapes(recipe, step.row.recipe)})
    cyclegan = params.get("cyclegan") or {}
    for name in cyclegan.get("outputs") or []:
        stage = cyclegan_stage(params, shrink)
        segmenter = segmenter_recipe(params, stage, shrink)
        key = json.dumps([{k: v for k, v in cyclegan.items() if k not in ("outputs", "translate")},
                          None if segmenter is None else dataclasses.asdict(segmenter.model)],
                         sort_keys=True, default=str)
        shape = [stage.data.batch_size, *stage.data.crop]
        rows.append({"preset": preset, "stage": f"cyclegan_train@{name}", "key": key,
                     "build": cyclegan_bench(params, shrink), "method": "cyclegan", "model": "cyclegan",
                     "streams": {"source": shape, "target": shape}})
    return rows


def fits(run: dict) -> dict:
    """Whether the step's peak (what the allocator reserved, plus the context) fits each card."""
    if "error" in run or run.get("peak_reserved_gib") is None:
        return {}
    return {card: run["peak_reserved_gib"] + CONTEXT_GIB <= gib for card, gib in CARDS_GIB.items()}


def measure_presets(presets: list[str], device, warmup_steps: int, steps: int, shrink: bool, budget,
                    save=lambda rows: None) -> list[dict]:
    """Every training row of ``presets`` in PRESET_PRECISIONS, each distinct step measured once.  Every
    preset's rows are built before any timing (a preset that fails to resolve costs no device time);
    ``save`` gets the rows so far after each one."""
    measured: dict[str, dict] = {}
    out = []
    for row in [row for preset in presets for row in training_rows(preset, shrink)]:
        head = {k: row[k] for k in ("preset", "stage", "method", "model", "streams")}
        if row["key"] not in measured:
            if budget.spent():
                out.append(head | {"skipped": True})
                continue
            runs = {p: guarded(time_step, row["build"], device, p, warmup_steps, steps) for p in PRESET_PRECISIONS}
            measured[row["key"]] = {"runs": runs, "fits": {p: fits(r) for p, r in runs.items()}, **ratios(runs),
                                    "first": f"{row['preset']} {row['stage']}"}
            log(f"  {row['preset']} {row['stage']}: " + ", ".join(f"{p} {describe_run(r)}" for p, r in runs.items()))
        out.append(head | measured[row["key"]])
        save(out)
    return out


def guarded(measure, *args, **kwargs) -> dict:
    """``measure(...)``, or its error as the row's result (one failed row must not cost the others)."""
    try:
        return measure(*args, **kwargs)
    except Exception as error:
        log(traceback.format_exc()[-2000:])
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}


def describe_run(run: dict) -> str:
    if "error" in run:
        return run["error"]
    peak = "" if run["peak_reserved_gib"] is None else f", {run['peak_reserved_gib']:.1f} GiB"
    return f"{run['seconds_per_iter']:.3f} s/it{peak}"


# --- inference --------------------------------------------------------------------------------------

def dataset_size(params: dict, dataset: str) -> tuple[int, int]:
    """(h, w) of a prepared image of ``dataset``: its ``resize_crop`` square, else the published frame."""
    spec = params["datasets"][dataset]
    if spec.get("resize_crop"):
        side = spec["resize_crop"]["crop"]
        return (side, side) if isinstance(side, int) else tuple(side)
    return REAL_SIZES[spec["layout"]]


def model_blocks(params: dict, ref: str) -> list[tuple[dict, float, str]]:
    """(model block, weight, normalisation) of each member behind a model reference (``name``,
    ``name/best``, or an ensemble)."""
    name = ref.split("/")[0]
    ensemble = table(params, "ensembles").get(name)
    if ensemble:
        weights = ensemble.get("weights") or [1.0] * len(ensemble["models"])
        return [(block, w * weight, norm) for member, weight in zip(ensemble["models"], weights)
                for block, w, norm in model_blocks(params, member)]
    recipe, _ = parse_recipe(find_training_row(params, name))
    return [(recipe.model, 1.0, recipe.normalize)]


def inference_cases(preset: str, shrink: bool) -> list[dict]:
    """Every evaluation, pseudo-labelling and translation of the preset: the model(s), the inference
    protocol and the image size its stage would run."""
    params = preset_params(f"{preset}.yaml")
    cases = []
    evaluate = params["evaluate"]
    inference = parse(InferenceParams, evaluate.get("inference") or {}, "evaluate.inference")
    names = [*table(params, "models"), *table(params, "selftrained"), *table(params, "ensembles")]
    for name in names:
        for target in evaluate["targets"]:
            cases.append({"preset": preset, "stage": f"evaluate@{name}-{target}", "models": model_blocks(params, name),
                          "inference": inference, "flip": inference.flip, "size": dataset_size(params, target)})
    for name, entry in table(params, "pseudo_labels").items():
        raw = merged(params.get("pseudo_label") or {}, entry.get("options") or {})
        options = parse(PseudoParams, raw, f"pseudo_labels.{name}.options")
        cases.append({"preset": preset, "stage": f"pseudo_label@{name}", "models": model_blocks(params, entry["model"]),
                      "inference": options.inference, "flip": options.flip_for(entry["form"]),
                      "size": dataset_size(params, params["target"])})
    cyclegan = params.get("cyclegan") or {}
    for name in cyclegan.get("outputs") or []:
        h, w = dataset_size(params, cyclegan["source"])
        width = cyclegan["data"].get("scale_width") or w
        cases.append({"preset": preset, "stage": f"translate@{name}", "generator": cyclegan.get("model") or {},
                      "size": (4 * round(h * width / w / 4), width)})
    if shrink:
        for case in cases:
            case["size"] = (32, 64)
            if "models" in case:
                case["models"] = [(dataclasses.replace(block, **TINY_RECIPE["model"]), w, n)
                                  for block, w, n in case["models"]]
                case["inference"] = dataclasses.replace(case["inference"], input_size=None, window=(16, 32),
                                                        stride=(16, 32))
            else:
                case["generator"] = TINY_CYCLEGAN["model"]
    return cases


def case_key(case: dict) -> str:
    """What makes two inference cases the same measurement: the models and weights, the protocol, flip and size."""
    if "generator" in case:
        return json.dumps(["generator", case["generator"], case["size"]], sort_keys=True)
    return json.dumps([[dataclasses.asdict(b), w, n] for b, w, n in case["models"]]
                      + [dataclasses.asdict(case["inference"]), case["flip"], case["size"]], sort_keys=True, default=str)


def time_inference(case: dict, device: torch.device, warmup: int, images: int) -> dict:
    """Seconds per image of one case, on a random image of its size already on the device (the
    loader's decoding runs in its workers): the models' forward passes, the upsampling to the label
    size and the argmax, as the stage runs them."""
    generator = torch.Generator().manual_seed(0)
    h, w = case["size"]
    image = torch.randn(1, 3, h, w, generator=generator).to(device)
    if "generator" in case:
        net = build_generator(CycleGANModelParams(**case["generator"])).to(device).eval()

        def run():
            with torch.inference_mode():
                return net(image).clamp(-1, 1)
    else:
        inference = case["inference"]
        pairs = [(inference_layout(build_model(block, NUM_CLASSES).to(device).eval(), inference.channels_last), weight)
                 for block, weight, _ in case["models"]]

        def run():
            logits = predict_logits(pairs, image, (h, w), mode=inference.mode, input_size=inference.input_size,
                                    window=inference.window, stride=inference.stride, flip=case["flip"],
                                    resize_mode=inference.resize, precision=inference.precision)
            return logits.argmax(1)
    torch.backends.cudnn.benchmark = True
    try:
        for _ in range(warmup):
            run()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(images):
            run()
        synchronize(device)
        return {"seconds_per_image": (time.perf_counter() - start) / images, "images": images}
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        release(device)


def measure_inference(presets: list[str], device, warmup: int, images: int, shrink: bool, budget,
                      save=lambda rows: None) -> list[dict]:
    """Every inference case of ``presets`` (``inference_cases``), each distinct one measured once;
    every case is built before any timing, and ``save`` gets the rows so far after each one."""
    measured: dict[str, dict] = {}
    out = []
    for case in [case for preset in presets for case in inference_cases(preset, shrink)]:
        head = {"preset": case["preset"], "stage": case["stage"], "size": list(case["size"])}
        key = case_key(case)
        if key not in measured:
            if budget.spent():
                out.append(head | {"skipped": True})
                continue
            measured[key] = guarded(time_inference, case, device, warmup, images)
            log(f"  {case['preset']} {case['stage']} {case['size']}: {measured[key]}")
        out.append(head | {"flip": case.get("flip"), **measured[key]})
        save(out)
    return out


# the question: DeepLabV2-R101 on a whole Cityscapes frame, whole and sliding (mmseg's 512x1024
# windows at a stride of 341x683: 3 x 3 windows), with flip, in both precisions
FRAME = (1024, 2048)
FRAME_CASES = {"whole": {"mode": "whole"}, "whole+flip": {"mode": "whole", "flip": True},
               "slide+flip": {"mode": "slide", "window": (512, 1024), "stride": (341, 683), "flip": True}}
CITYSCAPES_VAL = 500


def frame_inference(device, warmup: int, images: int, shrink: bool) -> list[dict]:
    """ADVENT's DeepLabV2-R101 on a whole 2048x1024 frame in every FRAME_CASES protocol and both precisions."""
    recipe, _ = parse_recipe(deeplabv2_steps(shrink)[0].row)
    block, size = recipe.model, ((32, 64) if shrink else FRAME)
    out = []
    for name, spec in FRAME_CASES.items():
        for precision in ("fp32", "bf16"):
            window = spec.get("window")
            stride = spec.get("stride")
            if shrink and window:
                window, stride = (16, 32), (11, 21)
            inference = InferenceParams(mode=spec["mode"], window=window, stride=stride, precision=precision,
                                        channels_last=precision == "bf16")
            case = {"models": [(block, 1.0, recipe.normalize)], "inference": inference, "flip": spec.get("flip", False),
                    "size": size}
            run = time_inference(case, device, warmup, images)
            if "seconds_per_image" in run:
                run["images_per_s"] = 1.0 / run["seconds_per_image"]
                run["cityscapes_val_s"] = run["seconds_per_image"] * CITYSCAPES_VAL
            out.append({"protocol": name, "precision": precision + ("+channels_last" if precision == "bf16" else ""),
                        "model": f"{block.arch}-{block.depth}", "size": list(size), **run})
            log(f"  frame {name} {precision}: {run}")
    return out


# --- NCCL through the project's own multi-process path ----------------------------------------------

def nccl_run(device: torch.device) -> dict:
    """The warm-up of the tiny end-to-end params with ``backend: nccl`` (``auto`` on CPU): its inputs
    and the stage itself by ``dvc repro`` (one plain process), then the same stage again under
    ``torchrun --nproc_per_node 1`` (``processes: 1``), as a hand-made torchrun launch runs it:
    does the process group initialise, does it step, does it publish the model."""
    from tests.test_pipeline import ENV, make_project, tiny_params
    params = tiny_params(chain=False)
    row = params["models"]["warmup"]["recipe"]
    params["recipes"][row]["train"].update(backend="nccl" if device.type == "cuda" else "auto", processes=1)
    env = stage_env(ENV, device)
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench_nccl_") as tmp:
        project = make_project(Path(tmp), params)
        start = time.perf_counter()
        done = run_for(["dvc", "repro", "train@warmup"], project, env, timeout=240)
        result["dvc_repro"] = {"returncode": done.returncode, "wall_s": time.perf_counter() - start,
                               "tail": (done.stdout + done.stderr)[-1500:] if done.returncode else ""}
        if done.returncode:
            return result
        for path in ("data/models/warmup", "data/checkpoints/warmup"):
            shutil.rmtree(project / path, ignore_errors=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                   "-m", "stages.train", "warmup"]
        start = time.perf_counter()
        done = run_for(command, project, dict(env, NCCL_DEBUG="INFO", TORCH_CPP_LOG_LEVEL="INFO"), timeout=180)
        output = done.stdout + done.stderr
        meta_path = project / "data/models/warmup/meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        result["torchrun"] = {"command": " ".join(command[1:]), "returncode": done.returncode,
                              "wall_s": time.perf_counter() - start,
                              "nccl_info_lines": sum("NCCL INFO" in line for line in output.splitlines()),
                              "nccl_version": nccl_version(output),
                              "process_group": process_group(output),
                              "process_group_lines": [line.strip()[-200:] for line in output.splitlines()
                                                      if "ProcessGroupNCCL" in line or "ProcessGroupGloo" in line][:4],
                              "model_written": bool(meta), "world_size": meta.get("world_size"),
                              "tail": output[-1500:]}
    return result


def stage_env(env: dict, device: torch.device) -> dict:
    """The end-to-end tests' environment for the stages, with CUDA hidden when the bench runs on the CPU."""
    return dict(env, CUDA_VISIBLE_DEVICES="") if device.type == "cpu" else dict(env)


def nccl_version(output: str) -> str | None:
    """The NCCL version PyTorch's NCCL process group reports (its log at INFO level), if any."""
    match = re.search(r"NCCL version:? *([0-9]+(?:\.[0-9]+)+)", output)
    return match.group(1) if match else None


def process_group(output: str) -> str | None:
    """Which process group the stage initialised, from PyTorch's INFO log (TORCH_CPP_LOG_LEVEL=INFO)."""
    if "ProcessGroupNCCL initialization options" in output:
        return "nccl"
    return "gloo" if "ProcessGroupGloo" in output else None


def run_for(command: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``command`` with its output captured; one that outlasts ``timeout`` (a hung process group) is
    killed and reported with exit code 124."""
    try:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:       # its output comes as bytes whatever ``text`` asked
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (expired.stdout, expired.stderr))
        return subprocess.CompletedProcess(command, 124, out, err + f"\n(killed after {timeout:.0f} s)")


def tiny_repro(with_chain: bool, targets: list[str], device: torch.device) -> dict:
    """Wall time of ``dvc repro`` on the end-to-end tests' tiny params in a fresh temporary project."""
    from tests.test_pipeline import ENV, make_project, tiny_params
    env = stage_env(ENV, device)
    with tempfile.TemporaryDirectory(prefix="bench_repro_") as tmp:
        project = make_project(Path(tmp), tiny_params(chain=with_chain))
        start = time.perf_counter()
        done = run_for(["dvc", "repro", *targets], project, env, timeout=600)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"dvc repro failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return {"wall_s": wall, "chain": with_chain, "targets": targets,
            "stages_run": done.stdout.count("Running stage")}


# --- the run -----------------------------------------------------------------------------------------

class Budget:
    """The script's wall-clock allowance: a measurement not yet started once it is spent is skipped
    (and listed as such), so one prepared run always ends with what it measured written."""

    def __init__(self, seconds: float | None):
        self.start, self.seconds = time.perf_counter(), seconds

    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > self.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def log(message: str) -> None:
    print(message, flush=True)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{torch.cuda.get_device_name(device)}, {props.total_memory / GIB:.0f} GiB "
                f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
    return f"CPU, {torch.get_num_threads()} threads"


MEASURES = ("precision", "presets", "inference", "nccl", "compile", "repro")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the dry run (tiny sizes), for checking the code without a GPU")
    parser.add_argument("--dry-run", action="store_true", help="same as --device cpu")
    parser.add_argument("--measure", nargs="+", choices=MEASURES, default=list(MEASURES))
    parser.add_argument("--preset", nargs="+", help="presets for `presets` and `inference` (default: every published one)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default 5; dry run 1)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps first (default 2; dry run 1)")
    parser.add_argument("--images", type=int, help="timed images per inference case (default 3; dry run 1)")
    parser.add_argument("--budget-s", type=float, help="start no measurement after this many seconds")
    parser.add_argument("--repro-target", nargs="*", default=[],
                        help="stages for `dvc repro` (default: the whole pipeline)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (after every measurement)")
    parser.add_argument("--commit", help="the commit measured (default: git rev-parse HEAD of this checkout)")
    parser.add_argument("--recipes", type=Path, default=ROOT / "bench" / "results" / "recipes.json",
                        help="with --hours: bench/recipes.py's results, extended in place")
    parser.add_argument("--hours", type=Path, metavar="GPU_JSON",
                        help="no measurement: add the GPU hours of GPU_JSON to bench/results/recipes.{json,md} "
                             "and write GPU_JSON's tables beside it (.md)")
    args = parser.parse_args(argv)
    if args.hours:
        return write_hours(args.hours, args.recipes)
    dry = args.dry_run or args.device == "cpu"
    if not dry and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); "
              "--dry-run runs the same measurements on CPU at tiny sizes", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    steps = args.steps or (1 if dry else 5)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if dry else 2)
    images = args.images or (1 if dry else 3)
    presets = args.preset or recipe_presets()
    budget = Budget(args.budget_s)

    result = {"device": describe(device), "torch": torch.__version__, "dry_run": dry, "steps": steps,
              "warmup_steps": warmup_steps, "images": images, "commit": args.commit or commit(), "skipped": [], "errors": {}}
    sections = {
        "precision": lambda: [compare_precisions(step, device, warmup_steps, steps)
                              for step in [*deeplabv2_steps(dry), cpsl_step(dry)]],
        "presets": lambda: measure_presets(presets, device, warmup_steps, steps, dry, budget,
                                           save=partial_saver(result, "presets", args.out)),
        "inference": lambda: {"frame": frame_inference(device, 1, images, dry),
                              "stages": measure_inference(presets, device, 1, images, dry, budget,
                                                          save=partial_saver(result, "inference", args.out))},
        "nccl": lambda: nccl_run(device),
        "compile": lambda: compile_column(device, warmup_steps, steps, dry),
        "repro": lambda: (release(device), tiny_repro(with_chain=not dry, targets=args.repro_target, device=device))[1],
    }
    for name in MEASURES:
        if name not in args.measure:
            continue
        if budget.spent():
            result["skipped"].append(name)
            continue
        log(f"[{budget.elapsed():.0f} s] {name}")
        try:
            result[name] = sections[name]()
        except Exception:        # one failed measurement must not cost the others (one GPU run, no rerun)
            result["errors"][name] = traceback.format_exc()[-3000:]
            log(result["errors"][name])
        result["elapsed_s"] = budget.elapsed()
        if args.out:
            write_json_atomic(args.out, result)
    print(markdown(result))
    return 1 if result["errors"] else 0


def partial_saver(result: dict, section: str, out: Path | None):
    """A ``save`` for a section's rows: ``out`` rewritten with the rows so far (a machine lost in the
    middle of a section keeps what it measured)."""
    def save(rows: list[dict]) -> None:
        if out:
            write_json_atomic(out, {**result, f"{section}_partial": rows})
    return save


def compile_column(device, warmup_steps: int, steps: int, shrink: bool) -> dict:
    """ADVENT's source-only step in bf16 + channels_last with the model compiled (torch.compile's
    default inductor backend), beside the same step uncompiled in the same run."""
    step = deeplabv2_steps(shrink)[0]
    build = method_bench(step)
    plain = time_step(build, device, "bf16+channels_last", warmup_steps, steps)
    compiled = time_step(build, device, "bf16+channels_last", warmup_steps + 2, steps, compile_model=True)
    ok = "error" not in plain and "error" not in compiled
    return {"name": step.label, "row": step.row.where, "plain": plain, "compiled": compiled,
            "ratio_images_per_s_compiled_over_plain": compiled["images_per_s"] / plain["images_per_s"] if ok else None}


def commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


# --- tables ------------------------------------------------------------------------------------------

def _num(value, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def _streams(streams: dict) -> str:
    return " + ".join(f"{s} {b}×{h}×{w}" for s, (b, h, w) in streams.items())


def _fit(fit: dict) -> str:
    return " / ".join(("yes" if fit[c] else "no") for c in CARDS_GIB) if fit else "–"


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device']}; torch {result['torch']}; commit {result.get('commit') or '?'}"
             + ("; DRY RUN (tiny sizes, CPU)" if result["dry_run"] else "")
             + f". Training: {result['warmup_steps']} untimed then {result['steps']} timed steps on one fixed batch; "
             f"inference: {result['images']} timed images after one untimed.", ""]
    if result.get("precision"):
        lines += ["### Training step by precision (random weights and data, the recipes' shapes)", "",
                  "| setting | streams | precision | images/s | s/iter | peak allocated GiB | peak reserved GiB |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for e in result["precision"]:
            for p, run in e["runs"].items():
                if "error" in run:
                    lines.append(f"| {e['name']} | {_streams(e['streams'])} | {p} | {run['error']} | | | |")
                    continue
                lines.append(f"| {e['name']} | {_streams(e['streams'])} | {p} | {run['images_per_s']:.2f} | "
                             f"{run['seconds_per_iter']:.3f} | {_num(run['peak_memory_gib'])} | "
                             f"{_num(run.get('peak_reserved_gib'))} |")
        lines += ["", "| setting | bf16 / fp32 images/s | bf16+channels_last / fp32 images/s | bf16+channels_last / fp32 memory |",
                  "|---|---:|---:|---:|"]
        for e in result["precision"]:
            lines.append(f"| {e['name']} | {_num(e.get('ratio_images_per_s_bf16_over_fp32'))} | "
                         f"{_num(e.get('ratio_images_per_s_bf16_channels_last_over_fp32'))} | "
                         f"{_num(e.get('ratio_peak_memory_bf16_channels_last_over_fp32'))} |")
        lines.append("")
    if result.get("compile"):
        c = result["compile"]
        lines += [f"torch.compile ({c['name']}, bf16+channels_last): {describe_run(c['plain'])} plain, "
                  f"{describe_run(c['compiled'])} compiled (compilation {_num(c['compiled'].get('untimed_s'), '.0f')} s "
                  f"in the untimed steps); compiled / plain images/s "
                  f"{_num(c['ratio_images_per_s_compiled_over_plain'])}.", ""]
    if result.get("presets"):
        cards = " / ".join(CARDS_GIB)
        lines += ["### Every published training stage at its paper batch", "",
                  f"Peak = what PyTorch's allocator reserved during the timed steps; \"fits\" adds {CONTEXT_GIB:.0f} GiB "
                  f"for the CUDA context and asks it of a {cards} card.", "",
                  f"| preset | stage | batch (per stream) | fp32 s/iter | fp32 peak GiB | fp32 fits {cards} | "
                  f"bf16+cl s/iter | bf16+cl peak GiB | bf16+cl fits {cards} | speed bf16+cl / fp32 |",
                  "|---|---|---|---:|---:|---|---:|---:|---|---:|"]
        for e in result["presets"]:
            if e.get("skipped"):
                lines.append(f"| {e['preset']} | {e['stage']} | {_streams(e['streams'])} | skipped (time) | | | | | | |")
                continue
            cells = []
            for p in PRESET_PRECISIONS:
                run = e["runs"][p]
                cells += ([run["error"], "", ""] if "error" in run else
                          [f"{run['seconds_per_iter']:.3f}", _num(run["peak_reserved_gib"]), _fit(e["fits"][p])])
            lines.append(f"| {e['preset']} | {e['stage']} | {_streams(e['streams'])} | " + " | ".join(cells)
                         + f" | {_num(e.get('ratio_images_per_s_bf16_channels_last_over_fp32'))} |")
        lines.append("")
    inference = result.get("inference") or {}
    if inference.get("frame"):
        lines += ["### Inference on a 2048×1024 frame (DeepLabV2-ResNet-101)", "",
                  "| protocol | precision | images/s | s/image | 500 Cityscapes val images, s |", "|---|---|---:|---:|---:|"]
        for f in inference["frame"]:
            if "error" in f:
                lines.append(f"| {f['protocol']} | {f['precision']} | {f['error']} | | |")
            else:
                lines.append(f"| {f['protocol']} | {f['precision']} | {f['images_per_s']:.2f} | "
                             f"{f['seconds_per_image']:.3f} | {f['cityscapes_val_s']:.0f} |")
        lines.append("")
    if inference.get("stages"):
        lines += ["### Every evaluation, pseudo-labelling and translation stage (its own protocol and precision)", "",
                  "| preset | stage | image | s/image |", "|---|---|---|---:|"]
        for s in inference["stages"]:
            value = "skipped (time)" if s.get("skipped") else s.get("error") or f"{s['seconds_per_image']:.3f}"
            lines.append(f"| {s['preset']} | {s['stage']} | {s['size'][0]}×{s['size'][1]} | {value} |")
        lines.append("")
    if result.get("nccl"):
        n = result["nccl"]
        r, t = n.get("dvc_repro", {}), n.get("torchrun") or {}
        lines += ["### One process under torchrun with the nccl backend", "",
                  f"- `dvc repro train@warmup` (tiny params, backend nccl, one plain process): exit {r.get('returncode')}, "
                  f"{_num(r.get('wall_s'), '.1f')} s.",
                  f"- `{t.get('command', '–')}`: exit {t.get('returncode')}, {_num(t.get('wall_s'), '.1f')} s, "
                  f"model written: {t.get('model_written')}, world size {t.get('world_size')}, process group "
                  f"{t.get('process_group') or '–'}, NCCL {t.get('nccl_version') or '–'}; "
                  f"{t.get('nccl_info_lines', 0)} NCCL INFO lines (NCCL creates its communicator at the first "
                  "collective, and one process runs none).", ""]
    if result.get("repro"):
        r = result["repro"]
        lines += [f"Tiny `dvc repro` ({'CPSL chain' if r['chain'] else 'warm-up only'}"
                  f"{', targets ' + ' '.join(r['targets']) if r['targets'] else ''}): {r['stages_run']} stages in "
                  f"{r['wall_s']:.1f} s" + (f" (commit {r['commit']}: {r['note']})" if r.get("note") else "") + ".", ""]
    if result.get("skipped"):
        lines += [f"Skipped for time: {', '.join(result['skipped'])}.", ""]
    for name, error in (result.get("errors") or {}).items():
        lines += [f"**{name} failed:** `{error.strip().splitlines()[-1]}`", ""]
    return "\n".join(lines)


# --- GPU hours of every published recipe ----------------------------------------------------------

TRAINING_KINDS = ("train", "selftrain", "cyclegan_train")
INFERENCE_KINDS = ("evaluate", "pseudo_label", "translate")
# the rest (HOST_STAGES) is the host's: data preparation, the colour transfers of ``stylize`` (Lab,
# FDA, Reinhard: per-image arithmetic, not a network), weight conversion, ensembles (a file), the check
# and the summary


def stage_gpu_seconds(stage: dict, training: dict, inference: dict, precision: str) -> tuple[float | None, str]:
    """(GPU seconds of one stage of recipes.json on the measured GPU, or None with the reason its
    measurement is missing).  A training stage: its step x its iterations, plus its checkpoint
    selections priced at its model's evaluation on the selection's dataset (the selection's protocol
    is the evaluation's in every published preset), plus a one-off such as ISW's statistics scaled by
    the step's speed-up over the CPU; an inference stage: its images x its model time.  A host stage
    is 0; an unknown kind is an error."""
    kind, _, name = stage["stage"].partition("@")
    if kind in HOST_STAGES:
        return 0.0, "host"
    if kind in TRAINING_KINDS:
        entry = training.get(stage["stage"])
        run = (entry or {}).get("runs", {}).get(precision) or {"error": "not measured"}
        if "error" in run or stage.get("full_units") is None:
            return None, run.get("error", "no full count")
        seconds = run["seconds_per_iter"] * stage["full_units"]
        if stage.get("selections"):
            select = inference.get(f"evaluate@{name}-{stage['select_dataset']}") or {}
            if "seconds_per_image" not in select:
                return None, "selection not measured"
            seconds += stage["selections"] * stage["select_images"] * select["seconds_per_image"]
        if stage.get("one_off_s") and stage.get("per_unit_s"):
            seconds += stage["one_off_s"] * run["seconds_per_iter"] / (stage["per_unit_s"] * stage.get("batch_factor", 1))
        return seconds, "measured"
    if kind in INFERENCE_KINDS:
        entry = inference.get(stage["stage"]) or {}
        if "seconds_per_image" not in entry or stage.get("full_units") is None:
            return None, entry.get("error", "not measured")
        return entry["seconds_per_image"] * stage["full_units"], "measured"
    raise ValueError(f"bench/gpu.py --hours: stage {stage['stage']!r} is of no kind it knows "
                     f"(training {TRAINING_KINDS}, inference {INFERENCE_KINDS}, host {HOST_STAGES})")


def gpu_hours(gpu: dict, recipes: dict) -> dict:
    """recipes.json with, per stage and preset, the GPU hours on the measured GPU in each of
    PRESET_PRECISIONS (inference at the preset's own precision), each precision totalled on its own
    (None, with the stages and reasons in ``gpu_missing``, where a stage lacks it), and the host's CPU
    hours of its data stages."""
    result = copy.deepcopy(recipes)
    result["gpu"] = {"device": gpu["device"], "commit": gpu.get("commit"), "torch": gpu["torch"]}
    for preset in result["presets"]:
        training = {e["stage"]: e for e in gpu.get("presets") or [] if e["preset"] == preset["preset"] and "runs" in e}
        inference = {e["stage"]: e for e in (gpu.get("inference") or {}).get("stages") or []
                     if e["preset"] == preset["preset"]}
        totals: dict[str, float | None] = {p: 0.0 for p in PRESET_PRECISIONS}
        missing: dict[str, str] = {}
        host = 0.0
        for stage in preset["stages"]:
            stage["gpu_h"] = {}
            for precision in PRESET_PRECISIONS:
                seconds, how = stage_gpu_seconds(stage, training, inference, precision)
                if seconds is None:
                    missing[f"{stage['stage']} ({precision})"] = how
                    totals[precision] = None
                elif totals[precision] is not None:
                    totals[precision] += seconds / 3600
                stage["gpu_h"][precision] = None if seconds is None else round(seconds / 3600, 2)
            if stage["stage"].partition("@")[0] in HOST_STAGES:
                host += stage.get("full_cpu_h") or 0.0
        preset["full_gpu_h"] = {p: None if h is None else round(h, 1) for p, h in totals.items()}
        preset["gpu_missing"] = missing
        preset["host_cpu_h"] = round(host, 1)
    return result


def hours_table(recipes: dict) -> str:
    """The GPU hours of every preset of ``gpu_hours``'s result, as Markdown."""
    lines = [f"GPU hours of a full run on one {recipes['gpu']['device'].split(',')[0]} (commit {recipes['gpu']['commit']}): "
             "training steps at the paper batch in each precision, checkpoint selections, pseudo-labels, translations "
             "and evaluations at the preset's own inference precision; the data stages (prepare, stylize) are the "
             "host's CPU hours as measured on 2 cores; model time only (the loaders decode in their workers).", "",
             "| preset | GPU h, fp32 (NCHW) | GPU h, bf16+channels_last | host CPU h (data stages) |",
             "|---|---:|---:|---:|"]
    for preset in recipes["presets"]:
        full = preset.get("full_gpu_h") or {}
        cells = ["–" if full.get(p) is None else f"{full[p]:.1f}" for p in PRESET_PRECISIONS]
        if preset.get("gpu_missing"):
            cells[-1] += " (missing: " + "; ".join(f"{s}: {why}" for s, why in preset["gpu_missing"].items()) + ")"
        lines.append(f"| {preset['preset']} | " + " | ".join(cells) + f" | {preset.get('host_cpu_h', 0):.1f} |")
    return "\n".join(lines)


def write_hours(gpu_json: Path, recipes_json: Path) -> int:
    """``--hours``: the GPU hours into ``recipes_json`` (and its .md), ``gpu_json``'s tables and the hours to its .md."""
    gpu = json.loads(gpu_json.read_text())
    recipes = gpu_hours(gpu, json.loads(recipes_json.read_text()))
    write_results(recipes_json, recipes["presets"], cpu=recipes["cpu"], extra={"gpu": recipes["gpu"]})
    gpu_json.with_suffix(".md").write_text(markdown(gpu) + "\n### GPU hours of every published recipe\n\n"
                                           + hours_table(recipes) + "\n")
    print(hours_table(recipes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
