"""A training stage from a row of the model table: ``train@<name>`` and ``selftrain@<name>``.

The row (lib.table) names the recipe, the start and, for a self-trained model, the pseudo-label
set; the recipe (``recipes.<method>`` with the row's ``overrides`` laid over it) holds the blocks::

    method: {...}                # the method's own params; the paper's values where not given
    model: {...}                 # lib.models.ModelParams
    normalize: imagenet          # imagenet mean/std, or unit ([0, 1], CPSL's input)
    data: {...}                  # crops, batch, sampling (lib.data.streams.DataParams)
    target_data: {...}           # the target stream's data where it differs (keys not given: `data`'s)
    optim: {model: {...}}        # one OptimizerParams per optimizer the method trains
    schedule: {...}
    train: {...}                 # iterations, seed, checkpoints, precision (TrainParams)
    pseudo_threshold: 0.95       # hard pseudo-labels: confidence <= this -> ignored (CPSL)
    select: {every: 1000, ...}   # checkpoint selection on a validation split (lib.train.select)

It writes ``data/models/<name>/`` (the model artifact), keeps its resumable state in
``data/checkpoints/<name>/`` and its DVCLive curves in ``metrics/train/<name>/``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lib import provenance
from lib.config import parse
from lib.data.dataset import PreparedDataset
from lib.data.prepared import (
    PREPARED_ROOT,
    load_class_set,
    load_index,
    load_meta,
    require_prepared,
)
from lib.data.streams import (
    NORMALIZATION,
    DataParams,
    StreamFactory,
    batches_from,
    sampler,
    stream_seed,
    train_transforms,
    training_stream,
)
from lib.data.transforms import Normalize
from lib.errors import ConfigError, DataError
from lib.infer.evaluation import validation_score
from lib.io import check_writable
from lib.methods.base import StageContext, method_class
from lib.models import ModelParams, build_model
from lib.models.artifact import load_model, load_weights
from lib.models.files import MODEL_FILE, load_checked
from lib.models.weights import WEIGHTS_KIND, initialise
from lib.pseudo.artifact import PSEUDO_ROOT, PseudoLabels
from lib.pseudo.stream import pseudo_stream
from lib.table import TrainingRow
from lib.train import distributed
from lib.train.checkpoint import (
    fingerprint,
    publish_model,
    training_identity,
    training_lock,
)
from lib.train.loop import TrainParams, seed_everything, train
from lib.train.optim import OptimizerParams, ScheduleParams
from lib.train.select import Selection, SelectParams

MODELS_ROOT = Path("data/models")
FDA_BETA = 0.01              # a plain `fda` source_style: CISS's beta (`fda:<beta>` names another)
CHECKPOINTS_ROOT = Path("data/checkpoints")
CURVES_ROOT = Path("metrics/train")


@dataclass(frozen=True)
class Recipe:
    """The blocks of a recipe, parsed (the method's own params are parsed by its dataclass)."""

    model: ModelParams
    data: DataParams
    optim: dict[str, OptimizerParams]
    train: TrainParams
    method: dict[str, Any] = dataclasses.field(default_factory=dict)
    normalize: Literal["imagenet", "unit", "symmetric", "caffe"] = "imagenet"
    schedule: ScheduleParams = ScheduleParams()
    target_data: DataParams | None = None
    pseudo_threshold: float | None = None
    select: SelectParams = SelectParams()
    # CPSL's loader: each source image restyled, as it is loaded, by a random image of the target's
    # training split (a transfer: lab, reinhard, fda or fda:<beta>); null: the source as it is
    source_style: str | None = None

    def validate(self, where: str) -> None:
        if self.pseudo_threshold is not None and not 0.0 <= self.pseudo_threshold < 1.0:
            raise ConfigError(f"params: {where}.pseudo_threshold must be in [0, 1), got {self.pseudo_threshold}")
        if self.source_style is not None:
            self.style_transfer(where)

    def style_transfer(self, where: str):
        """The parsed ``source_style`` (None without one)."""
        if self.source_style is None:
            return None
        from lib.stylize.transfer import parse_transfer   # lazy: only a restyled source needs it
        return parse_transfer(self.source_style, FDA_BETA, f"{where}.source_style")

    def stream_data(self, stream: str) -> DataParams:
        return self.target_data if stream != "source" and self.target_data is not None else self.data


def parse_recipe(row: TrainingRow) -> tuple[Recipe, Any]:
    """(the recipe with the row's overrides, the method's params); unknown keys are errors."""
    params_type = method_class(row.recipe).params_type     # first: is the recipe a method at all
    raw = dict(row.raw)
    where = f"recipes.{row.recipe}"
    if isinstance(raw.get("target_data"), dict) and isinstance(raw.get("data"), dict):
        # ADVENT reads the source at 720x1280 and the target at 512x1024: only the differences are given
        raw["target_data"] = {**raw["data"], **raw["target_data"]}
    try:
        recipe = parse(Recipe, raw, where)
        return recipe, parse(params_type, recipe.method, f"{where}.method")
    except ConfigError as err:
        raise ConfigError(in_overrides(str(err), row)) from None


def in_overrides(message: str, row: TrainingRow) -> str:
    """A recipe error caused by a key of the row's ``overrides`` names that key where it is written."""
    prefix = f"recipes.{row.recipe}."
    for path in sorted(leaf_paths(row.overrides), key=len, reverse=True):
        if prefix + path in message:
            return message.replace(prefix + path, f"{row.where}.overrides.{path}")
    return message


def leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every key in a nested mapping (inner keys too)."""
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict):
            paths += leaf_paths(value, f"{path}.")
    return paths


@dataclass
class StageInputs:
    """What a row starts from and reads besides the datasets: the ``from`` artifact (imported
    weights or a trained model), the pseudo-label set and its labeller (a distillation teacher).

    Each is checked against the row before any training starts: the class set and the input
    normalisation (a model must see images as it was trained to), the pseudo-labelled dataset.
    """

    row: TrainingRow
    start_state: dict
    start_meta: dict
    teacher: Any = None
    pseudo: PseudoLabels | None = None
    paths: list[Path] = dataclasses.field(default_factory=list)

    @classmethod
    def load(cls, row: TrainingRow, class_set: str, normalize: tuple, needs_teacher: bool,
             normalize_name: str = "") -> StageInputs:
        expected = {"mean": list(normalize[0]), "std": list(normalize[1])}
        start = MODELS_ROOT / row.start
        payload = load_checked(start / MODEL_FILE, f"start of {row.where} (`from: {row.start}`)")
        meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
        if meta.get("kind", "model") not in ("model", WEIGHTS_KIND):
            raise ConfigError(f"params: {row.where}.from: {start} is a {meta.get('kind')} artifact; a model "
                              "starts from imported weights or one trained model")
        if meta.get("kind", "model") == "model":
            _check_compatible(meta, start, f"{row.where}.from", class_set, expected)
        elif meta.get("normalize") not in (None, normalize_name):
            raise ConfigError(f"params: {row.where}.from: {start} holds {meta['format']} weights trained on inputs "
                              f"normalised as '{meta['normalize']}'; recipes.{row.recipe}.normalize is "
                              f"'{normalize_name}' (set it to '{meta['normalize']}')")
        inputs = cls(row, payload["state_dict"], meta, paths=[start / MODEL_FILE])
        if row.pseudo is not None:
            inputs.pseudo = PseudoLabels.load(PSEUDO_ROOT / row.pseudo)
            made_for = inputs.pseudo.meta.get("dataset")
            if made_for != row.target:
                raise ConfigError(f"params: {row.where}.pseudo: {PSEUDO_ROOT / row.pseudo} labels "
                                  f"'{made_for}', but the target is '{row.target}'")
            inputs.paths += sorted(p for p in (PSEUDO_ROOT / row.pseudo).iterdir()
                                   if p.is_file() and p.suffix in (".json", ".csv", ".npy"))
            if needs_teacher:
                teacher, teacher_meta = load_model(inputs.pseudo.labeller)
                _check_compatible(teacher_meta, inputs.pseudo.labeller, f"{row.where}.pseudo (its labeller)",
                                  class_set, expected)
                inputs.teacher = teacher
                inputs.paths.append(inputs.pseudo.labeller / MODEL_FILE)
        return inputs

    @property
    def start_kind(self) -> str:
        """scratch | weights (imported) | model (trained): what the row's ``from`` is."""
        if self.start_meta.get("kind", "model") != WEIGHTS_KIND:
            return "model"
        return "scratch" if self.start_meta.get("format") == "none" else "weights"

    def initialise(self, model, model_params: ModelParams) -> None:
        """Lay the start's weights on ``model``: a trained model's are copied whole (the
        architectures must agree), imported weights go to the backbone."""
        path = self.paths[0]
        if self.start_meta.get("kind", "model") == WEIGHTS_KIND:
            initialise(model, path.parent, self.start_state, self.start_meta,
                       f"the ResNet-{model_params.depth} backbone of {self.row.where} (recipes.{self.row.recipe}.model)")
        else:
            style = (self.start_meta.get("model") or {}).get("style", "torchvision")
            if style != model_params.style:     # the same tensor names and shapes, another network
                raise ConfigError(f"params: {self.row.where}.from: {path.parent} is a {style}-layout ResNet, "
                                  f"recipes.{self.row.recipe}.model.style is '{model_params.style}' (set it to '{style}')")
            load_weights(model, self.start_state, path,
                         f"a {model_params.arch}-{model_params.depth} ({self.row.where}: recipes.{self.row.recipe}.model)")


def _check_compatible(meta: dict, where: Path, key: str, class_set: str, expected: dict) -> None:
    if meta.get("class_set") != class_set:
        raise ConfigError(f"params: {key}: {where} predicts {meta.get('class_set')} classes, the source has {class_set}")
    if meta.get("normalize") != expected:
        raise ConfigError(f"params: {key}: {where} was trained on inputs normalised with {meta.get('normalize')}, "
                          f"this recipe normalises with {expected} (its `normalize`)")


@dataclass
class BuiltStage:
    """A training stage set up and ready for the engine: what :func:`run_training_stage` hands ``train``."""

    row: TrainingRow
    recipe: Recipe
    model: Any
    method: Any
    streams: dict[str, StreamFactory]
    fingerprint: str
    meta: dict                 # the model artifact's meta, less what only the finished run knows
    selection: Selection | None = None


def build_training_stage(row: TrainingRow) -> BuiltStage:
    """Check the row, its recipe and its inputs, then build its model, method and data streams.

    Joins the process group first when the stage runs under torchrun (``train.processes`` > 1); a
    plain process asking for several is relaunched under torchrun here (lib.train.distributed)."""
    recipe, method_params = parse_recipe(row)
    check_writable(MODELS_ROOT / row.name)       # before any work: the model must be writable at the end
    method_type = method_class(row.recipe)
    datasets = {"source": row.source, "target": row.target}
    needed = {s: datasets.get(s) for s in method_type.streams}
    for stream, name in needed.items():
        if name is None:
            raise ConfigError(f"params: method '{row.recipe}' ({row.where}) reads a {stream} dataset; set `{stream}`")
        require_prepared(name)
    if method_type.needs_pseudo and row.pseudo is None:
        raise ConfigError(f"params: method '{row.recipe}' trains on pseudo-labels: {row.name} belongs under "
                          "`selftrained`, with a `pseudo` set")
    if row.pseudo is not None and "target" not in needed:
        raise ConfigError(f"params: method '{row.recipe}' reads no target stream, so {row.where}.pseudo would "
                          "never be read; move the row under `models`")
    if recipe.source_style is not None:
        if row.target is None:
            raise ConfigError(f"params: recipes.{row.recipe}.source_style restyles the source by target images, "
                              "but `target` is null")
        require_prepared(row.target)
        load_index(PREPARED_ROOT / row.target, recipe.stream_data("target").split)   # the style split exists
    if recipe.select.enabled:
        selected = {"source": row.source, "target": row.target}[recipe.select.domain]
        if selected is None:
            raise ConfigError(f"params: recipes.{row.recipe}.select.domain is 'target' but `target` is null "
                              "(select on the source's validation split: domain: source)")
        require_prepared(selected)
        load_index(PREPARED_ROOT / selected, recipe.select.split, labelled=True)      # the split exists, labelled
    class_set = load_class_set(PREPARED_ROOT / row.source)
    mean, std = NORMALIZATION[recipe.normalize]
    inputs = StageInputs.load(row, class_set.name, (mean, std), method_type.needs_teacher, recipe.normalize)
    if recipe.model.arch == "deeplabv3plus" and recipe.data.batch_size < 2:
        raise ConfigError(f"params: recipes.{row.recipe}.data.batch_size must be >= 2 for deeplabv3plus "
                          "(BatchNorm on its image-pooling branch needs two samples)")

    distributed.start(recipe.train, f"recipes.{row.recipe}")   # under torchrun from here on when processes > 1

    seed_everything(recipe.train.seed)
    model = build_model(recipe.model, class_set.num_classes)
    inputs.initialise(model, recipe.model)
    context = StageContext(num_classes=class_set.num_classes, teacher=inputs.teacher, pseudo=inputs.pseudo,
                           normalize=(mean, std), start=inputs.start_kind, seed=recipe.train.seed,
                           source_frames=source_frames(row.source, recipe.data.split, recipe.normalize))
    method = method_type.build(model, method_params, context)
    seeds = {s: stream_seed(recipe.train.seed, s) for s in needed}
    stylization = method.stream_stylization()
    if stylization is not None:
        if recipe.source_style is not None:
            raise ConfigError(f"params: method '{row.recipe}' restyles its own pairs; "
                              f"recipes.{row.recipe}.source_style must be null")
        streams = stylized_pair_streams(recipe, row, stylization, seeds)
    else:
        streams = {}
        for s, name in needed.items():
            if s == "target" and inputs.pseudo is not None:
                streams[s] = pseudo_stream(name, inputs.pseudo, recipe.pseudo_threshold, recipe.stream_data(s),
                                           recipe.normalize, seeds[s])
            elif s == "source" and recipe.source_style is not None:
                streams[s] = restyled_source_stream(recipe, row, seeds[s])
            else:
                streams[s] = training_stream(name, recipe.stream_data(s), recipe.normalize, seeds[s],
                                             labelled=(s == "source"))
    meta = {
        "kind": "model",
        "stage": row.stage,
        "method": row.recipe,
        "from": row.start,
        "pseudo": row.pseudo,
        "model": dataclasses.asdict(recipe.model),
        "num_classes": class_set.num_classes,
        "class_set": class_set.name,
        "source": row.source,
        "source_protocol": load_meta(PREPARED_ROOT / row.source)["class_protocol"],
        "normalize": {"mean": list(mean), "std": list(std)},
        "params": row.raw,
    }
    identity = training_identity(row.raw, recipe.data, recipe.train)
    selected = {"source": row.source, "target": row.target}[recipe.select.domain] if recipe.select.enabled else None
    selection = None
    if selected is not None:
        scored = validation_score(selected, recipe.select.split, recipe.select.images, recipe.select.inference,
                                  recipe.select.batch_size, recipe.select.workers, meta)
        selection = Selection(recipe.select, model, scored, recipe.train.iters)
    read = [*needed.values(), *([row.target] if recipe.source_style is not None else []), *([selected] if selected else [])]
    datasets_read = list(dict.fromkeys(read))
    return BuiltStage(row, recipe, model, method, streams, fingerprint(identity, datasets_read, inputs.paths), meta,
                      selection)


def source_frames(name: str, split: str, normalize: str):
    """``StageContext.source_frames`` of prepared dataset ``name``: frames read whole and normalised;
    opened only when a method asks for frames."""
    def frames(count: int, seed) -> Iterator[torch.Tensor]:
        dataset = PreparedDataset(PREPARED_ROOT / name, split, Normalize(*NORMALIZATION[normalize]), seed=0)
        for i in np.random.default_rng(seed).permutation(len(dataset))[:count]:
            yield dataset[int(i)]["image"][None]
    return frames


def restyled_source_stream(recipe: Recipe, row: TrainingRow, seed: int) -> StreamFactory:
    """The source stream with every image restyled as it is loaded by a random image of the target's
    training split (``source_style``, CPSL's Lab transfer; lib.data.paired.RestyledSource)."""
    from lib.data.paired import RestyledSource      # lazy: only a restyled source uses it
    data = recipe.stream_data("source")
    prepared = PREPARED_ROOT / row.source
    content = PreparedDataset(prepared, data.split, train_transforms(data, recipe.normalize), seed, labelled=True)
    style = PreparedDataset(PREPARED_ROOT / row.target, recipe.stream_data("target").split, None, seed)
    restyled = RestyledSource(content, style, recipe.style_transfer(f"recipes.{row.recipe}"))
    return batches_from(restyled, sampler(prepared, content.ids, data, seed), data)


def stylized_pair_streams(recipe: Recipe, row: TrainingRow, transfer, seeds: dict[str, int]) -> dict[str, StreamFactory]:
    """The source and target streams of a method that asks for stylized pairs (CISS, lib.data.paired):
    each stream keeps its own data params, seed and sampler, and draw k of one is restyled by the full
    image of draw k of the other."""
    from lib.data.paired import (
        StylizedPairs,  # lazy: only the methods that pair streams use it
    )
    if row.pseudo is not None:
        raise ConfigError(f"params: method '{row.recipe}' pairs its own source and target streams; "
                          f"{row.name} belongs under `models` (no pseudo-label set)")
    data = {s: recipe.stream_data(s) for s in ("source", "target")}
    if data["source"].batch_size != data["target"].batch_size:
        raise ConfigError(f"params: method '{row.recipe}' pairs source and target samples one to one; "
                          f"recipes.{row.recipe}.target_data.batch_size must equal data.batch_size "
                          f"({data['target'].batch_size} != {data['source'].batch_size})")
    plain = {}
    for s, name in (("source", row.source), ("target", row.target)):
        prepared = PREPARED_ROOT / name
        dataset = PreparedDataset(prepared, data[s].split, train_transforms(data[s], recipe.normalize), seeds[s],
                                  labelled=(s == "source"))
        plain[s] = dataset, sampler(prepared, dataset.ids, data[s], seeds[s])
    streams = {}
    for s, partner in (("source", "target"), ("target", "source")):
        dataset, draws = plain[s]
        paired = StylizedPairs(dataset, *plain[partner], transfer, NORMALIZATION[recipe.normalize])
        streams[s] = batches_from(paired, draws, data[s])
    return streams


def run_training_stage(row: TrainingRow) -> Path:
    """Train the row's recipe and write ``data/models/<name>/`` atomically."""
    built = build_training_stage(row)
    recipe = built.recipe
    checkpoint_dir = CHECKPOINTS_ROOT / row.name
    with training_lock(checkpoint_dir, row.stage) if distributed.is_main() else contextlib.nullcontext():
        train(built.method, built.streams, recipe.train, recipe.optim, recipe.schedule, checkpoint_dir=checkpoint_dir,
              live_dir=None, fingerprint=built.fingerprint, desc=row.stage, selection=built.selection)
        meta = {**built.meta, "world_size": distributed.world_size()}
        meta["provenance"] = provenance.training(recipe.train.precision, recipe.train.seed, world=meta["world_size"])
        out = MODELS_ROOT / row.name
        if distributed.is_main():      # the one process that scored the model and publishes it
            best = None
            if built.selection is not None:
                if built.selection.best_state is None:
                    raise DataError(f"{row.stage}: no validation score was defined (no labelled pixel in the first "
                                    f"{recipe.select.images or 'all'} images of the {recipe.select.split} split)")
                meta["selection"] = built.selection.summary()
                best = (built.selection.best_state, {**meta, "iteration": built.selection.best_iteration})
            publish_model(out, built.model, meta, checkpoint_dir, recipe.train.iters, curves=CURVES_ROOT / row.name,
                          best=best)
    return out
