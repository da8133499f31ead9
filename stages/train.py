"""train@<name> / selftrain@<name>: train the row ``<name>`` of the model table -> data/models/<name>.

A row of ``models`` (or ``selftrained``, which also reads a pseudo-label set) names its recipe, the
weights or model it starts ``from`` and any ``overrides`` of the recipe (lib.table, lib.train.stage).
"""
from __future__ import annotations

import argparse

from lib.config import load_params
from lib.errors import exit_on_user_error
from lib.table import find_training_row
from lib.train.stage import run_training_stage


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a key of `models` or `selftrained` in params.yaml")
    args = parser.parse_args(argv)
    out = run_training_stage(find_training_row(load_params(), args.name))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
