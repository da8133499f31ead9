"""average@<model>-<name>: one model's mean mIoU over the targets of ``evaluate.averages.<name>``.

Reads metrics/<model>/<target>.json (the evaluate@<model>-<target> reports) and writes
metrics/<model>-<name>.json: ``{"mIoU": mean, "targets": {target: mIoU}}`` (DVC metrics), e.g.
BlindNet's average over the unseen Cityscapes, BDD100K and Mapillary.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lib.config import load_params, section
from lib.engine.evaluation import EvaluateParams
from lib.engine.report import average_over_targets
from lib.errors import ConfigError, DataError, exit_on_user_error
from lib.io import write_json_atomic

METRICS = Path("metrics")


def read_report(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing; run the evaluate stage of this model and target first")
    return json.loads(path.read_text())


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="name of the evaluated model (a folder of metrics/)")
    parser.add_argument("name", help="a key of evaluate.averages")
    args = parser.parse_args(argv)
    params = section(load_params(), "evaluate", EvaluateParams)
    if args.name not in params.averages:
        raise ConfigError(f"params: no average '{args.name}' under evaluate.averages "
                          f"(known: {', '.join(params.averages) or 'none'})")
    targets = params.averages[args.name]
    result = average_over_targets({t: read_report(METRICS / args.model / f"{t}.json") for t in targets})
    write_json_atomic(METRICS / f"{args.model}-{args.name}.json", result)
    print(f"{args.model} over {', '.join(targets)} ({args.name}): mean mIoU {result['mIoU']}")


if __name__ == "__main__":
    main()
