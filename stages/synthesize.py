"""synthesize: write the embedded synthetic benchmark as raw data in the real GTA5, Cityscapes and
ACDC layouts (data/raw/synthetic/{gta5,cityscapes,acdc}); the prepare stages read it like real data."""
from __future__ import annotations

from pathlib import Path

from lib.config import load_params, section
from lib.data.synthetic import SynthesizeParams, write_benchmark
from lib.errors import exit_on_user_error
from lib.io import atomic_dir

OUT = Path("data/raw/synthetic")


@exit_on_user_error
def main() -> None:
    p = section(load_params(), "synthesize", SynthesizeParams)
    counts = {d: {"train": c.train, "val": c.val} for d, c in p.counts.items()}
    with atomic_dir(OUT) as tmp:
        write_benchmark(tmp, p.height, p.width, counts, p.seed, workers=p.workers)
    print(f"synthesized {counts} at {p.height}x{p.width} into {OUT}")


if __name__ == "__main__":
    main()
