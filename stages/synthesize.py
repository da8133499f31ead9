"""synthesize: write the embedded synthetic benchmark as raw data in the real GTA5, Cityscapes and
ACDC layouts (data/raw/synthetic/{gta5,cityscapes,acdc}); the prepare stages read it like real data.
A model table on real data (no ``datasets`` root under data/raw/synthetic) gets an empty folder."""
from __future__ import annotations

from pathlib import Path

from lib.config import load_params, section
from lib.data.synthetic import SynthesizeParams, write_benchmark
from lib.errors import exit_on_user_error
from lib.io import atomic_dir

OUT = Path("data/raw/synthetic")


@exit_on_user_error
def main() -> None:
    params = load_params()
    p = section(params, "synthesize", SynthesizeParams)
    counts = {d: {"train": c.train, "val": c.val} for d, c in p.counts.items()}
    roots = [Path(str(spec.get("root", ""))) for spec in (params.get("datasets") or {}).values() if isinstance(spec, dict)]
    if not any(root.is_relative_to(OUT) for root in roots):
        with atomic_dir(OUT):
            pass
        print(f"no dataset is read from {OUT}: nothing synthesized")
        return
    with atomic_dir(OUT) as tmp:
        write_benchmark(tmp, p.height, p.width, counts, p.seed, workers=p.workers)
    print(f"synthesized {counts} at {p.height}x{p.width} into {OUT}")


if __name__ == "__main__":
    main()
