"""The summary of every evaluation: one compact metric file for ``dvc metrics show`` / ``dvc exp show``.

``summary`` reads ``metrics/eval/<model>/<target>.json`` for every model of the table and every
target of ``evaluate.targets`` and writes

- ``metrics/summary.json``: ``{model: {target: {"mIoU", "mAcc"}, <average>: {"mIoU"}}}``, the one
  file declared as a DVC metric (each evaluation's full report stays a plain output); a model that
  selected a checkpoint (lib.train.select) adds ``best_mIoU`` to each entry and
  ``selected: {iteration}``: the last iterate is the headline, the best-on-validation beside it;
- ``metrics/summary.md``: the same as a Markdown table (model rows, target columns, mIoU of the
  last iterate, the selected checkpoint's in parentheses);
- ``metrics/classes/<target>.csv``: ``class, model, iou`` for every model on that target, the
  data of the top-level per-class plot that overlays the chain's models.

An average (``evaluate.averages``: name -> targets, BlindNet's unseen Cityscapes / BDD100K /
Mapillary) is the mean of the reported two-decimal mIoUs, as the papers average their tables
(BlindNet's 44.71 = mean of 45.72, 41.32, 47.08); null when a target's mIoU is undefined.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from lib.errors import ConfigError, DataError
from lib.io import atomic_dir, write_json_atomic
from lib.table import BEST

SUMMARY_KEYS = ("mIoU", "mAcc")


def average_over_targets(reports: Mapping[str, Mapping]) -> dict:
    """One model on several targets: ``{"mIoU": mean, "targets": {target: mIoU}}`` (see module doc)."""
    if not reports:
        raise ValueError("average_over_targets needs at least one target")
    per_target = {str(target): report["mIoU"] for target, report in reports.items()}
    values = list(per_target.values())
    mean = None if None in values else round(sum(values) / len(values), 2)
    return {"mIoU": mean, "targets": per_target}


def read_report(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: missing; run the evaluate stage of this model and target first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def summarize(reports: Mapping[str, Mapping[str, Mapping]], averages: Mapping[str, Sequence[str]]) -> dict:
    """``reports``: model -> target -> its evaluation JSON.  Returns the summary (module doc)."""
    out: dict[str, dict] = {}
    for model, per_target in reports.items():
        clash = sorted(set(averages) & set(per_target))
        if clash:
            raise ConfigError(f"params: evaluate.averages.{clash[0]} has the name of a target; rename the average")
        row = {target: {k: report.get(k) for k in SUMMARY_KEYS} for target, report in per_target.items()}
        selected = [report[BEST] for report in per_target.values() if isinstance(report.get(BEST), dict)]
        for target, report in per_target.items():
            if isinstance(report.get(BEST), dict):
                row[target]["best_mIoU"] = report[BEST].get("mIoU")
        for name, targets in averages.items():
            row[name] = {"mIoU": average_over_targets({t: per_target[t] for t in targets})["mIoU"]}
            if all(isinstance(per_target[t].get(BEST), dict) for t in targets):
                row[name]["best_mIoU"] = average_over_targets({t: per_target[t][BEST] for t in targets})["mIoU"]
        if selected:
            row["selected"] = {"iteration": selected[0].get("iteration")}
        out[model] = row
    return out


def markdown(summary: Mapping[str, Mapping[str, Mapping]]) -> str:
    """Model rows, one column per target (and average): the last iterate's mIoU, and for a model
    that selected a checkpoint, the selected one's in parentheses and the iteration it was selected at."""
    columns = list(dict.fromkeys(c for row in summary.values() for c in row if c != "selected"))
    selecting = any("selected" in row for row in summary.values())
    head = ["model", *columns, *(["selected at"] if selecting else [])]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def cell(entry: Mapping) -> str:
        last = "–" if entry.get("mIoU") is None else f"{entry['mIoU']:.2f}"
        if "best_mIoU" not in entry:
            return last
        return f"{last} ({'–' if entry['best_mIoU'] is None else format(entry['best_mIoU'], '.2f')})"

    for model, row in summary.items():
        cells = [cell(row.get(c, {})) for c in columns]
        if selecting:
            cells.append(str(row["selected"]["iteration"]) if "selected" in row else "–")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def class_table(per_model_classes: Mapping[str, Path]) -> str:
    """``class, model, iou`` rows from each model's ``classes.csv`` (model -> path), in order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", "model", "iou"])
    for model, path in per_model_classes.items():
        if not path.is_file():
            raise DataError(f"{path}: missing; run the evaluate stage of this model and target first")
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                writer.writerow([row["class"], model, row["iou"]])
    return buffer.getvalue()


def write_summary(eval_root: Path, models: Sequence[str], targets: Sequence[str],
                  averages: Mapping[str, Sequence[str]], out_json: Path, out_md: Path, classes_dir: Path) -> dict:
    reports = {m: {t: read_report(eval_root / m / f"{t}.json") for t in targets} for m in models}
    summary = summarize(reports, averages)
    with atomic_dir(classes_dir) as tmp:
        for target in targets:
            (tmp / f"{target}.csv").write_text(class_table({m: eval_root / m / target / "classes.csv" for m in models}))
    write_json_atomic(out_json, summary)
    tmp_md = out_md.with_name(f".{out_md.name}.tmp")
    tmp_md.write_text(markdown(summary))
    tmp_md.replace(out_md)
    return summary
