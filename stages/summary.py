"""summary: every evaluation of the table in one metric file, metrics/summary.json (the one DVC
metric: `dvc exp show` stays readable), its Markdown table metrics/summary.md, and the per-class
IoU of every model per target, metrics/classes/<target>.csv (the top-level plot; lib.infer.summary)."""
from __future__ import annotations

from pathlib import Path

from lib.config import load_params, section
from lib.errors import exit_on_user_error
from lib.infer.params import EVAL_ROOT, EvaluateParams
from lib.infer.summary import write_summary
from lib.table import model_names

METRICS = Path("metrics")


@exit_on_user_error
def main() -> None:
    params = load_params()
    evaluate = section(params, "evaluate", EvaluateParams)
    models = model_names(params)
    summary = write_summary(EVAL_ROOT, models, evaluate.targets, evaluate.averages, METRICS / "summary.json",
                            METRICS / "summary.md", METRICS / "classes")
    print((METRICS / "summary.md").read_text().rstrip())
    print(f"({len(summary)} models x {len(evaluate.targets)} targets)")


if __name__ == "__main__":
    main()
