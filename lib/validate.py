"""Every entry of params.yaml checked at once: the ``check`` stage runs this before any other stage.

DVC removes a stage's outputs just before it runs the stage, so a typo found by the stage itself
would already have cost its previous outputs.  Every stage grows from ``check`` (the stages at the
roots of the pipeline depend on its output), so ``dvc repro`` stops at the first bad key with one
line, and nothing is removed.
"""
from __future__ import annotations

from pathlib import Path

from lib.config import parse, section
from lib.data.convert import PrepareParams, parse_dataset_spec
from lib.data.synthetic import SYNTHETIC_ROOT, SynthesizeParams
from lib.errors import ConfigError
from lib.infer.params import EvaluateParams
from lib.models.ensemble import EnsembleParams
from lib.models.weights import WeightsParams, missing_file
from lib.pseudo.artifact import load_threshold_error
from lib.pseudo.writer import pseudo_row
from lib.stylize.paired import StylizeParams
from lib.stylize.transfer import parse_transfer
from lib.table import (
    TRAINING_TABLES,
    check_acyclic,
    check_model_reference,
    check_unique_artifacts,
    find_training_row,
    model_names,
    model_reference,
    started_from,
    table,
)
from lib.train.stage import parse_recipe


def check_params(params: dict) -> dict[str, int]:
    """Parse every section; cross-check the names they share.  Returns what was checked (counts)."""
    synthesize = section(params, "synthesize", SynthesizeParams)
    section(params, "prepare", PrepareParams)
    datasets = table(params, "datasets")
    for name, raw in datasets.items():
        spec = parse_dataset_spec(name, raw)
        if not synthesize.enabled and spec.root.resolve().is_relative_to(SYNTHETIC_ROOT.resolve()):
            raise ConfigError(f"params: datasets.{name}.root {spec.root} is written by the synthesize stage, "
                              "but synthesize.enabled is false: set it true, or point the root at real data")
    stylize = section(params, "stylize", StylizeParams)
    for name, spec in stylize.outputs.items():
        parse_transfer(spec, stylize.fda_beta, f"stylize.outputs.{name}")
    translated = check_cyclegan(params)
    produced = {*datasets, *stylize.outputs, *translated}
    restyled = (("stylize.source", stylize.source), ("stylize.style", stylize.style)) if stylize.outputs else ()
    for key, name in (*restyled, ("source", params.get("source")), ("target", params.get("target"))):
        if name is not None and name not in produced:
            raise ConfigError(f"params: {key} {name!r} is not a dataset of the pipeline "
                              f"(datasets, stylize.outputs, cyclegan.outputs: {', '.join(sorted(produced))})")
    for name, raw in table(params, "weights").items():
        weights = parse(WeightsParams, raw, f"weights.{name}")
        if not Path(weights.file).is_file():     # DVC would stop at the missing dependency with its own words
            raise missing_file(name, weights, started_from(params, name))
    check_unique_artifacts(params)
    rows = [name for t in TRAINING_TABLES for name in table(params, t)]
    if not rows:
        raise ConfigError("params: the model table is empty (models and selftrained have no row): add a row, or "
                          "apply a preset that does (a base preset such as gta5_cityscapes_deeplabv2 only sets up its recipes)")
    for name in rows:
        row = find_training_row(params, name)
        recipe, _ = parse_recipe(row)
        if row.pseudo and recipe.pseudo_threshold is not None and row.pseudo in table(params, "pseudo_labels"):
            job, options = pseudo_row(params, row.pseudo)
            error = load_threshold_error(job.form, options.threshold, recipe.pseudo_threshold, row.pseudo)
            if error:
                raise ConfigError(f"params: {row.where} (recipes.{row.recipe}.pseudo_threshold) reads "
                                  f"pseudo_labels.{row.pseudo}: {error}")
    for name in table(params, "pseudo_labels"):
        pseudo_row(params, name)
    for name, raw in table(params, "ensembles").items():
        members = parse(EnsembleParams, raw, f"ensembles.{name}").models
        unknown = [m for m in members if model_reference(m)[0] not in rows]
        if unknown:
            raise ConfigError(f"params: ensembles.{name}.models: {unknown[0]!r} is not a trained model of the table")
        for member in members:
            if member not in rows:
                check_model_reference(params, member, f"ensembles.{name}.models")
    check_acyclic(params)
    evaluate = section(params, "evaluate", EvaluateParams)
    # as sets: the order of a merge of several mappings differs between PyYAML versions
    if set(evaluate.models) != set(model_names(params)):
        raise ConfigError("params: evaluate.models must be the merge of the tables, "
                          "{<<: [*models, *selftrained, *ensembles]} (it lists "
                          f"{', '.join(evaluate.models) or 'nothing'}, the tables {', '.join(model_names(params)) or 'nothing'})")
    missing = [t for t in evaluate.targets if t not in produced]
    if missing:
        raise ConfigError(f"params: evaluate.targets: {missing[0]!r} is not a dataset of the pipeline")
    return {"datasets": len(datasets), "models": len(model_names(params)),
            "pseudo_labels": len(table(params, "pseudo_labels")), "targets": len(evaluate.targets)}


def check_cyclegan(params: dict) -> list[str]:
    """The translated datasets CycleGAN adds (its section is parsed only when it has outputs)."""
    raw = params.get("cyclegan") or {}
    outputs = raw.get("outputs") if isinstance(raw, dict) else None
    if outputs or not isinstance(raw, dict):
        from lib.stylize.cyclegan import (
            parse_params,  # the CycleGAN training stack only when it is on
        )
        outputs = list(parse_params(raw).outputs)
    return [str(o) for o in outputs]
