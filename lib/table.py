"""The chain as a table: what params.yaml says to train, label and score.

Every name below is a folder of ``data/models/`` (weights, models, self-trained models, ensembles
share that namespace) or of ``data/pseudo/`` (pseudo-label sets)::

    source: synth_gta5_lab             the labelled domain every model trains on
    target: synth_cityscapes           the unlabelled domain: adaptation reads its images,
                                       pseudo-label sets label its training split
    weights:       name -> {format, file}                   weights@<name>
    recipes:       method -> {method, model, data, optim, schedule, train, ...}
    models:        name -> {recipe, from, overrides}         train@<name>
    selftrained:   name -> {recipe, from, pseudo, overrides} selftrain@<name>
    pseudo_labels: name -> {model, form, options}            pseudo_label@<name>
    ensembles:     name -> {models: [a, b], weights: [wa, wb]}   ensemble@<name>

A recipe is named after its method (``lib/methods/<recipe>.py``), so a row's code dependency is
``lib/methods/${recipe}.py`` and its params are its own row and its recipe.  ``from`` names a
weights entry (``scratch`` is random initialisation) or another model; ``overrides`` is laid over
the recipe (mappings merge key by key).  ``models`` and ``selftrained`` are two parts of one table
because DVC has no optional dependencies: a row of ``selftrained`` also depends on its pseudo-label
set (and, for distillation, on the model that made it, the set's labeller).

This module checks names and references only (no torch): what a recipe's blocks mean is parsed
by the training stage (lib.train.stage).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lib.config import merged
from lib.errors import ConfigError

SCRATCH = "scratch"        # random initialisation: the `scratch` stage writes data/models/scratch
BEST = "best"              # `<model>/best`: a model's selected checkpoint, data/models/<model>/best
TRAINING_TABLES = ("models", "selftrained")
ARTIFACT_TABLES = ("weights", *TRAINING_TABLES, "ensembles")      # everything written to data/models
ROW_KEYS = {"models": ("recipe", "from", "overrides"), "selftrained": ("recipe", "from", "pseudo", "overrides")}
REQUIRED_KEYS = {"models": ("recipe", "from"), "selftrained": ("recipe", "from", "pseudo")}


@dataclass(frozen=True)
class TrainingRow:
    """One model to train, resolved: its recipe with the row's overrides laid over it."""

    name: str
    table: str                   # models | selftrained
    recipe: str                  # the method (lib/methods/<recipe>.py)
    start: str                   # `from`: a weights entry or another model
    pseudo: str | None           # selftrained only: the pseudo-label set of the target stream
    source: str
    target: str | None
    raw: dict = field(default_factory=dict)   # recipe ⊕ overrides, as parsed by lib.train.stage
    overrides: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.table}.{self.name}"

    @property
    def stage(self) -> str:
        return f"{'train' if self.table == 'models' else 'selftrain'}@{self.name}"


def table(params: dict, name: str) -> dict:
    """``params[name]`` as a mapping (absent or empty: {})."""
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"params: '{name}' must be a mapping of names to entries, got {value!r}")
    return {str(k): v for k, v in value.items()}


def artifact_owners(params: dict) -> dict[str, list[str]]:
    """Every name of data/models -> the table entries that write it (more than one is an error)."""
    owners: dict[str, list[str]] = {}
    for name in ARTIFACT_TABLES:
        for key in table(params, name):
            owners.setdefault(key, []).append(f"{name}.{key}")
    return owners


def check_unique_artifacts(params: dict) -> None:
    owners = artifact_owners(params)
    if SCRATCH in owners:
        raise ConfigError(f"params: {owners[SCRATCH][0]}: the name {SCRATCH!r} is reserved for random initialisation")
    clashes = {name: where for name, where in owners.items() if len(where) > 1}
    if clashes:
        name, where = next(iter(clashes.items()))
        raise ConfigError(f"params: the name {name!r} is taken by {' and '.join(where)} (each writes data/models/{name})")


def _row(params: dict, table_name: str, name: str) -> dict:
    row = table(params, table_name)[name]
    where = f"{table_name}.{name}"
    if not isinstance(row, dict):
        raise ConfigError(f"params: {where} must be a mapping with keys {', '.join(ROW_KEYS[table_name])}, got {row!r}")
    unknown = sorted(set(row) - set(ROW_KEYS[table_name]))
    if unknown:
        hint = " (a row of `models` reads no pseudo-labels: put it under `selftrained`)" if unknown[0] == "pseudo" else ""
        raise ConfigError(f"params: unknown key '{where}.{unknown[0]}' (known keys: "
                          f"{', '.join(ROW_KEYS[table_name])}){hint}")
    for key in REQUIRED_KEYS[table_name]:
        if not isinstance(row.get(key), str) or not row[key]:
            raise ConfigError(f"params: {where}.{key} must name a {_what(key)}, got {row.get(key)!r}")
    if not isinstance(row.get("overrides", {}) or {}, dict):
        raise ConfigError(f"params: {where}.overrides must be a mapping of recipe keys, got {row['overrides']!r}")
    return row


def _what(key: str) -> str:
    return {"recipe": "recipe (a key of `recipes`)", "from": "weights entry or model",
            "pseudo": "pseudo-label set (a key of `pseudo_labels`)"}[key]


