"""Per-stage wall time of a whole ``dvc repro``: the table the pipeline's speed is read against.

    python bench/pipeline_times.py [--repo DIR] [--fresh] [--force] [--out bench/results/pipeline.json]

Runs ``dvc repro`` in ``--repo`` (default: this checkout; ``--fresh`` clones it into a temporary
folder first, sharing nothing but the git history, so every stage really runs), reads DVC's output
as it arrives and stamps each ``Running stage '<name>'`` line: a stage's time is from its line to
the next one (or to the end), so it includes the Python start-up and imports every stage pays.
Prints a table (seconds, share of the total, grouped by kind) and writes it as JSON beside a
Markdown copy.  A stage's kind is read from its name (the part before ``@``):

    data          synthesize, prepare@<dataset>
    stylize       stylize@<output>, translate@<name> (a CycleGAN-translated source)
    weights       scratch, weights@<name> (the starts of the model table)
    train         train@<model>, selftrain@<model>, cyclegan_train@<name>
    pseudo-label  pseudo_label@<set>
    ensemble      ensemble@<name>
    evaluate      evaluate@<model>-<target>, summary

and any other name is ``other``.  The times are wall-clock on whatever the machine is doing at the
time: run it on idle cores for numbers worth comparing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
KINDS = {"synthesize": "data", "prepare": "data", "stylize": "stylize", "translate": "stylize",
         "scratch": "weights", "weights": "weights", "train": "train", "selftrain": "train",
         "cyclegan_train": "train", "pseudo_label": "pseudo-label", "ensemble": "ensemble",
         "evaluate": "evaluate", "summary": "evaluate"}


def kind_of(stage: str) -> str:
    """The kind of a dvc.yaml stage from its name: ``train@warmup`` -> train, ``summary`` -> evaluate."""
    return KINDS.get(stage.partition("@")[0], "other")


def stage_times(lines, clock=time.perf_counter) -> tuple[dict[str, float], float, list[str]]:
    """(seconds per stage in run order, total seconds, every line) from DVC's output lines."""
    times: dict[str, float] = {}
    seen: list[str] = []
    start = current_start = clock()
    current = None
    for line in lines:
        seen.append(line)
        match = STAGE_LINE.search(line)
        if match:
            now = clock()
            if current is not None:
                times[current] = now - current_start
            current, current_start = match.group(1), now
    end = clock()
    if current is not None:
        times[current] = end - current_start
    return times, end - start, seen


def arithmetic() -> dict:
    """What the run computed in: whether the CPU has native bf16 and the instruction-set caps this
    process passed on (``ONEDNN_MAX_CPU_ISA=AVX2`` makes a bf16-capable CPU compute as an AVX2-only one,
    lib/device.py)."""
    from lib.device import cpu_has_native_bf16, onednn_isa_cap

    return {"native_bf16": cpu_has_native_bf16(), "onednn_isa_cap": onednn_isa_cap(),
            "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY")}


def table(times: dict[str, float], total: float) -> str:
    rows = ["| stage | kind | seconds | share |", "|---|---|---:|---:|"]
    rows += [f"| {name} | {kind_of(name)} | {sec:.1f} | {100 * sec / total:.1f} % |" for name, sec in times.items()]
    kinds: dict[str, float] = {}
    for name, sec in times.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + sec
    rows += ["", "| kind | seconds | share |", "|---|---:|---:|"]
    rows += [f"| {kind} | {sec:.1f} | {100 * sec / total:.1f} % |"
             for kind, sec in sorted(kinds.items(), key=lambda kv: -kv[1])]
    rows += [f"| **total** (dvc repro) | {total:.1f} | 100 % |"]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=ROOT)
    parser.add_argument("--fresh", action="store_true", help="clone --repo into a temporary folder first")
    parser.add_argument("--force", action="store_true", help="dvc repro --force (re-run every stage)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    args = parser.parse_args()
    dvc = shutil.which("dvc") or sys.exit("error: dvc not found on PATH (activate the .venv)")
    workdir = args.repo.resolve()
    tmp = None
    if args.fresh:
        tmp = tempfile.mkdtemp(prefix="pipeline-times-")
        subprocess.run(["git", "clone", "-q", str(workdir), tmp], check=True)
        workdir = Path(tmp)
    cmd = [dvc, "repro", *(["--force"] if args.force else [])]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, bufsize=1)
    assert proc.stdout is not None

    def echo():
        for line in proc.stdout:
            sys.stdout.write(line)
            yield line

    times, total, _ = stage_times(echo())
    if proc.wait() != 0:
        sys.exit(f"error: `dvc repro` failed in {workdir} (exit {proc.returncode}); no table written")
    text = table(times, total)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"total_s": total, "stages_s": times, "cpus": os.cpu_count(),
                                    "repo": str(args.repo), "fresh": args.fresh, "arithmetic": arithmetic()},
                                   indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
