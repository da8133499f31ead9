"""selftrain NAME: one self-training run of a chain -> data/models/NAME.

The ``selftrain`` section gives the recipe, ``selftrain.runs.NAME`` what the run starts from
(``init``: a data/models folder) and reads (``pseudo``: a data/pseudo folder), plus any key it
overrides.  CPSL stage 1 (``method: cpsl_stage1`` from the warm-up and its soft pseudo-labels) or
BAFFT step 2 (``method: bafft_step2`` with class-median pseudo-labels).  Iteration-matched
controls are more runs of the same section with an ingredient taken out (README).
"""
from __future__ import annotations

import argparse

from lib.config import load_params
from lib.engine.training import run_params, run_training_stage
from lib.errors import ConfigError, exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a key of selftrain.runs in params.yaml")
    args = parser.parse_args(argv)
    params = load_params()
    raw = run_params(params, "selftrain", "runs", args.name)
    for key in ("init", "pseudo"):
        if not raw.get(key):
            raise ConfigError(f"params: selftrain.runs.{args.name}.{key} must name a "
                              f"{'data/models' if key == 'init' else 'data/pseudo'} folder")
    out = run_training_stage(args.name, raw)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
