"""cyclegan_train@<name>: train a CycleGAN between ``cyclegan.source`` and ``cyclegan.target``
(params.yaml ``cyclegan``) -> data/models/cyclegan_<name> (the source -> target generator)."""
from __future__ import annotations

import argparse

from lib.config import load_params
from lib.errors import exit_on_user_error
from lib.stylize.cyclegan import run_cyclegan_training


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="an entry of cyclegan.outputs: the translated dataset this model will write")
    args = parser.parse_args(argv)
    out = run_cyclegan_training(args.name, load_params().get("cyclegan"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
