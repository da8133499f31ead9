"""Every CPU benchmark with small defaults, then all their ratios in one table.

    python bench/run_all.py [--models warmup stage1] [--out bench-results.json]

Runs, one after the other and each in its own process (their thread settings differ), from the
project root:

- bench/train_overhead.py: the engine against a bare forward/backward loop (target <= 1.05);
- bench/eval_speed.py: our evaluator against ``cityscapesscripts`` on the same PNGs (< 1: faster);
- bench/precision.py: bf16 autocast against fp32, a training step and an inference pass of the
  model row ``warmup`` (< 1: bf16 is faster; the engine uses bf16 only where the hardware has it);
- bench/optimizer.py: the fused optimizer update the engine uses against PyTorch's per-tensor loop,
  ``warmup``'s model and optimizer (< 1: fused is faster; the parameters must agree);
- bench/loader_throughput.py for each of ``--models`` (rows of ``models`` or ``selftrained``): the
  row's data loader against its model (> 1: the loader is not the bottleneck), at the configured
  workers and at 0, 1 and 2.

The last three build the rows' training stages, so they need what those stages read: the prepared
datasets, data/models/<from> and a self-trained row's pseudo-label set (after ``dvc repro``).

Each ratio's two sides are measured in the same process, interleaved or back to back, so the ratios
hold on a busy machine better than the absolute times do.  Their outputs are shown as they run; the
table at the end collects the ratios, and ``--out`` writes every script's JSON in one file.
bench/gpu.py is not part of this: it needs a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.io import write_json_atomic  # noqa: E402

SMALL = {
    "train_overhead": ["--iters", "12", "--repeats", "3", "--batch", "4"],
    "eval_speed": ["--images", "10", "--size", "1024x2048"],
    "loader_throughput": ["--batches", "20", "--steps", "3", "--repeats", "3"],
    "precision": ["--steps", "2", "--repeats", "3", "--images", "8"],
    "optimizer": ["--steps", "5", "--repeats", "3"],
}
AGREEMENT = 1e-4     # largest parameter difference between the fused and the per-tensor update


def run(script: str, args: list[str], out: Path) -> dict:
    print(f"\n$ python bench/{script}.py {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), *args, "--out", str(out)], cwd=ROOT)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"bench/{script}.py failed (exit {done.returncode})")
    return json.loads(out.read_text())


def rows(results: dict) -> list[tuple[str, str, float, str, bool]]:
    """(benchmark, what the ratio compares, ratio, target, target met)."""
    table = []
    overhead = results["train_overhead"]
    table.append(("trainer overhead", "engine / bare loop, s per iteration", overhead["ratio"], "<= 1.05",
                  overhead["ratio"] <= 1.05))
    evaluation = results["eval_speed"]
    table.append(("evaluation", f"ours / cityscapesscripts, seconds ({evaluation['images']} images)",
                  evaluation["ratio"], "< 1", evaluation["ratio"] < 1 and evaluation["agree"]))
    arithmetic = results["precision"]
    native = arithmetic["native_bf16"]
    for side, what in (("train", "training step"), ("inference", "inference")):
        ratio = arithmetic[side]["ratio"]
        table.append((f"bf16 vs fp32: {side}", f"bf16 / fp32 seconds, {what}" + ("" if native else " (emulated)"),
                      ratio, "< 1" if native else "unused", ratio < 1 if native else True))
    update = results["optimizer"]
    table.append(("optimizer update", "fused / per-tensor seconds per update", update["ratio"], "< 1",
                  update["ratio"] < 1 and update["max_abs_parameter_difference"] <= AGREEMENT))
    for model, loader in results["loader_throughput"].items():
        for row in loader["loader"]:
            mark = ", configured" if row["configured"] else ""
            table.append((f"loader vs model: {model}", f"loader / model images/s, workers {row['workers']}{mark}",
                          row["ratio"], "> 1", row["ratio"] > 1))
    return table


def print_table(table) -> None:
    print(f"\n{'benchmark':<28} {'ratio of':<50} {'ratio':>8}  {'target':<8} met")
    for name, what, ratio, target, met in table:
        print(f"{name:<28} {what:<50} {ratio:>8.3f}  {target:<8} {'yes' if met else 'NO'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["warmup"],
                        help="rows of `models` or `selftrained` for loader_throughput (default warmup)")
    parser.add_argument("--out", type=Path, help="write every script's results as one JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        tmp = Path(tmp)
        results = {name: run(name, SMALL[name], tmp / f"{name}.json") for name in ("train_overhead", "eval_speed", "precision", "optimizer")}
        results["loader_throughput"] = {
            model: run("loader_throughput", [*SMALL["loader_throughput"], "--model", model],
                       tmp / f"loader_{model}.json") for model in args.models}
    print_table(rows(results))
    if args.out:
        write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
