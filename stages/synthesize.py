"""synthesize: write the embedded synthetic benchmark as raw data in the real GTA5, Cityscapes and
ACDC layouts (data/raw/synthetic/{gta5,cityscapes,acdc}); the prepare stages read it like real data."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib.config import load_params, positive, section
from lib.data.synthetic import DOMAINS, write_benchmark
from lib.errors import ConfigError, exit_on_user_error
from lib.io import atomic_dir

OUT = Path("data/raw/synthetic")


@dataclass(frozen=True)
class SplitCounts:
    train: int
    val: int

    def validate(self, where: str) -> None:
        positive(self.train, f"{where}.train", allow_zero=True)
        positive(self.val, f"{where}.val", allow_zero=True)


@dataclass(frozen=True)
class SynthesizeParams:
    counts: dict[str, SplitCounts]
    height: int = 128
    width: int = 256
    seed: int = 0
    workers: int = 2

    def validate(self, where: str) -> None:
        if sorted(self.counts) != sorted(DOMAINS):
            raise ConfigError(f"params: {where}.counts must name exactly the domains {', '.join(DOMAINS)}")
        for key in ("height", "width", "workers"):
            positive(getattr(self, key), f"{where}.{key}")


@exit_on_user_error
def main() -> None:
    p = section(load_params(), "synthesize", SynthesizeParams)
    counts = {d: {"train": c.train, "val": c.val} for d, c in p.counts.items()}
    with atomic_dir(OUT) as tmp:
        write_benchmark(tmp, p.height, p.width, counts, p.seed, workers=p.workers)
    print(f"synthesized {counts} at {p.height}x{p.width} into {OUT}")


if __name__ == "__main__":
    main()
