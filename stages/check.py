"""check: every entry of params.yaml parsed and cross-checked before any other stage runs
(lib.validate); writes data/checked.json, which the stages at the roots of the pipeline depend on."""
from __future__ import annotations

from pathlib import Path

from lib.config import load_params
from lib.errors import exit_on_user_error
from lib.io import write_json_atomic
from lib.validate import check_params

OUT = Path("data/checked.json")


@exit_on_user_error
def main() -> None:
    counts = check_params(load_params())
    write_json_atomic(OUT, {"params": "checked"})      # constant: a re-check re-runs nothing downstream
    print("params checked: " + ", ".join(f"{n} {what}" for what, n in counts.items()))


if __name__ == "__main__":
    main()
