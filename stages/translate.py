"""translate@<name>: render the source (``cyclegan.source``) with data/models/cyclegan_<name>
-> data/prepared/<name>, a prepared dataset with translated images and the source's labels."""
from __future__ import annotations

import argparse

from lib.config import load_params
from lib.errors import exit_on_user_error
from lib.stylize.translate import translate


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="an entry of cyclegan.outputs: the prepared dataset to write")
    args = parser.parse_args(argv)
    stats = translate(args.name, load_params().get("cyclegan"))
    print(f"wrote data/prepared/{args.name} ({stats['images']} images)")


if __name__ == "__main__":
    main()
