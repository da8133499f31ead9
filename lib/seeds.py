"""Mean ± std of every metric over several DVC experiments: ``python -m lib.seeds EXP EXP ... [--name NAME]``.

The experiments are usually one configuration run with several seeds (README, "Sweeps and seeds"):
queued with ``dvc exp run --queue -S ...``, run with ``dvc queue start -j N``.  Their metrics (every
metrics file the pipeline declares, nested keys dotted as ``dvc metrics show`` prints them) are read
from ``dvc exp show --json`` of the baseline ``--rev`` (HEAD by default); an experiment is named as
DVC names it, or by its commit (7 or more hex digits).  Written to ``metrics/seeds/<NAME>.json``:
``{"experiments": {name: rev}, "params": {key: [value per run]} (the params that differ between the
runs), "metrics": {file: {key: {"mean", "std", "n", "values"}}}}`` and the same as a Markdown table in
``metrics/seeds/<NAME>.md``.  ``std`` is the sample standard deviation (n - 1); a value a run
reports as null (an undefined score) is left out of n, the mean and the std, and kept in ``values``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lib.errors import ConfigError, DataError, exit_on_user_error
from lib.io import write_json_atomic

OUT_ROOT = Path("metrics/seeds")
MIN_REV_PREFIX = 7
FINISHED = (None, "success")    # executor states of a finished experiment (None: run in the workspace)


def experiments_table(rev: str | None = None) -> list[dict]:
    """Every row of ``dvc exp show --json`` for baseline ``rev``: ``{"name", "rev", "state", "error", "data"}``."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(("--rev", rev) if rev else ())]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        raise DataError(f"dvc exp show failed: {lines[-1] if lines else res.returncode}")
    rows = []
    for baseline in json.loads(res.stdout):
        rows.append({"name": baseline["name"], "rev": baseline["rev"], "state": None,
                     "error": baseline["error"], "data": baseline["data"]})
        for exp in baseline["experiments"] or []:
            latest = exp["revs"][0]
            rows.append({"name": exp["name"] or latest["name"], "rev": latest["rev"],
                         "state": (exp["executor"] or {}).get("state"), "error": latest["error"],
                         "data": latest["data"]})
    return rows


def find_runs(rows: Sequence[dict], wanted: Sequence[str], rev: str | None = None) -> list[dict]:
    """The row of each wanted experiment (by name, or by commit prefix); one-line errors otherwise."""
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"an experiment is named twice: {' '.join(wanted)}")
    found = []
    for want in wanted:
        hits = [r for r in rows if r["name"] == want or r["rev"] == want or
                (len(want) >= MIN_REV_PREFIX and r["rev"].startswith(want))]
        if len(hits) != 1:
            known = ", ".join(sorted({r["name"] for r in rows if r["name"]}))
            problem = "is ambiguous" if hits else "is not an experiment"
            raise ConfigError(f"'{want}' {problem} of baseline {rev or 'HEAD'} (known: {known or 'none'}; "
                              "`dvc exp show` lists them, --rev picks another baseline)")
        row = hits[0]
        if row["state"] not in FINISHED or row["error"]:
            reason = (row["error"] or {}).get("msg") or f"state {row['state']}"
            raise DataError(f"experiment '{want}' has not finished successfully ({reason}); "
                            "see `dvc queue status`")
        found.append(row)
    return found


def leaves(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested keys dotted, as ``dvc metrics show`` and ``-S`` write them: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flatten(tree: Mapping) -> dict[str, float | int | None]:
    """The metrics of a metrics file: its numbers and nulls (strings, booleans and lists are no metrics)."""
    return {key: value for key, value in leaves(tree).items()
            if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))}


def run_metrics(row: dict) -> dict[tuple[str, str], float | int | None]:
    """``{(file, key): value}`` of one experiment; a metrics file DVC could not read contributes none."""
    return {(file, key): value for file, entry in (row["data"].get("metrics") or {}).items()
            for key, value in flatten(entry.get("data") or {}).items()}


