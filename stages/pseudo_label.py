"""pseudo_label@<name>: label ``pseudo_label.dataset`` with a trained model -> data/pseudo/<name>.

``pseudo_label.outputs.<name>`` names the model (a data/models folder) and the form (soft |
hard_threshold | class_median, lib/engine/pseudo.py) and may override any other key of the
section.  Also writes metrics/pseudo/<name>/classes.csv (per-class predicted and kept fractions).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lib.config import load_params
from lib.engine.pseudo import PSEUDO_ROOT, generate_pseudo_labels, output_params
from lib.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="output name, a key of 'pseudo_label.outputs' in params.yaml")
    args = parser.parse_args(argv)
    job, params = output_params(load_params().get("pseudo_label"), args.name)
    out = PSEUDO_ROOT / args.name
    meta = generate_pseudo_labels(Path("data/models") / job.model, job.dataset, job.split, job.form, params,
                                  out, metrics=Path("metrics/pseudo") / args.name)
    print(f"wrote {out}: {meta['count']} images of {job.dataset}/{job.split} labelled by {job.model} "
          f"({job.form}; kept fraction {meta['kept_fraction_total']:.4f})")


if __name__ == "__main__":
    main()
