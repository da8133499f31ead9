"""stylize@<name>: restyle ``stylize.source`` with ``stylize.outputs.<name>`` -> data/prepared/<name>.

Also writes metrics/stylize/<name>/<id>.png (source | stylized panels, DVC image plots).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lib.config import load_params, section
from lib.data.prepared import PREPARED_ROOT
from lib.device import select_device
from lib.errors import exit_on_user_error
from lib.stylize.paired import StylizeParams, run_stylize


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="output dataset name, a key of 'stylize.outputs' in params.yaml")
    args = parser.parse_args(argv)
    params = section(load_params(), "stylize", StylizeParams)
    stats = run_stylize(args.name, params, PREPARED_ROOT / args.name, Path("metrics/stylize") / args.name,
                        select_device())
    print(f"stylized {stats['images']} images of {params.source} -> {PREPARED_ROOT / args.name} "
          f"({params.outputs[args.name]}; clipped fraction {stats['clipped_fraction']:.4f})")


if __name__ == "__main__":
    main()
