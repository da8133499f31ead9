"""warmup: train the first model of the chain (``warmup`` in params.yaml) -> data/models/warmup.

``--variant NAME`` trains ``variants.NAME`` instead: the ``warmup`` section with that entry's keys
replaced, into data/models/NAME (a second model for an evaluation-time ensemble, e.g. MinEnt next
to an AdvEnt warm-up).
"""
from __future__ import annotations

import argparse

from lib.config import load_params
from lib.engine.training import run_training_stage, variant_params
from lib.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", help="name of an entry of `variants` in params.yaml")
    args = parser.parse_args(argv)
    params = load_params()
    name = args.variant or "warmup"
    raw = variant_params(params, args.variant) if args.variant else params.get("warmup")
    out = run_training_stage(name, raw)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
