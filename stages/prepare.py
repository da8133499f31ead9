"""prepare@<name>: convert one raw dataset (``datasets.<name>`` in params.yaml) into data/prepared/<name>."""
from __future__ import annotations

import argparse

from lib.config import load_params, section
from lib.data.convert import PrepareParams, parse_dataset_spec, prepare_dataset
from lib.data.prepared import PREPARED_ROOT
from lib.errors import ConfigError, exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="dataset name, a key of 'datasets' in params.yaml")
    args = parser.parse_args(argv)
    params = load_params()
    datasets = params.get("datasets") or {}
    if args.name not in datasets:
        raise ConfigError(f"params: no dataset '{args.name}' under 'datasets' "
                          f"(known: {', '.join(datasets) or 'none'})")
    spec = parse_dataset_spec(args.name, datasets[args.name])
    meta = prepare_dataset(spec, PREPARED_ROOT / args.name, section(params, "prepare", PrepareParams))
    print(f"prepared {args.name}: {meta['counts']} ({meta['class_protocol']})")
    for note in meta["count_notes"]:
        print(f"note: {note} (fine for a subset)")
    if meta["skipped"]:
        print(f"note: skipped {len(meta['skipped'])} frames, listed in {PREPARED_ROOT / args.name / 'meta.json'}")


if __name__ == "__main__":
    main()
