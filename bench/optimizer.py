"""Fused against per-tensor optimizer updates of one model row's model and optimizers.

    python bench/optimizer.py [--model warmup] [--steps 10] [--repeats 3] [--out results.json]

``--model`` is a row of the model table (``models`` or ``selftrained``), resolved as
bench/loader_throughput.py resolves it (its inputs must exist as its stage needs them); the stage's
own set-up (``lib.train.stage.build_training_stage``, one process, no loader workers) gives the
method, its parameter groups and the recipe's optimizer params.  Two copies of the same initial weights get the same seeded gradients; one is
updated by the optimizer the engine builds (``lib.train.optim.build_optimizer``: PyTorch's fused
kernel on CPU and CUDA), the other by the same optimizer with the per-tensor loop (PyTorch's CPU
default).  ``--steps`` updates are timed per block, interleaved ``--repeats`` times (medians count),
and reported as seconds per update and the ratio fused / per-tensor (< 1: fused is faster).  The
largest parameter difference between the two copies after every block says the update is the same.
Only the optimizer step is timed: no forward, no backward, no data.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loader_throughput import require_inputs, training_row, with_workers  # noqa: E402
from lib.config import load_params  # noqa: E402
from lib.device import select_device  # noqa: E402
from lib.errors import exit_on_user_error  # noqa: E402
from lib.io import write_json_atomic  # noqa: E402
from lib.train.optim import build_optimizer  # noqa: E402
from lib.train.stage import build_training_stage  # noqa: E402

KERNELS = {"fused": True, "per_tensor": False}


def _optimizers(name: str, device: torch.device) -> tuple[dict, str]:
    """(kernel -> the row's optimizers over its own copy of the model, method name); every copy
    starts from the same weights."""
    params = load_params()
    row = with_workers(training_row(params, name), 0)
    require_inputs(params, row)
    copies = {}
    for kernel, fused in KERNELS.items():
        built = build_training_stage(row)     # the same seed and start: the same initial weights
        for module in built.method.modules().values():
            module.to(device)
        groups = built.method.param_groups()
        copies[kernel] = [build_optimizer(groups[group], built.recipe.optim[group], fused=fused) for group in groups]
    return copies, row.recipe


def _parameters(optimizers) -> list[torch.Tensor]:
    return [p for opt in optimizers for g in opt.param_groups for p in g["params"]]


def _set_gradients(optimizers, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    for p in _parameters(optimizers):
        p.grad = torch.randn(p.shape, generator=generator).to(p.device)


def _block(optimizers, start: int, steps: int, device: torch.device) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds = 0.0
    for step in range(start, start + steps):
        _set_gradients(optimizers, step)
        synchronize()
        begin = time.perf_counter()
        for opt in optimizers:
            opt.step()
        synchronize()
        seconds += time.perf_counter() - begin
    return seconds / steps


def measure(name: str, steps: int, repeats: int) -> dict:
    device = select_device()
    copies, method = _optimizers(name, device)
    runs = {kernel: [] for kernel in KERNELS}
    for kernel, optimizers in copies.items():      # first updates (state allocation) stay out of the timings
        _block(optimizers, 0, 1, device)
    difference = 0.0
    for repeat in range(repeats):
        start = 1 + repeat * steps
        for kernel, optimizers in copies.items():
            runs[kernel].append(_block(optimizers, start, steps, device))
        fused, loop_ = (_parameters(copies[k]) for k in KERNELS)
        difference = max(difference, max(float((a - b).detach().abs().max()) for a, b in zip(fused, loop_)))
    median = {kernel: statistics.median(v) for kernel, v in runs.items()}
    tensors = _parameters(copies["fused"])
    return {"row": name, "method": method, "device": str(device), "threads": torch.get_num_threads(),
            "optimizers": [type(opt).__name__ for opt in copies["fused"]],
            "tensors": len(tensors), "parameters": sum(p.numel() for p in tensors),
            "seconds_per_update": median, "runs": runs, "steps": steps, "repeats": repeats,
            "ratio": median["fused"] / median["per_tensor"], "max_abs_parameter_difference": difference}


def print_table(result: dict) -> None:
    print(f"model {result['row']} (recipe {result['method']}), device {result['device']}, "
          f"threads {result['threads']}: {', '.join(result['optimizers'])} over {result['tensors']} tensors, "
          f"{result['parameters']:,} parameters")
    s = result["seconds_per_update"]
    print(f"seconds per update: fused {s['fused']:.4f}, per-tensor {s['per_tensor']:.4f}, "
          f"ratio fused/per-tensor {result['ratio']:.3f}")
    print(f"largest parameter difference after {1 + result['steps'] * result['repeats']} updates: "
          f"{result['max_abs_parameter_difference']:.2e}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="warmup", help="a row of `models` or `selftrained` (default warmup)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats) < 1:
        parser.error("--steps and --repeats must be >= 1")
    result = measure(args.model, args.steps, args.repeats)
    print_table(result)
    if args.out:
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
