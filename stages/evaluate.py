"""evaluate@<model>-<target>: score data/models/<model> on the ``evaluate.split`` of a prepared dataset.

Writes metrics/<model>/<target>.json (DVC metrics) and metrics/<model>/<target>/ (per-class table,
confusion matrix, prediction panels: DVC plots).  A model name listed in ``evaluate.ensembles``, or
``--ensemble a:0.5 b:0.5``, scores the weighted sum of several models' logits instead (ADVENT's
AdvEnt+MinEnt figure).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lib.config import load_params, section
from lib.engine.evaluation import EvaluateParams, run_evaluation
from lib.errors import ConfigError, exit_on_user_error


def parse_member(text: str) -> tuple[str, float]:
    name, _, weight = text.partition(":")
    try:
        return name, float(weight) if weight else 1.0
    except ValueError:
        raise ConfigError(f"--ensemble member {text!r}: expected name:weight") from None


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="name of the evaluated model (a folder of data/models, or the ensemble's name)")
    parser.add_argument("target", help="prepared dataset to evaluate on")
    parser.add_argument("--ensemble", nargs="+", metavar="NAME:WEIGHT", help="members of an ensemble")
    args = parser.parse_args(argv)
    params = section(load_params(), "evaluate", EvaluateParams)
    if args.ensemble:
        members = [parse_member(m) for m in args.ensemble]
    elif args.model in params.ensembles:
        members = list(params.ensembles[args.model].items())
    else:
        members = [(args.model, 1.0)]
    out = Path("metrics") / args.model
    result = run_evaluation(members, args.target, params, out / f"{args.target}.json", out / args.target)
    print(f"{args.model} on {args.target} ({params.split}): mIoU {result['mIoU']}")


if __name__ == "__main__":
    main()
