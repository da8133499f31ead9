"""ensemble@<name>: the two models of ``ensembles.<name>`` with their weights as one model artifact,
data/models/<name>, evaluated like any model (ADVENT's AdvEnt + MinEnt: two separately trained
models whose upsampled logits are summed 0.5 / 0.5; lib.models.ensemble)."""
from __future__ import annotations

import argparse
from pathlib import Path

from lib.config import load_params, parse
from lib.errors import ConfigError, exit_on_user_error
from lib.models.artifact import write_ensemble
from lib.models.ensemble import EnsembleParams
from lib.table import table

MODELS_ROOT = Path("data/models")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a key of `ensembles` in params.yaml")
    args = parser.parse_args(argv)
    params = load_params()
    entries = table(params, "ensembles")
    if args.name not in entries:
        raise ConfigError(f"params: no ensemble {args.name!r} (known: {', '.join(entries) or 'none'})")
    spec = parse(EnsembleParams, entries[args.name], f"ensembles.{args.name}")
    trained = {k for t in ("models", "selftrained") for k in table(params, t)}
    unknown = [m for m in spec.models if m not in trained]
    if unknown:
        raise ConfigError(f"params: ensembles.{args.name}.models: {unknown[0]!r} is not a trained model of the table")
    write_ensemble(MODELS_ROOT / args.name, [MODELS_ROOT / m for m in spec.models], spec.weights)
    print(f"wrote {MODELS_ROOT / args.name}: {' + '.join(f'{w:g} x {m}' for m, w in zip(spec.models, spec.weights))}")


if __name__ == "__main__":
    main()
