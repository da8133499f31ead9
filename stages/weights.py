"""weights@<name>: turn the published file of ``weights.<name>`` into data/models/<name> (checked,
checksummed, in this project's names); ``python -m stages.weights scratch`` writes
data/models/scratch, the start of a model trained from random initialisation (lib.models.weights)."""
from __future__ import annotations

import argparse
from pathlib import Path

from lib.config import load_params, parse
from lib.errors import ConfigError, exit_on_user_error
from lib.models.weights import WeightsParams, import_weights, write_scratch
from lib.table import SCRATCH, started_from, table

MODELS_ROOT = Path("data/models")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="a key of `weights` in params.yaml, or scratch")
    args = parser.parse_args(argv)
    if args.name == SCRATCH:
        write_scratch(MODELS_ROOT / SCRATCH)
        print(f"wrote {MODELS_ROOT / SCRATCH} (random initialisation)")
        return
    params_all = load_params()
    entries = table(params_all, "weights")
    if args.name not in entries:
        raise ConfigError(f"params: no weights entry {args.name!r} (known: {', '.join(entries) or 'none'})")
    params = parse(WeightsParams, entries[args.name], f"weights.{args.name}")
    meta = import_weights(args.name, params, MODELS_ROOT / args.name, started_from(params_all, args.name))
    print(f"wrote {MODELS_ROOT / args.name}: {meta['mapped']} tensors of {meta['file']} ({meta['format']}, "
          f"sha256 {meta['sha256'][:12]}); left out: {', '.join(meta['skipped']) or 'nothing'}")


if __name__ == "__main__":
    main()
