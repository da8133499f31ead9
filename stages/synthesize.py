"""synthesize: write the embedded synthetic benchmark as raw data in the real GTA5, Cityscapes and
ACDC layouts (data/raw/synthetic/{gta5,cityscapes,acdc}); the prepare stages read it like real data.
With ``synthesize.enabled: false`` (the real-data presets) it writes an empty folder; the check stage
refuses a dataset root under data/raw/synthetic then.  The stage reads only its own section, so editing
``datasets`` never rewrites the benchmark."""
from __future__ import annotations

from lib.config import load_params, section
from lib.data.synthetic import SYNTHETIC_ROOT as OUT
from lib.data.synthetic import SynthesizeParams, write_benchmark
from lib.errors import exit_on_user_error
from lib.io import atomic_dir


@exit_on_user_error
def main() -> None:
    params = load_params()
    p = section(params, "synthesize", SynthesizeParams)
    if not p.enabled:
        with atomic_dir(OUT):
            pass
        print(f"synthesize.enabled is false: nothing synthesized into {OUT}")
        return
    counts = {d: {"train": c.train, "val": c.val} for d, c in p.counts.items()}
    with atomic_dir(OUT) as tmp:
        write_benchmark(tmp, p.height, p.width, counts, p.seed, workers=p.workers)
    print(f"synthesized {counts} at {p.height}x{p.width} into {OUT}")


if __name__ == "__main__":
    main()