def run_params(row: dict) -> dict[str, object]:
    """``{key: value}`` of every param (keys of other params files than params.yaml prefixed ``file:``)."""
    return {("" if file == "params.yaml" else f"{file}:") + key: value
            for file, entry in (row["data"].get("params") or {}).items()
            for key, value in leaves(entry.get("data") or {}).items()}


def aggregate(runs: Mapping[str, Mapping]) -> dict:
    """``{run: {metric: value}}`` -> ``{metric: {"mean", "std", "n", "values"}}`` in the order of the
    first run's metrics; every run must report the same metrics (ConfigError otherwise)."""
    if len(runs) < 2:
        raise ConfigError(f"mean and std need at least two experiments, got {len(runs)}")
    names = list(runs)
    keys = list(runs[names[0]])
    for name in names[1:]:
        missing = [k for k in keys if k not in runs[name]]
        extra = [k for k in runs[name] if k not in runs[names[0]]]
        if missing or extra:
            who, lacking, other = (name, missing, names[0]) if missing else (names[0], extra, name)
            shown = ", ".join(_label(k) for k in lacking[:3])
            if len(lacking) > 3:
                shown += f" (+{len(lacking) - 3} more)"
            raise ConfigError(f"experiments differ in their metrics: {who} lacks {shown} that {other} reports")
    result = {}
    for key in keys:
        values = [runs[name][key] for name in names]
        numbers = np.array([v for v in values if v is not None], dtype=np.float64)
        result[key] = {"mean": float(numbers.mean()) if numbers.size else None,
                       "std": float(numbers.std(ddof=1)) if numbers.size >= 2 else None,
                       "n": int(numbers.size), "values": values}
    return result


def _label(key) -> str:
    return ":".join(key) if isinstance(key, tuple) else str(key)


def varied_params(runs: Mapping[str, Mapping[str, object]]) -> dict[str, list]:
    """The params whose values differ between the runs: ``{key: [value per run]}``."""
    keys = sorted({k for params in runs.values() for k in params})
    table = {k: [params.get(k) for params in runs.values()] for k in keys}
    return {k: values for k, values in table.items() if any(v != values[0] for v in values)}


def _fmt(value) -> str:
    if value is None:
        return "–"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def markdown(summary: dict) -> str:
    runs = list(summary["experiments"])
    lines = [f"| metric | mean ± std | n | {' | '.join(runs)} |", "|---|---|---|" + "---|" * len(runs)]
    for file, metrics in summary["metrics"].items():
        for key, stats in metrics.items():
            lines.append(f"| {file}: {key} | {_fmt(stats['mean'])} ± {_fmt(stats['std'])} | {stats['n']} | "
                         + " | ".join(_fmt(v) for v in stats["values"]) + " |")
    return "\n".join(lines) + "\n"


def summarize(rows: Sequence[dict]) -> dict:
    """The JSON written for the experiment rows ``rows`` (``find_runs``)."""
    stats = aggregate({row["name"] or row["rev"]: run_metrics(row) for row in rows})
    nested: dict[str, dict] = {}
    for (file, key), value in stats.items():
        nested.setdefault(file, {})[key] = value
    return {"experiments": {row["name"] or row["rev"]: row["rev"] for row in rows},
            "params": varied_params({row["name"] or row["rev"]: run_params(row) for row in rows}),
            "metrics": nested}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", metavar="EXP", help="experiment names or commits")
    parser.add_argument("--name", default="seeds", help="output name: metrics/seeds/<name>.json and .md")
    parser.add_argument("--rev", help="the experiments' baseline commit (default HEAD)")
    args = parser.parse_args(argv)
    if not args.name or "/" in args.name:
        raise ConfigError(f"--name must be a plain file name, got {args.name!r}")
    summary = summarize(find_runs(experiments_table(args.rev), args.experiments, args.rev))
    out = OUT_ROOT / f"{args.name}.json"
    write_json_atomic(out, summary)
    table = out.with_suffix(".md")
    table.write_text(markdown(summary))
    count = sum(len(m) for m in summary["metrics"].values())
    print(f"{count} metrics over {len(summary['experiments'])} experiments -> {out}, {table}", file=sys.stderr)


if __name__ == "__main__":
    main()
