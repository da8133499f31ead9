"""Apply a preset: ``python -m lib.preset presets/<name>.yaml`` merges its keys into params.yaml.

A preset is a small YAML mapping laid over params.yaml (mappings merge key by key, anything else
replaces; a ``null`` value deletes the key).  ``replace: [models, selftrained, ...]`` empties those
mappings first, so a preset states its whole model table instead of deleting the default's rows
one by one (the mappings are emptied in place: the anchors that ``evaluate.models`` merges stay
linked).  ``base: other.yaml`` lays that preset (same folder) first, so the published recipes share
one GTA5 -> Cityscapes DeepLabV2 setting, and ``copy: {recipes.minent: recipes.advent}`` copies a
node of the params (after ``replace``, before the overlay), so a preset can take a recipe of its
base and change what differs.  params.yaml stays the one source of truth: after
applying, ``dvc exp run -n <name>`` (or ``dvc repro``) runs the recipe, ``git diff params.yaml``
shows what the preset changed and ``git checkout params.yaml`` undoes it.  Comments in params.yaml
are kept (ruamel round-trip).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from lib.config import PARAMS_FILE
from lib.errors import ConfigError, exit_on_user_error


def overlay(base: CommentedMap, preset: dict, where: str = "") -> None:
    """Lay ``preset`` over ``base`` in place."""
    for key, value in preset.items():
        if value is None and inherited(base, key):
            raise ConfigError(f"preset: {where}{key}: null cannot delete a key this mapping takes from a "
                              f"block it merges (`<<:`); set a value here, or change the block itself")
        if value is None:
            try:
                base.pop(key, None)
            except KeyError:
                # The key is gone; ruamel.yaml then fails while updating the mappings that merge this
                # block (`<<:`).  apply() reads the document back after the layer, which merges afresh.
                pass
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            overlay(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def inherited(mapping, key) -> bool:
    """Whether ``mapping`` has ``key`` only through a merged block (``<<: *block``), not as its own."""
    return (isinstance(mapping, CommentedMap) and key in mapping
            and key not in dict(mapping.non_merged_items()))


def tidy(node) -> None:
    """Write every empty mapping as ``{}``: an emptied block mapping that kept its comments would dump
    as invalid YAML.  The mapping itself stays (an anchor may point at it)."""
    if isinstance(node, CommentedMap):
        if not node:
            node.ca.comment = None
            node.fa.set_flow_style()
        for value in node.values():
            tidy(value)
    elif isinstance(node, list):
        for value in node:
            tidy(value)


def empty(base: CommentedMap, dotted: str, where: Path) -> None:
    """Empty the mapping at ``dotted`` in place (a missing one is created empty)."""
    node = base
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, CommentedMap())
    target = node.get(parts[-1])
    if target is None:
        node[parts[-1]] = CommentedMap()
    elif isinstance(target, dict):
        target.clear()
    else:
        raise ConfigError(f"{where}: replace: {dotted!r} is not a mapping of params.yaml")


def node_at(base: CommentedMap, dotted: str, where: Path):
    node = base
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where}: copy: {dotted!r} is not in params.yaml")
        node = node[part]
    return node


def copy_node(base: CommentedMap, dest: str, source: str, where: Path) -> None:
    """Set ``dest`` to a deep copy of ``source`` (plain values: no anchor travels with it)."""
    value = json.loads(json.dumps(node_at(base, source, where)))
    *parents, last = dest.split(".")
    node = base
    for part in parents:
        node = node.setdefault(part, CommentedMap())
    node[last] = value


def chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The preset and its ``base`` presets, base first."""
    if not path.is_file():
        raise ConfigError(f"{path}: preset not found (the presets are in presets/)")
    if path in seen:
        raise ConfigError(f"{path}: presets include each other in a loop")
    preset = YAML().load(path.read_text())     # round trip: 6.0e-5 stays a float PyYAML reads back
    if not isinstance(preset, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping of params.yaml keys")
    base = preset.pop("base", None)
    return (chain(path.parent / base, (*seen, path)) if base else []) + [(path, preset)]


def apply(params: CommentedMap, preset: Path) -> CommentedMap:
    """Lay ``preset`` (and its bases) over the round-trip document ``params``: each layer's
    ``replace`` and ``copy`` first, then the overlay.  Returns the document as read back from its
    text after every layer: a mapping that merges a block (``<<: *model``) holds copies of the
    block's values in memory, so a block a layer changed reaches the recipes (and the next layer's
    ``copy``) only through the text, as it reaches DVC."""
    for path, layer in chain(preset):
        for dotted in layer.pop("replace", None) or []:
            empty(params, str(dotted), path)
        for dest, source in (layer.pop("copy", None) or {}).items():
            copy_node(params, str(dest), str(source), path)
        overlay(params, layer)
        tidy(params)
        params = reread(params)
    return params


def round_trip_yaml() -> YAML:
    yaml = YAML()
    yaml.width = 120
    return yaml


def reread(params: CommentedMap) -> CommentedMap:
    """``params`` written out and read back (merge keys resolved again from their anchors)."""
    yaml, text = round_trip_yaml(), io.StringIO()
    yaml.dump(params, text)
    return yaml.load(text.getvalue())


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", type=Path)
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    args = parser.parse_args(argv)
    yaml = round_trip_yaml()
    chain(args.preset)     # a missing or looping preset is reported before params.yaml is read
    if not args.params.is_file():
        raise ConfigError(f"{args.params}: params file not found")
    params = apply(yaml.load(args.params.read_text()), args.preset)
    with args.params.open("w") as f:
        yaml.dump(params, f)
    print(f"applied {args.preset} to {args.params}; run `dvc exp run -n {args.preset.stem}`", file=sys.stderr)


if __name__ == "__main__":
    main()
