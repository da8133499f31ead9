"""distill ROUND: one knowledge-distillation round (CPSL stages 2 and 3) -> data/models/distill_ROUND.

The ``distill`` section gives the shared recipe; ``distill.rounds.ROUND`` names the round's
``init`` (student), ``teacher`` and ``pseudo`` (hard pseudo-labels of the teacher).
"""
from __future__ import annotations

import argparse

from lib.config import load_params
from lib.engine.training import run_model_name, run_params, run_training_stage
from lib.errors import ConfigError, exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("round", help="a key of distill.rounds in params.yaml")
    args = parser.parse_args(argv)
    raw = run_params(load_params(), "distill", "rounds", args.round)
    if raw.get("init") not in (None, raw.get("teacher")):
        raise ConfigError(f"params: distill.rounds.{args.round}.init must be null or the round's teacher "
                          f"({raw.get('teacher')!r}), got {raw.get('init')!r}: dvc.yaml declares the teacher's "
                          "folder as the round's model dependency")
    out = run_training_stage(run_model_name("distill", args.round), raw)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
