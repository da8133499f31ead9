"""Everything a training stage shares: its params, its data streams, its outputs.

A training stage (``warmup`` now; self-training and distillation later) reads one section of
params.yaml::

    method: source_only          # a name from lib.methods.registry
    source_only: {...}           # that method's own params (other methods' sections may sit beside it)
    source: synth_gta5           # prepared datasets the streams read
    target: synth_cityscapes
    model: {...}                 # lib.models.ModelParams
    normalize: imagenet          # imagenet mean/std, or unit ([0, 1], CPSL's input)
    data: {...}                  # crops, batch, sampling (DataParams)
    optim: {model: {...}}        # one OptimizerParams per optimizer the method trains
    schedule: {...}
    train: {...}                 # iterations, seed, checkpoints, precision (TrainParams)

and writes ``data/models/<stage>/`` (the model artifact), ``data/checkpoints/<stage>/`` (the
resumable state, a ``persist: true`` output) and ``metrics/<stage>/train/`` (DVCLive curves).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from torch.utils.data import Dataset

from lib.config import merged, parse, positive, positive_pair
from lib.data.dataset import PreparedDataset, infinite_batches
from lib.data.prepared import PREPARED_ROOT, load_centroids, load_class_counts, load_class_set, load_meta
from lib.data.sampling import Draw, centroid_entries, class_uniform_stream, rare_class_stream, uniform_stream
from lib.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, Compose, HorizontalFlip, Normalize,
                                 RandomCrop, RandomScale, Resize, ScaleWidth)
from lib.engine import distributed
from lib.engine import provenance
from lib.engine.checkpoint import MODEL_FILE, STATE_FILE, load_model, load_weights, save_model
from lib.engine.loop import StreamFactory, TrainParams, seed_everything, train
from lib.engine.optim import OptimizerParams, ScheduleParams
from lib.errors import ConfigError, DataError
from lib.io import atomic_dir, write_json_atomic
from lib.methods.base import StageContext, available_methods, method_class
from lib.models import ModelParams, build_model

if TYPE_CHECKING:
    from lib.stylize.transfer import Transfer

NORMALIZATION = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                 "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}   # [-1, 1]: the CycleGAN input


@dataclass(frozen=True)
class DataParams:
    batch_size: int = 8
    crop: tuple[int, int] = (96, 192)                 # (height, width) of training crops
    resize: tuple[int, int] | None = None             # (height, width) before cropping; null keeps the size
    scale_width: int | None = None                    # resize to this width, aspect kept (CycleGAN)
    scale: tuple[float, float] | None = None          # random rescale range before cropping
    flip: bool = True
    split: str = "train"
    sampling: Literal["uniform", "class_uniform", "rare_class"] = "uniform"
    class_uniform_pct: float = 0.5                    # RobustNet: share of class-centroid draws
    rcs_temperature: float = 0.01                     # DAFormer RCS
    rcs_min_pixels: int = 3000
    rcs_min_crop_ratio: float = 0.5
    workers: int = 2

    def validate(self, where: str) -> None:
        positive(self.batch_size, f"{where}.batch_size")
        positive(self.workers, f"{where}.workers", allow_zero=True)
        if self.scale_width is not None:
            positive(self.scale_width, f"{where}.scale_width")
        for name in ("crop", "resize", "scale"):
            positive_pair(getattr(self, name), f"{where}.{name}")
        if self.scale is not None and self.scale[0] > self.scale[1]:
            raise ConfigError(f"params: {where}.scale must be [min, max], got {list(self.scale)}")


@dataclass(frozen=True)
class TrainingStageParams:
    method: str
    source: str
    data: DataParams
    optim: dict[str, OptimizerParams]
    train: TrainParams
    model: ModelParams | None = None          # null: the architecture of `init`
    target: str | None = None
    normalize: Literal["imagenet", "unit", "symmetric"] = "imagenet"
    schedule: ScheduleParams = ScheduleParams()
    target_data: DataParams | None = None     # the target stream's data; keys not given come from `data`
    init: str | None = None                   # data/models/<init>: start from these weights (all of them)
    teacher: str | None = None                # data/models/<teacher>: a frozen teacher (distillation)
    pseudo: str | None = None                 # data/pseudo/<pseudo>: the target stream's pseudo-labels
    pseudo_threshold: float | None = None     # hard pseudo-labels: confidence <= this -> ignored (CPSL 0.95)

    def validate(self, where: str) -> None:
        if self.model is None and self.init is None:
            raise ConfigError(f"params: {where} needs a `model` section or an `init` model to copy it from")
        if self.pseudo_threshold is not None and not 0.0 <= self.pseudo_threshold < 1.0:
            raise ConfigError(f"params: {where}.pseudo_threshold must be in [0, 1), got {self.pseudo_threshold}")

    def stream_data(self, stream: str) -> DataParams:
        return self.target_data if stream != "source" and self.target_data is not None else self.data


def parse_stage(raw: Any, where: str) -> tuple[TrainingStageParams, Any]:
    """(stage params, the chosen method's params); unknown keys and method names are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params: {where} must be a mapping")
    known = available_methods()
    stage_raw = {k: v for k, v in raw.items() if k not in known}
    if isinstance(stage_raw.get("target_data"), dict) and isinstance(stage_raw.get("data"), dict):
        # ADVENT reads the source at 720x1280 and the target at 512x1024: only the differences are given
        stage_raw["target_data"] = {**stage_raw["data"], **stage_raw["target_data"]}
    stage = parse(TrainingStageParams, stage_raw, where)
    params_type = method_class(stage.method).params_type
    return stage, parse(params_type, raw.get(stage.method, {}), f"{where}.{stage.method}")


def model_owners(params: dict) -> dict[str, list[str]]:
    """Every name under data/models (and ensemble names, which share the evaluation namespace) ->
    the params entries that produce it."""
    owners: dict[str, list[str]] = {"warmup": ["warmup"]}
    producers = [(params.get("variants"), "variants.{}", "{}"),
                 (params.get("finetune"), "finetune.{}", "{}"),
                 ((params.get("selftrain") or {}).get("runs"), "selftrain.runs.{}", "{}"),
                 ((params.get("distill") or {}).get("rounds"), "distill.rounds.{}", "distill_{}"),
                 ((params.get("evaluate") or {}).get("ensembles"), "evaluate.ensembles.{}", "{}")]
    for entries, where, model in producers:
        for key in entries or {}:
            owners.setdefault(model.format(key), []).append(where.format(key))
    return owners


def claim_model_name(params: dict, name: str, where: str) -> None:
    """One line and no training when the model ``where`` writes is also another entry's."""
    others = [o for o in model_owners(params).get(name, []) if o != where]
    if others:
        raise ConfigError(f"params: {where}: the model name {name!r} is taken by {', '.join(others)}")


def variant_params(params: dict, name: str) -> dict:
    """The ``warmup`` section with ``variants.<name>`` laid over it (a second model of the chain)."""
    variants = params.get("variants") or {}
    if name not in variants or not isinstance(variants[name], dict):
        raise ConfigError(f"params: variants.{name} is not a mapping of warmup keys to replace "
                          f"(variants: {', '.join(variants) or 'none'})")
    claim_model_name(params, name, f"variants.{name}")
    return merged(params.get("warmup"), variants[name])


def finetune_params(params: dict, name: str) -> dict:
    """``warmup`` with ``finetune.<name>`` laid over it, trained on from the entry's ``init`` model.

    The architecture is the init model's (its meta), with the entry's own ``model`` keys replacing
    them; ``warmup.model`` is left out, as is the init's weight source (its weights are copied).
    A source-trained start for a method that is meant to start from a trained network (DACS/CISS
    start from ImageNet in their papers), or a control: the same model trained on without the new
    ingredient.  Any method that reads no pseudo-labels and no teacher (a warm-up method) fits.
    """
    entries = params.get("finetune") or {}
    where = f"finetune.{name}"
    if name not in entries or not isinstance(entries[name], dict):
        raise ConfigError(f"params: {where} is not a mapping of warmup keys to replace "
                          f"(finetune: {', '.join(entries) or 'none'})")
    if not entries[name].get("init"):
        raise ConfigError(f"params: {where}.init must name the data/models folder to train on from")
    for key in ("teacher", "pseudo"):
        if entries[name].get(key):
            raise ConfigError(f"params: {where}.{key}: a finetune run reads no {key} (dvc.yaml tracks only "
                              f"its init model); a run with a {key} is a selftrain.runs or distill.rounds entry")
    claim_model_name(params, name, where)
    base = {k: v for k, v in (params.get("warmup") or {}).items() if k != "model"}
    return merged(base, entries[name])


def with_init_model(raw: dict, stage_name: str) -> dict:
    """A stage with an ``init`` model inherits its architecture: ``model`` keys given in the stage
    replace the init's (e.g. CPSL stage 1 unfreezes BatchNorm: ``model: {bn: batch}``)."""
    if not isinstance(raw, dict) or not raw.get("init"):
        return raw
    meta_path = MODELS_ROOT / str(raw["init"]) / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: model not found ({stage_name}.init = {raw['init']!r}; "
                        "is it produced by an earlier stage?)")
    meta = json.loads(meta_path.read_text())
    return dict(raw, model=merged(dict(meta["model"], weights="none"), raw.get("model") or {}))


def run_params(params: dict, section: str, runs_key: str, name: str) -> dict:
    """One run of a chain stage: ``params[section]`` (less ``runs_key``) with
    ``params[section][runs_key][name]`` laid over it (its init, teacher, pseudo-labels, ...).

    ``selftrain.runs.<name>`` and ``distill.rounds.<name>`` work this way, so a control (the same
    stage with one ingredient removed) is one more entry, e.g. ``-S '+selftrain.runs.ctl={...}'``.
    """
    base = dict(params.get(section) or {})
    runs = {str(k): v for k, v in (base.pop(runs_key, None) or {}).items()}
    if str(name) not in runs or not isinstance(runs[str(name)], dict):
        raise ConfigError(f"params: {section}.{runs_key}.{name} is not a mapping "
                          f"({section}.{runs_key}: {', '.join(runs) or 'none'})")
    claim_model_name(params, run_model_name(section, name), f"{section}.{runs_key}.{name}")
    return merged(base, runs[str(name)])


def run_model_name(section: str, name: str) -> str:
    """The data/models folder a chain run writes: ``selftrain.runs.<name>`` -> <name>,
    ``distill.rounds.<k>`` -> distill_<k>."""
    return f"distill_{name}" if section == "distill" else str(name)


def train_transforms(data: DataParams, normalize: str) -> Compose:
    steps = []
    if data.resize is not None:
        steps.append(Resize(*data.resize))
    if data.scale_width is not None:
        steps.append(ScaleWidth(data.scale_width))
    if data.scale is not None:
        steps.append(RandomScale(*data.scale))
    steps.append(RandomCrop(*data.crop))
    if data.flip:
        steps.append(HorizontalFlip())
    steps.append(Normalize(*NORMALIZATION[normalize]))
    return Compose(steps)


def sampler(prepared: Path, ids: list[str], data: DataParams, seed: int) -> Callable[[int], Iterator[Draw]]:
    """The draw requests of a training stream over the rows ``ids``, from any draw number on."""
    if data.sampling == "uniform":
        return functools.partial(uniform_stream, len(ids), seed)
    if data.sampling == "class_uniform":
        entries = centroid_entries(load_centroids(prepared), ids, load_class_set(prepared).num_classes)
        return functools.partial(class_uniform_stream, len(ids), entries, data.class_uniform_pct, seed)
    counts = load_class_counts(prepared, ids)
    return functools.partial(rare_class_stream, counts, data.rcs_temperature, data.rcs_min_pixels,
                             int(data.rcs_min_pixels * data.rcs_min_crop_ratio), seed)


def batches_from(dataset: Dataset, draws: Callable[[int], Iterator[Draw]], data: DataParams) -> StreamFactory:
    """The factory of a stream; called in the training loop, it gives this process its slice of
    every global batch (lib.engine.distributed)."""
    def from_iteration(start_it: int) -> Iterator[dict]:
        rank, world = distributed.rank(), distributed.world_size()
        return infinite_batches(dataset, draws, data.batch_size, data.workers,
                                start_draw=start_it * world * data.batch_size, rank=rank, world=world)
    return from_iteration


def training_stream(name: str, data: DataParams, normalize: str, seed: int, labelled: bool) -> StreamFactory:
    """Endless batches of prepared dataset ``name``; the factory takes the iteration to start at."""
    prepared = PREPARED_ROOT / name
    dataset = PreparedDataset(prepared, data.split, train_transforms(data, normalize), seed, labelled=labelled)
    return batches_from(dataset, sampler(prepared, dataset.ids, data, seed), data)


def stylized_pair_streams(stage: TrainingStageParams, stage_name: str, transfer: Transfer,
                          seeds: dict[str, int]) -> dict[str, StreamFactory]:
    """The source and target streams of a method that asks for stylized pairs (CISS, lib.data.paired):
    each stream keeps its own data params, seed and sampler, and draw k of one is restyled by the full
    image of draw k of the other."""
    from lib.data.paired import StylizedPairs    # lazy: only the methods that pair streams depend on it
    if stage.pseudo is not None:
        raise ConfigError(f"params: method '{stage.method}' pairs its own source and target streams; "
                          f"{stage_name}.pseudo must be null")
    data = {s: stage.stream_data(s) for s in ("source", "target")}
    if data["source"].batch_size != data["target"].batch_size:
        raise ConfigError(f"params: method '{stage.method}' pairs source and target samples one to one; "
                          f"{stage_name}.target_data.batch_size must equal data.batch_size "
                          f"({data['target'].batch_size} != {data['source'].batch_size})")
    plain = {}
    for s, name in (("source", stage.source), ("target", stage.target)):
        prepared = PREPARED_ROOT / name
        dataset = PreparedDataset(prepared, data[s].split, train_transforms(data[s], stage.normalize), seeds[s],
                                  labelled=(s == "source"))
        plain[s] = dataset, sampler(prepared, dataset.ids, data[s], seeds[s])
    streams = {}
    for s, partner in (("source", "target"), ("target", "source")):
        dataset, draws = plain[s]
        paired = StylizedPairs(dataset, *plain[partner], transfer, NORMALIZATION[stage.normalize])
        streams[s] = batches_from(paired, draws, data[s])
    return streams


def stream_seed(seed: int, stream: str) -> int:
    """Distinct data seeds per stream, so draw k of source and target never share a crop."""
    return int(np.random.SeedSequence([seed, *stream.encode()]).generate_state(1)[0])


def across_world_sizes(raw: dict, data: DataParams, train: TrainParams) -> dict:
    """``raw`` as a checkpoint's fingerprint sees it: without the launch keys (processes, backend)
    and with the global batch (processes x per-process batch) in place of each per-process one.  A
    run can so be resumed by another number of processes with the same global batch; a run whose
    global batch changed is another configuration and trains from scratch."""
    out = dict(raw, train={k: v for k, v in (raw.get("train") or {}).items() if k not in ("processes", "backend")},
               data=dict(raw.get("data") or {}, batch_size=data.batch_size * train.processes))
    if isinstance(raw.get("target_data"), dict) and "batch_size" in raw["target_data"]:
        out["target_data"] = dict(raw["target_data"], batch_size=raw["target_data"]["batch_size"] * train.processes)
    return out


def fingerprint(raw_params: Any, datasets: list[str], files: list[Path] = ()) -> str:
    """Identity of a training configuration: its params, the prepared data and the input artifacts
    (init / teacher models, pseudo-labels) it reads."""
    digest = hashlib.sha256(json.dumps(raw_params, sort_keys=True, default=str).encode())
    for name in datasets:
        for part in ("meta.json", "index.csv", "class_counts.csv", "centroids.csv"):
            digest.update((PREPARED_ROOT / name / part).read_bytes())
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


MODELS_ROOT = Path("data/models")
PSEUDO_ROOT = Path("data/pseudo")


@dataclass
class StageInputs:
    """The artifacts a later stage of a chain reads: its init model, a teacher, pseudo-labels.

    Each is checked against the stage before any training starts: the class set, the input
    normalisation (a teacher must see images as it was trained to) and the pseudo-labelled dataset.
    """

    stage_name: str
    init_meta: dict | None = None
    init_state: dict | None = None
    teacher: Any = None
    pseudo: Any = None
    paths: list[Path] = dataclasses.field(default_factory=list)

    @classmethod
    def load(cls, stage: TrainingStageParams, stage_name: str, class_set: str,
             normalize: tuple[tuple[float, ...], tuple[float, ...]]) -> "StageInputs":
        inputs = cls(stage_name)
        expected = {"mean": list(normalize[0]), "std": list(normalize[1])}
        for key in ("init", "teacher"):
            name = getattr(stage, key)
            if name is None:
                continue
            model, meta = load_model(MODELS_ROOT / name)
            where = f"{MODELS_ROOT / name}"
            if meta["class_set"] != class_set:
                raise ConfigError(f"params: {stage_name}.{key}: {where} predicts {meta['class_set']} classes, "
                                  f"the source has {class_set}")
            if meta["normalize"] != expected:
                raise ConfigError(f"params: {stage_name}.{key}: {where} was trained on inputs normalised with "
                                  f"{meta['normalize']}, this stage normalises with {expected} "
                                  f"({stage_name}.normalize)")
            inputs.paths.append(MODELS_ROOT / name / MODEL_FILE)
            if key == "init":
                inputs.init_meta, inputs.init_state = meta, model.state_dict()
            else:
                inputs.teacher = model
        if stage.pseudo is not None:
            from lib.engine.pseudo import PseudoLabels
            inputs.pseudo = PseudoLabels.load(PSEUDO_ROOT / stage.pseudo)
            made_for = inputs.pseudo.meta.get("dataset")
            if made_for != stage.target:
                raise ConfigError(f"params: {stage_name}.pseudo: {PSEUDO_ROOT / stage.pseudo} labels "
                                  f"'{made_for}', but {stage_name}.target is '{stage.target}'")
            inputs.paths += sorted(p for p in (PSEUDO_ROOT / stage.pseudo).iterdir()
                                   if p.is_file() and p.suffix in (".json", ".csv", ".npy"))
        return inputs

    def initialise(self, model, model_params: ModelParams) -> None:
        """Copy the init model's weights into ``model`` (strict: the architectures must agree)."""
        if self.init_state is not None:
            load_weights(model, self.init_state, self.paths[0],
                         f"a {model_params.arch}-{model_params.depth} ({self.stage_name}.model)")

    def files(self) -> list[Path]:
        return list(self.paths)


@dataclass
class BuiltStage:
    """A training stage set up and ready for the engine: what :func:`run_training_stage` hands ``train``."""

    name: str
    stage: TrainingStageParams
    model: Any
    method: Any
    streams: dict[str, StreamFactory]
    fingerprint: str
    meta: dict                 # the model artifact's meta, less what only the finished run knows


def build_training_stage(stage_name: str, raw: dict) -> BuiltStage:
    """Check the stage's params and inputs, then build its model, method and data streams (no training).

    Joins the process group first when the stage runs under torchrun (``train.processes`` > 1); a
    plain process asking for several is relaunched under torchrun here (lib.engine.distributed)."""
    stage, method_params = parse_stage(with_init_model(raw, stage_name), stage_name)
    method_type = method_class(stage.method)
    datasets = {"source": stage.source, "target": stage.target}
    needed = {s: datasets.get(s) for s in method_type.streams}
    for stream, name in needed.items():
        if name is None:
            raise ConfigError(f"params: method '{stage.method}' reads a {stream} dataset; set {stage_name}.{stream}")
        require_prepared(name)
    for wanted, key in ((method_type.needs_teacher, "teacher"), (method_type.needs_pseudo, "pseudo")):
        if wanted and getattr(stage, key) is None:
            raise ConfigError(f"params: method '{stage.method}' needs {stage_name}.{key}")
    class_set = load_class_set(PREPARED_ROOT / stage.source)
    mean, std = NORMALIZATION[stage.normalize]
    inputs = StageInputs.load(stage, stage_name, class_set.name, (mean, std))
    model_params = stage.model
    if model_params.arch == "deeplabv3plus" and stage.data.batch_size < 2:
        raise ConfigError(f"params: {stage_name}.data.batch_size must be >= 2 for deeplabv3plus "
                          "(BatchNorm on its image-pooling branch needs two samples)")

    distributed.start(stage.train, stage_name)   # under torchrun from here on when processes > 1

    seed_everything(stage.train.seed)
    model = build_model(model_params, class_set.num_classes)
    inputs.initialise(model, model_params)
    context = StageContext(num_classes=class_set.num_classes, teacher=inputs.teacher, pseudo=inputs.pseudo,
                           normalize=(mean, std))
    method = method_type.build(model, method_params, context)
    seeds = {s: stream_seed(stage.train.seed, s) for s in needed}
    stylization = method.stream_stylization()
    if stylization is not None:
        streams = stylized_pair_streams(stage, stage_name, stylization, seeds)
    else:
        streams = {}
        for s, name in needed.items():
            if s == "target" and inputs.pseudo is not None:
                from lib.engine.pseudo import pseudo_stream
                streams[s] = pseudo_stream(name, inputs.pseudo, stage.pseudo_threshold, stage.stream_data(s),
                                           stage.normalize, seeds[s])
            else:
                streams[s] = training_stream(name, stage.stream_data(s), stage.normalize, seeds[s],
                                             labelled=(s == "source"))
    meta = {
        "stage": stage_name,
        "method": stage.method,
        "model": dataclasses.asdict(model_params),
        "num_classes": class_set.num_classes,
        "class_set": class_set.name,
        "source": stage.source,
        "source_protocol": load_meta(PREPARED_ROOT / stage.source)["class_protocol"],
        "normalize": {"mean": list(mean), "std": list(std)},
        "params": raw,
    }
    return BuiltStage(stage_name, stage, model, method, streams,
                      fingerprint(across_world_sizes(raw, stage.data, stage.train), list(needed.values()),
                                  inputs.files()), meta)


def run_training_stage(stage_name: str, raw: dict) -> Path:
    """Train the configured method and write ``data/models/<stage_name>/`` atomically."""
    built = build_training_stage(stage_name, raw)
    stage = built.stage
    checkpoint_dir = Path("data/checkpoints") / stage_name
    train(built.method, built.streams, stage.train, stage.optim, stage.schedule, checkpoint_dir=checkpoint_dir,
          live_dir=Path("metrics") / stage_name / "train", fingerprint=built.fingerprint, desc=stage_name)
    meta = {**built.meta, "world_size": distributed.world_size()}
    meta["provenance"] = provenance.training(stage.train, world=meta["world_size"])
    out = Path("data/models") / stage_name
    if distributed.is_main():
        publish_model(out, built.model, meta, checkpoint_dir, stage.train.iters)
    return out


def require_prepared(name: str) -> None:
    if not (PREPARED_ROOT / name / "index.csv").is_file():
        raise DataError(f"{PREPARED_ROOT / name}: prepared dataset not found (is '{name}' under 'datasets'?)")


def publish_model(out: Path, model, meta: dict, checkpoint_dir: Path, iters: int) -> None:
    """Write the model artifact ``out`` atomically, then retire the resumable state of its training."""
    with atomic_dir(out) as tmp:
        save_model(tmp, model, meta)
    # The resumable state only serves an interrupted run; left behind, it would let a re-run after
    # a code change "resume" at the last iteration and skip training.  A small note replaces it.
    (checkpoint_dir / STATE_FILE).unlink(missing_ok=True)
    write_json_atomic(checkpoint_dir / "finished.json",
                      {"iterations": iters, "note": "training finished; the model is in " + str(out)})
