"""The one training loop every method plugs into.

Read top to bottom: pick the device, build the optimizers and schedules from the method's
parameter groups, resume from the newest checkpoint if it was made by the same configuration,
then iterate: batch -> ``method.training_step`` under autocast -> NaN guard -> optimizer and
schedule steps -> ``method.after_step`` -> logging and periodic checkpoints.

Resume is exact on CPU: a batch depends only on (dataset seed, draw number) (lib.data.dataset),
the stream restarts at draw ``it * batch_size``, and the checkpoint carries every module,
optimizer, scheduler and global RNG state.  A resumed run therefore ends with the same weights as
an uninterrupted one.

With ``processes`` > 1 the same loop runs in every torchrun worker (lib.train.distributed): each
reads its slice of the global batch, gradients are averaged before the optimizers step, buffers
follow rank 0's, and rank 0 alone logs and writes checkpoints.  The stream restarts at global draw
``it * processes * batch_size``; the checkpoint's fingerprint counts the global batch, not the
number of processes, so a run can be resumed by another number of processes with the same global
batch (lib.train.checkpoint.training_identity).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from dvclive import Live
from tqdm import tqdm

from lib import device as hardware
from lib.config import positive
from lib.data.streams import StreamFactory
from lib.errors import ConfigError
from lib.io import output_error
from lib.methods.base import Method
from lib.train import checkpoint, distributed
from lib.train.checkpoint import TrainingDiverged
from lib.train.optim import (
    OptimizerParams,
    ScheduleParams,
    build_optimizer,
    build_scheduler,
)
from lib.train.select import Selection


@dataclass(frozen=True)
class TrainParams:
    iters: int
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    precision: Literal["fp32", "bf16"] = "bf16"   # bf16 autocast where native (lib.device)
    channels_last: bool = True                      # CUDA only
    cudnn_benchmark: bool = False                   # faster, but not bit-reproducible
    processes: int = 1                              # > 1: the stage runs itself under torchrun (README)
    backend: Literal["auto", "nccl", "gloo"] = "auto"   # auto: nccl on CUDA, gloo on CPU
    sync_bn: bool = False                           # SyncBatchNorm across the processes (CUDA only)

    def validate(self, where: str) -> None:
        positive(self.iters, f"{where}.iters")
        positive(self.seed, f"{where}.seed", allow_zero=True)
        positive(self.processes, f"{where}.processes")
        positive(self.checkpoint_every, f"{where}.checkpoint_every")
        positive(self.log_every, f"{where}.log_every")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and key == "image":
                value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


def train(method: Method, streams: dict[str, StreamFactory], params: TrainParams,
          optim: dict[str, OptimizerParams], schedule: ScheduleParams,
          checkpoint_dir: str | Path, live_dir: str | Path | None, fingerprint: str, desc: str = "train",
          selection: Selection | None = None) -> None:
    """Train ``method`` for ``params.iters`` iterations, resuming from ``checkpoint_dir`` if possible.

    ``fingerprint`` identifies the configuration (params, inputs, code); a checkpoint made by another
    configuration is set aside.  ``selection`` (lib.train.select) scores the model on a validation
    split every ``select.every`` iterations on rank 0 and keeps the best.  DVCLive's training curves
    (and ``select/mIoU``) go to ``live_dir`` (by default
    ``checkpoint_dir/curves``, which lib.train.checkpoint.publish_model publishes with the model: a
    run that fails or is killed never touches the curves of the last finished one).
    """
    live_dir = Path(checkpoint_dir) / checkpoint.CURVES if live_dir is None else Path(live_dir)
    device = hardware.select_device()
    cuda = device.type == "cuda"
    channels_last = cuda and params.channels_last
    torch.backends.cudnn.benchmark = params.cudnn_benchmark
    modules = method.modules()
    frozen = method.frozen_modules()
    for module in [*modules.values(), *frozen.values()]:
        module.to(device)
        if channels_last:
            module.to(memory_format=torch.channels_last)
    for module in frozen.values():
        module.eval().requires_grad_(False)
    main, world = distributed.is_main(), distributed.world_size()
    if params.sync_bn and world > 1:
        distributed.sync_batchnorm(modules.values())
    if not main:
        seed_everything(distributed.rank_seed(params.seed, distributed.rank()))

    groups = method.param_groups()
    missing = sorted(set(groups) - set(optim))
    if missing:
        raise ConfigError(f"params: this method trains an optimizer '{missing[0]}' but 'optim' has no "
                          f"entry for it (entries: {', '.join(sorted(optim)) or 'none'})")
    optimizers = {name: build_optimizer(groups[name], optim[name]) for name in groups}
    schedulers = {name: build_scheduler(opt, params.iters, schedule) for name, opt in optimizers.items()}

    checkpoint_path = Path(checkpoint_dir) / checkpoint.STATE_FILE
    stateful = {"selection": selection} if selection is not None else {}
    start = checkpoint.resume(checkpoint_path, fingerprint, modules, optimizers, schedulers, stateful)
    distributed.broadcast_from_main([t for m in modules.values() for t in (*m.parameters(), *m.buffers())])
    synchronised = distributed.trained_parameters(optimizers.values())
    live = _open_live(live_dir, start) if main else None
    iterators = {name: streams[name](start) for name in method.streams}

    autocast = hardware.autocast(params.precision, device)
    for module in modules.values():
        module.train()
    window: dict[str, list[float]] = {}
    tick, images = time.perf_counter(), 0
    progress = tqdm(range(start, params.iters), initial=start, total=params.iters, desc=desc,
                    dynamic_ncols=True, mininterval=2.0, disable=not main)
    for it in progress:
        batch = {name: to_device(next(iterators[name]), device, channels_last) for name in method.streams}
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        with autocast:
            losses = method.training_step(batch, it)
        values = _check_finite(losses, it, checkpoint_path)
        distributed.average_gradients(synchronised)
        for opt in optimizers.values():
            opt.step()
        for sched in schedulers.values():
            sched.step()
        method.after_step(it)
        distributed.broadcast_from_main([b for m in modules.values() for b in m.buffers()])

        images += sum(len(b["image"]) for b in batch.values())
        for name, value in values.items():
            window.setdefault(name, []).append(value)
        done = it + 1
        if done % params.log_every == 0 or done == params.iters:
            elapsed = time.perf_counter() - tick
            means = {name: float(np.mean(v)) for name, v in window.items()}
            if main:
                _log(live, live_dir, done, means, optimizers, world * images / max(elapsed, 1e-9))
            progress.set_postfix({k: f"{v:.3f}" for k, v in means.items()}, refresh=False)
            window, tick, images = {}, time.perf_counter(), 0
        if selection is not None and selection.due(done):
            # every process checks (they hold the same weights, so they stop together), the main one scores
            checkpoint.check_finite(modules, checkpoint_path, it)     # a diverged model is never selected
            if main:
                score = selection.evaluate(done)
                _log_selection(live, live_dir, done, score)
                progress.write(f"{desc}: iteration {done}: validation mIoU {score:.2f} "
                               f"(best {selection.best_score:.2f} at {selection.best_iteration})")
        if done % params.checkpoint_every == 0 or done == params.iters:
            checkpoint.check_finite(modules, checkpoint_path, it)     # never keep or publish diverged weights
            checkpoint.save(checkpoint_path, fingerprint, done, modules, optimizers, schedulers, stateful)
    progress.close()
    if live is not None:
        try:
            live.end()
        except OSError as err:
            raise output_error(live_dir, err) from None


def _check_finite(losses: dict[str, torch.Tensor], it: int, checkpoint_path: Path) -> dict[str, float]:
    """One device sync per iteration: every loss must be finite before any optimizer steps.

    The values are averaged over the processes, so every rank stops at the same iteration."""
    names = list(losses)
    values = torch.stack([losses[n].detach().float().reshape(()) for n in names]).tolist()
    averaged = distributed.average_losses(dict(zip(names, values)))
    for name, value in averaged.items():
        if not math.isfinite(value):
            kept = (f"the last good checkpoint is kept in {checkpoint_path}" if checkpoint_path.is_file()
                    else "no checkpoint had been written yet")
            raise TrainingDiverged(f"iteration {it}: loss '{name}' is {value}; training stopped before the "
                                   f"update and {kept} (lower the learning rate or check the data)")
    return averaged


def _open_live(live_dir: Path, start: int) -> Live:
    """DVCLive, continuing the curves of a resumed run.

    Rows logged after the checkpoint being resumed (the part of a killed run that is replayed) are
    dropped first, so each step appears once.  ``dvcyaml=None``: the plots are declared in our
    dvc.yaml, DVCLive must not edit it.
    """
    resume = start > 0
    try:
        if resume:
            for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
                table = pd.read_csv(tsv, sep="\t")
                table[table["step"] <= start].to_csv(tsv, sep="\t", index=False)
        live = Live(str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None)
    except OSError as err:
        raise output_error(live_dir, err) from None
    live.step = start
    return live


def _log_selection(live: Live, live_dir: Path, step: int, score: float) -> None:
    try:
        live.step = step
        live.log_metric("select/mIoU", score)
    except OSError as err:
        raise output_error(live_dir, err) from None


def _log(live: Live, live_dir: Path, step: int, losses: dict[str, float], optimizers, images_per_s: float) -> None:
    """One row of the curves; a write that fails (a full disk) names the curves folder."""
    try:
        live.step = step
        for name, value in losses.items():
            live.log_metric(f"train/loss/{name}", value)
        for name, opt in optimizers.items():
            live.log_metric(f"train/lr/{name}", opt.param_groups[0]["lr"])
        live.log_metric("train/images_per_s", images_per_s)
        live.make_summary()
    except OSError as err:
        raise output_error(live_dir, err) from None
