"""pseudo_label@<name>: ``pseudo_labels.<name>`` = {model, form, options}: data/models/<model> labels
the target's training split in ``form`` -> data/pseudo/<name> (lib.pseudo.writer), with
metrics/pseudo/<name>/classes.csv (per-class predicted and kept fractions)."""
from __future__ import annotations

import argparse
from pathlib import Path

from lib.config import load_params
from lib.errors import exit_on_user_error
from lib.pseudo.artifact import PSEUDO_ROOT
from lib.pseudo.writer import generate_pseudo_labels, pseudo_row


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a key of `pseudo_labels` in params.yaml")
    args = parser.parse_args(argv)
    job, params = pseudo_row(load_params(), args.name)
    out = PSEUDO_ROOT / args.name
    meta = generate_pseudo_labels(Path("data/models") / job.model, job.dataset, job.split, job.form, params,
                                  out, metrics=Path("metrics/pseudo") / args.name)
    print(f"wrote {out}: {meta['count']} images of {job.dataset}/{job.split} labelled by {job.model} "
          f"({job.form}; kept fraction {meta['kept_fraction_total']:.4f})")


if __name__ == "__main__":
    main()
