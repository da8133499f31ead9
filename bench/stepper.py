"""Training steps of a method on one fixed in-memory batch: the model side of the benchmarks.

The body of an iteration is the engine's (``lib.train.loop.train``): zero the gradients, the method's
``training_step`` under autocast, every optimizer and schedule step, ``after_step``.  What the
engine adds around it (the loader, host-to-device copies, logging, checkpoints) is left out, so the
rate is what the model and method alone can consume; bench/train_overhead.py measures the rest.  The
losses are read back once per iteration, as the engine's NaN guard does.
"""
from __future__ import annotations

import contextlib
import time

import torch

from lib.methods.base import Method
from lib.train.loop import to_device
from lib.train.optim import (
    OptimizerParams,
    ScheduleParams,
    build_optimizer,
    build_scheduler,
)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_in(batch: dict[str, dict]) -> int:
    """Images of one iteration, counted as the engine counts them for ``train/images_per_s``."""
    return sum(len(b["image"]) for b in batch.values())


class FixedBatchTrainer:
    """``method`` set up as the engine sets it up (device, memory format, frozen modules, one
    optimizer and schedule per parameter group) and stepped on ``batch`` again and again.

    ``autocast``: the dtype of ``torch.autocast`` on ``device`` (None: fp32); the engine's rule for
    when it autocasts is lib.device.
    """

    def __init__(self, method: Method, batch: dict[str, dict], optim: dict[str, OptimizerParams],
                 schedule: ScheduleParams, device: torch.device, autocast: torch.dtype | None,
                 channels_last: bool, horizon: int = 10**6):
        self.method, self.device = method, torch.device(device)
        for module in [*method.modules().values(), *method.frozen_modules().values()]:
            module.to(self.device)
            if channels_last:
                module.to(memory_format=torch.channels_last)
        for module in method.frozen_modules().values():
            module.eval().requires_grad_(False)
        for module in method.modules().values():
            module.train()
        groups = method.param_groups()
        self.optimizers = [build_optimizer(groups[name], optim[name]) for name in groups]
        self.schedulers = [build_scheduler(opt, horizon, schedule) for opt in self.optimizers]
        self.batch = {name: to_device(b, self.device, channels_last) for name, b in batch.items()}
        self.images = images_in(self.batch)
        self.autocast = autocast
        self.it = 0

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _sync(self) -> None:
        synchronize(self.device)

    def step(self) -> dict[str, float]:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        with self._autocast():
            losses = self.method.training_step(self.batch, self.it)
        for opt in self.optimizers:
            opt.step()
        for sched in self.schedulers:
            sched.step()
        self.method.after_step(self.it)
        self.it += 1
        values = torch.stack([value.detach().float().reshape(()) for value in losses.values()]).tolist()
        return dict(zip(losses, values))

    def seconds_per_iter(self, iters: int) -> float:
        self._sync()
        start = time.perf_counter()
        for _ in range(iters):
            self.step()
        self._sync()
        return (time.perf_counter() - start) / iters

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_bytes(self) -> int | None:
        """Peak of ``torch.cuda.max_memory_allocated`` since the last reset; None off CUDA."""
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
