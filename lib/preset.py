"""Apply a preset: ``python -m lib.preset presets/<name>.yaml`` merges its keys into params.yaml.

A preset is a small YAML mapping laid over params.yaml (mappings merge key by key, anything else
replaces; a ``null`` value deletes the key).  ``base: other.yaml`` lays that preset (same folder)
first, so the published recipes share one GTA5 -> Cityscapes DeepLabV2 setting.  params.yaml stays the one source of truth: after
applying, ``dvc exp run -n <name>`` (or ``dvc repro``) runs the recipe, ``git diff params.yaml``
shows what the preset changed and ``git checkout params.yaml`` undoes it.  Comments in params.yaml
are kept (ruamel round-trip).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from lib.config import PARAMS_FILE
from lib.errors import ConfigError, exit_on_user_error


def overlay(base: CommentedMap, preset: dict, where: str = "") -> None:
    """Lay ``preset`` over ``base`` in place."""
    for key, value in preset.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            overlay(base[key], value, f"{where}{key}.")
            if not base[key]:
                base[key] = {}       # an emptied block mapping with comments would dump as invalid YAML
        else:
            base[key] = value


def chain(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The preset and its ``base`` presets, base first."""
    if not path.is_file():
        raise ConfigError(f"{path}: preset not found (the presets are in presets/)")
    if path in seen:
        raise ConfigError(f"{path}: presets include each other in a loop")
    preset = YAML().load(path.read_text())     # round trip: 6.0e-5 stays a float PyYAML reads back
    if not isinstance(preset, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping of params.yaml keys")
    base = preset.pop("base", None)
    return (chain(path.parent / base, (*seen, path)) if base else []) + [preset]


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", type=Path)
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE))
    args = parser.parse_args(argv)
    yaml = YAML()
    yaml.width = 120
    layers = chain(args.preset)
    if not args.params.is_file():
        raise ConfigError(f"{args.params}: params file not found")
    params = yaml.load(args.params.read_text())
    for layer in layers:
        overlay(params, layer)
    with args.params.open("w") as f:
        yaml.dump(params, f)
    print(f"applied {args.preset} to {args.params}; run `dvc exp run -n {args.preset.stem}`", file=sys.stderr)


if __name__ == "__main__":
    main()
