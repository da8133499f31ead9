"""warmup: train the first model of the chain (``warmup`` in params.yaml) -> data/models/warmup."""
from __future__ import annotations

from lib.config import load_params
from lib.engine.training import run_training_stage
from lib.errors import exit_on_user_error


@exit_on_user_error
def main() -> None:
    out = run_training_stage("warmup", load_params().get("warmup"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
