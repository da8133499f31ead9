"""evaluate@<model>-<target>: score data/models/<model> on the ``evaluate.split`` of a prepared dataset.

Writes metrics/eval/<model>/<target>.json (mIoU, mAcc, pixel accuracy, images) and
metrics/eval/<model>/<target>/ (per-class table, confusion matrix, prediction panels, provenance);
the summary stage gathers every report into metrics/summary.json (lib.infer.summary).
"""
from __future__ import annotations

import argparse

from lib.config import load_params, section
from lib.errors import exit_on_user_error
from lib.infer.evaluation import run_evaluation
from lib.infer.params import EVAL_ROOT, EvaluateParams


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a model of the table (a folder of data/models)")
    parser.add_argument("target", help="prepared dataset to evaluate on")
    args = parser.parse_args(argv)
    params = section(load_params(), "evaluate", EvaluateParams)
    out = EVAL_ROOT / args.model
    result = run_evaluation(args.model, args.target, params, out / f"{args.target}.json", out / args.target)
    print(f"{args.model} on {args.target} ({params.split}): mIoU {result['mIoU']}")


if __name__ == "__main__":
    main()
