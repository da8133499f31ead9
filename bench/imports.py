"""What a stage process pays before any work: the import of each stage module, and which heavy
libraries it pulls in.

    python bench/imports.py [--stages evaluate train ...] [--repeats 5] [--root DIR ...] [--out results.json]

Each repeat starts a fresh interpreter per stage (``python -c "import stages.<name>"``, in the
project folder, the page cache warm after the first), so the times are what DVC's stage processes
pay.  With several ``--root`` folders (e.g. a ``git worktree`` of an older commit) the roots run
interleaved, the order rotating from repeat to repeat, and each later root is reported as a ratio
of the first: same machine, same load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("check", "synthesize", "prepare", "stylize", "weights", "train", "pseudo_label", "evaluate", "summary")
HEAVY = ("torch", "torchvision", "torch._dynamo", "matplotlib", "dvclive", "pandas", "scipy", "cv2")


def time_import(root: Path, stage: str) -> tuple[float, list[str]]:
    """Wall seconds of a fresh interpreter importing ``stages.<stage>`` in ``root``, and which of
    ``HEAVY`` it loaded."""
    code = (f"import sys; import stages.{stage}; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, [m for m in out.stdout.strip().split(",") if m]


def measure(roots: list[Path], stages: list[str], repeats: int) -> dict:
    seconds = {str(r): {s: [] for s in stages} for r in roots}
    loaded = {str(r): {} for r in roots}
    for repeat in range(repeats):
        order = roots[repeat % len(roots):] + roots[:repeat % len(roots)]
        for stage in stages:
            for root in order:
                t, mods = time_import(root, stage)
                seconds[str(root)][stage].append(t)
                loaded[str(root)][stage] = mods
    result = {"repeats": repeats, "roots": {}}
    first = str(roots[0])
    for root in map(str, roots):
        rows = {}
        for stage in stages:
            median = statistics.median(seconds[root][stage])
            rows[stage] = {"median_s": round(median, 3), "runs": [round(t, 3) for t in seconds[root][stage]],
                           "loads": loaded[root][stage],
                           "ratio_to_first": round(median / statistics.median(seconds[first][stage]), 3)}
        result["roots"][root] = rows
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=list(STAGES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--root", type=Path, action="append", help="project folder (repeatable); default this one")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    roots = [r.resolve() for r in (args.root or [ROOT])]
    result = measure(roots, args.stages, args.repeats)
    for root, rows in result["roots"].items():
        print(f"\n{root}")
        for stage, row in rows.items():
            print(f"  {stage:<13} {row['median_s']:6.2f} s  x{row['ratio_to_first']:.2f}  {' '.join(row['loads'])}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
