"""warmup: train the first model of the chain (``warmup`` in params.yaml) -> data/models/warmup.

``--variant NAME`` trains ``variants.NAME`` instead: the ``warmup`` section with that entry's keys
replaced, into data/models/NAME (a second model for an evaluation-time ensemble, e.g. MinEnt next
to an AdvEnt warm-up).  ``--finetune NAME`` trains ``finetune.NAME``: the ``warmup`` section with that
entry's keys replaced, starting from the entry's ``init`` model (its architecture and weights), into
data/models/NAME (a source-trained start for DACS/CISS, or a control trained on from a model).
"""
from __future__ import annotations

import argparse

from lib.config import load_params
from lib.engine.training import finetune_params, run_training_stage, variant_params
from lib.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--variant", help="name of an entry of `variants` in params.yaml")
    which.add_argument("--finetune", help="name of an entry of `finetune` in params.yaml")
    args = parser.parse_args(argv)
    params = load_params()
    name = args.variant or args.finetune or "warmup"
    if args.variant:
        raw = variant_params(params, args.variant)
    elif args.finetune:
        raw = finetune_params(params, args.finetune)
    else:
        raw = params.get("warmup")
    out = run_training_stage(name, raw)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