def find_training_row(params: dict, name: str) -> TrainingRow:
    """The row that trains data/models/<name>, resolved against its recipe; every reference checked."""
    tables = [t for t in TRAINING_TABLES if name in table(params, t)]
    if not tables:
        known = sorted(k for t in TRAINING_TABLES for k in table(params, t))
        raise ConfigError(f"params: no model {name!r} under models or selftrained (known: {', '.join(known) or 'none'})")
    check_unique_artifacts(params)
    table_name = tables[0]
    row = _row(params, table_name, name)
    where = f"{table_name}.{name}"
    recipes = table(params, "recipes")
    if row["recipe"] not in recipes:
        raise ConfigError(f"params: {where}.recipe {row['recipe']!r} is not a key of `recipes` "
                          f"(known: {', '.join(recipes) or 'none'})")
    recipe = recipes[row["recipe"]]
    if not isinstance(recipe, dict):
        raise ConfigError(f"params: recipes.{row['recipe']} must be a mapping of blocks, got {recipe!r}")
    start, _ = model_reference(row["from"])
    startable = {SCRATCH} | set(table(params, "weights")) | {k for t in TRAINING_TABLES for k in table(params, t)}
    if start not in startable or start == name:
        raise ConfigError(f"params: {where}.from {row['from']!r} is neither {SCRATCH}, a weights entry nor another "
                          f"model (weights: {', '.join(table(params, 'weights')) or 'none'})")
    if row["from"] != start:
        check_model_reference(params, row["from"], f"{where}.from")
    pseudo = row.get("pseudo")
    if pseudo is not None and pseudo not in table(params, "pseudo_labels"):
        raise ConfigError(f"params: {where}.pseudo {pseudo!r} is not a key of `pseudo_labels` "
                          f"(known: {', '.join(table(params, 'pseudo_labels')) or 'none'})")
    source, target = domains(params)
    return TrainingRow(name=name, table=table_name, recipe=row["recipe"], start=row["from"], pseudo=pseudo,
                       source=source, target=target, raw=merged(recipe, row.get("overrides") or {}),
                       overrides=row.get("overrides") or {})


def domains(params: dict) -> tuple[str, str | None]:
    """(source, target): the prepared datasets every row trains on."""
    source, target = params.get("source"), params.get("target")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"params: 'source' must name the labelled prepared dataset the models train on, got {source!r}")
    if target is not None and (not isinstance(target, str) or not target):
        raise ConfigError(f"params: 'target' must name a prepared dataset (or be null), got {target!r}")
    return source, target


def model_names(params: dict) -> list[str]:
    """Every model the evaluation scores: the rows of models, selftrained and ensembles, in order."""
    return [k for t in (*TRAINING_TABLES, "ensembles") for k in table(params, t)]


def model_reference(ref: str) -> tuple[str, str]:
    """A model as the table names it: ``kd1`` is its last iterate, ``kd1/best`` its selected checkpoint
    (lib.train.select).  Returns (model, "last" | what follows the slash)."""
    name, slash, checkpoint = str(ref).partition("/")
    return name, (checkpoint if slash else "last")


def selects(params: dict, name: str) -> bool:
    """Whether training row ``name`` keeps a selected checkpoint (its recipe's ``select.every`` > 0)."""
    for t in TRAINING_TABLES:
        row = table(params, t).get(name)
        if isinstance(row, dict):
            recipe = table(params, "recipes").get(row.get("recipe"))
            raw = merged(recipe if isinstance(recipe, dict) else {}, row.get("overrides") or {})
            select = raw.get("select") if isinstance(raw.get("select"), dict) else {}
            every = select.get("every", 0)
            return isinstance(every, int) and every > 0
    return False


def check_model_reference(params: dict, ref: str, where: str) -> None:
    """``<model>/best`` names a training row whose recipe selects (a plain name is checked by the caller)."""
    name, checkpoint = model_reference(ref)
    if checkpoint != BEST or not any(name in table(params, t) for t in TRAINING_TABLES):
        raise ConfigError(f"params: {where} {ref!r}: a model is named `<model>` (its last iterate) or "
                          f"`<model>/{BEST}` (the checkpoint its training selected), <model> a row of models or selftrained")
    if not selects(params, name):
        raise ConfigError(f"params: {where} {ref!r}: {name} keeps no selected checkpoint; set select.every > 0 "
                          f"in its recipe (or its overrides)")


def upstream(params: dict, name: str) -> list[str]:
    """The data/models names ``name`` is built from (its `from`, its pseudo-label set's labeller,
    an ensemble's members), each as its model's name (``kd1/best`` is kd1)."""
    for t in TRAINING_TABLES:
        row = table(params, t).get(name)
        if isinstance(row, dict):
            labeller = (table(params, "pseudo_labels").get(row.get("pseudo")) or {}).get("model")
            return [model_reference(n)[0] for n in (row.get("from"), labeller) if n]
    members = table(params, "ensembles").get(name)
    if isinstance(members, dict):
        return [model_reference(m)[0] for m in members.get("models") or []]
    return []


def started_from(params: dict, start: str) -> list[str]:
    """The training rows (as ``table.row``) whose `from` is ``start``."""
    return [f"{t}.{name}" for t in TRAINING_TABLES for name, row in table(params, t).items()
            if isinstance(row, dict) and row.get("from") == start]


def check_acyclic(params: dict) -> None:
    """No model may grow from itself through `from`, pseudo-label sets or ensemble members."""
    state: dict[str, int] = {}          # 1 visiting, 2 done

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            loop = " -> ".join((*path[path.index(name):], name))
            raise ConfigError(f"params: the model table grows in a circle: {loop}")
        state[name] = 1
        for parent in upstream(params, name):
            visit(parent, (*path, name))
        state[name] = 2

    for name in model_names(params):
        visit(name, ())


def names_in(params: dict, tables: Iterable[str]) -> set[str]:
    return {k for t in tables for k in table(params, t)}
