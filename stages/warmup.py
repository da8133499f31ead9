"""warmup: train the first model of the chain (``warmup`` in params.yaml) -> data/models/warmup.

``--variant NAME`` trains ``variants.NAME`` instead: the ``warmup`` section with that entry's keys
replaced, into data/models/NAME (a second model for an evaluation-time ensemble, e.g. MinEnt next
to an AdvEnt warm-up).
"""
from __future__ import annotations

import argparse

from lib.config import load_params, merged
from lib.engine.training import run_training_stage
from lib.errors import ConfigError, exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", help="name of an entry of `variants` in params.yaml")
    args = parser.parse_args(argv)
    params = load_params()
    raw, name = params.get("warmup"), "warmup"
    if args.variant is not None:
        variants = params.get("variants") or {}
        if args.variant not in variants or not isinstance(variants[args.variant], dict):
            raise ConfigError(f"params: variants.{args.variant} is not a mapping of warmup keys to replace "
                              f"(variants: {', '.join(variants) or 'none'})")
        ensembles = (params.get("evaluate") or {}).get("ensembles") or {}
        if args.variant == "warmup" or args.variant in ensembles:
            raise ConfigError(f"params: variants.{args.variant}: the name is taken")
        raw, name = merged(raw, variants[args.variant]), args.variant
    out = run_training_stage(name, raw)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
