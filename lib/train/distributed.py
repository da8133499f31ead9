"""Multi-process training through torch.distributed, launched by torchrun (docs/methods/engine.md,
"Multi-process training under torchrun").

A training stage asks for N processes with ``<stage>.train.processes: N`` (``TrainParams``).  Its
DVC command stays ``python -m stages.<name> ...``: once the stage has checked its params, with N > 1
outside torchrun it runs itself again as ``python -m torch.distributed.run --standalone
--nproc_per_node N -m stages.<name> ...`` and ends with the workers' exit code (:func:`start`).  Each
worker joins the process group (``backend: auto`` is nccl on CUDA, one GPU per worker, and gloo on
CPU) and runs the same stage; ``processes`` is the world size, so a hand-made multi-node torchrun
launch sets it to the total number of processes.

Gradients.  A method calls ``backward`` itself, several times per step for the adversarial ones, on
modules it keeps in its own attributes (model, discriminators, EMA teachers); wrapping those in
``DistributedDataParallel`` would make every method hand its modules over and take them back.  The
engine instead averages, after ``method.training_step`` and before any optimizer steps, the gradient
of every parameter an optimizer trains with ``all_reduce`` over flattened buckets (DDP's reducer,
run once after all the backward passes instead of during them: :func:`average_gradients`).  An
optimizer step reads nothing but the accumulated ``.grad``, so this is right for every method
whatever the number and order of its backward passes: all processes step from the same weights with
the same gradient and stay identical.  A gradient that is None on some processes (a loss term only
their data produced) counts as zero there; one that is None on every process stays None, so every
optimizer skips that parameter as a single process would.  For losses that are means over the batch
the averaged gradient is that of the mean over the global batch (N x ``batch_size`` samples); a loss
normalised by a data-dependent count (cross-entropy over the pixels not ignored) is weighted per
process instead, as under DDP.

Everything else follows DDP's defaults.  Buffers (BatchNorm running statistics, memory queues, image
pools, EMA prototypes) are broadcast from rank 0 after every step, so all processes hold rank 0's and
its one checkpoint is the whole state.  Batch statistics are per process: BatchNorm's (unless
``sync_bn``) and a method's per-batch quantities (CISS's pseudo-label weight, contrastive negatives).

Data.  Rank r of N, with per-process batch B, reads at iteration t exactly the draws a single process
with batch N*B reads there, slice [r*B, (r+1)*B) (``lib.data.dataset.infinite_batches``), so N
processes see the data of one process with the N-times batch.

Random numbers.  Rank 0 keeps the single-process global RNG stream; rank r > 0 reseeds from (seed, r)
(:func:`rank_seed`), so the random choices the methods draw from it (CutMix boxes, strong views,
sampled anchors) differ between processes as they differ between samples.  Checkpoints keep every
rank's RNG state, so a resume with the same number of processes is exact.

SyncBN.  ``sync_bn: true`` turns the BatchNorm layers that normalise with batch statistics (not the
``frozen`` ones, which stay in eval mode) into ``nn.SyncBatchNorm``.  It needs CUDA (SyncBatchNorm has
no CPU implementation: asking for it on CPU is a one-line ConfigError), and every process must run the
same forward passes, which the methods here do (their random choices change values, not the number of
forwards).  With one process it does nothing.

Rank 0 alone writes: checkpoints, the model artifact, DVCLive curves, the progress bar, printed notes.
The other ranks' standard output is discarded; their errors still reach standard error.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lib.errors import ConfigError

if TYPE_CHECKING:
    from lib.train.loop import TrainParams

BUCKET_BYTES = 25 * 2**20      # DDP's default bucket size
_RANK_SEED_TAG = 3             # keeps the ranks' seeds apart from the data streams' (seed, ...) tags


# ---------------------------------------------------------------------------------------------
# where this process stands


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes outputs."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "LOCAL_RANK" in os.environ


def rank_seed(seed: int, of_rank: int) -> int:
    """The global RNG seed of rank ``of_rank`` > 0 (rank 0 uses ``seed`` itself)."""
    return int(np.random.SeedSequence([seed, of_rank, _RANK_SEED_TAG]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# launching


def backend_of(train: TrainParams) -> str:
    if train.backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return train.backend


def check(train: TrainParams, where: str) -> None:
    """The launch keys against this machine: one ConfigError line, before any work starts."""
    if under_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) != train.processes:
        raise ConfigError(f"params: {where}.train.processes is {train.processes} but torchrun started "
                          f"{os.environ.get('WORLD_SIZE')} processes (set them equal, or run the stage plainly)")
    if train.processes == 1:
        return
    cuda = torch.cuda.is_available()
    if backend_of(train) == "nccl" and not cuda:
        raise ConfigError(f"params: {where}.train.backend 'nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
    if train.sync_bn and not cuda:
        raise ConfigError(f"params: {where}.train.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation); "
                          "set it to false")
    on_this_machine = int(os.environ.get("LOCAL_WORLD_SIZE", train.processes))   # torchrun: this node's share
    if cuda and on_this_machine > torch.cuda.device_count():
        raise ConfigError(f"params: {where}.train.processes asks for {on_this_machine} processes on this machine, "
                          f"which shows {torch.cuda.device_count()} GPU(s): one process per GPU")


def start(train: TrainParams, where: str) -> None:
    """Called by a training stage once its params are checked, before its work.

    Inside torchrun: join the process group (left again at exit).  Outside torchrun with
    ``processes`` > 1: run this stage under torchrun and end this process with the workers' exit code.
    """
    check(train, where)
    if under_torchrun():
        _join(backend_of(train))
    elif train.processes > 1:
        raise SystemExit(_relaunch(train.processes, where))


def _relaunch(processes: int, where: str) -> int:
    main = sys.modules["__main__"]
    module = getattr(getattr(main, "__spec__", None), "name", None) or ""
    if not module.startswith("stages."):
        raise ConfigError(f"params: {where}.train.processes = {processes} needs the stage to run as "
                          "`python -m stages.<name>` (which relaunches itself under torchrun) or under torchrun")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", module, *sys.argv[1:]]
    child = subprocess.Popen(command)
    # a signal to this process (dvc's Ctrl-C, a kill) reaches the workers through torchrun
    forward = {s: signal.signal(s, lambda number, _: child.send_signal(number))
               for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in forward.items():
            signal.signal(s, handler)
    if code != 0:
        print(f"error: {where}: the {processes} torchrun workers failed (exit code {code}); "
              "their errors are above", file=sys.stderr)
    return code


def _join(backend: str) -> None:
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    atexit.register(cleanup)
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")   # rank 0 speaks for all; errors still go to stderr


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# what the engine synchronises


def trained_parameters(optimizers: Iterable[torch.optim.Optimizer]) -> list[nn.Parameter]:
    """Every parameter some optimizer steps, once each, in the same order on every rank."""
    seen, params = set(), []
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


@torch.no_grad()
def average_gradients(params: list[nn.Parameter]) -> None:
    """Replace each gradient by its mean over the processes (see the module docstring)."""
    world = world_size()
    if world == 1 or not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    grads = []
    for p, anywhere in zip(params, present.tolist()):
        if anywhere:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        _unflatten(flat, bucket)


@torch.no_grad()
def broadcast_from_main(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` (parameters, buffers) on every rank with rank 0's."""
    if world_size() == 1:
        return
    for bucket in _buckets([t for t in tensors if t.numel() > 0]):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        wire = flat.view(torch.uint8) if flat.dtype == torch.bool else flat   # gloo has no bool
        dist.broadcast(wire, src=0)
        _unflatten(flat, bucket)


def average_losses(values: dict[str, float]) -> dict[str, float]:
    """Each loss's mean over the processes that report it (the same dict on every rank).

    By name, since a method may leave a term out on some processes (CPSL's contrast on a mixed
    batch); a NaN anywhere is a NaN everywhere, so every rank's guard stops at the same iteration.
    """
    if world_size() == 1:
        return values
    gathered: list[dict[str, float]] = [{} for _ in range(world_size())]
    dist.all_gather_object(gathered, values)
    names = list(dict.fromkeys(name for part in gathered for name in part))
    return {name: float(np.mean([part[name] for part in gathered if name in part])) for name in names}


def all_gather_cat(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor concatenated over the processes along dim 0, in rank order (the order of the
    global batch: rank r reads the r-th run of every global batch, lib.data.dataset); every rank
    must pass tensors of the same shapes.  Unchanged in one process."""
    if world_size() == 1:
        return list(tensors)
    out = []
    for tensor in tensors:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        out.append(torch.cat(parts))
    return out


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def sync_batchnorm(modules: Iterable[nn.Module]) -> None:
    """Put ``modules`` in training mode and turn, in place, every BatchNorm layer that is then in
    training mode into SyncBatchNorm (the ``frozen`` ones, which stay in eval mode, are kept)."""
    for module in modules:
        module.train()
        targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
                   if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.training]
        for parent, name, child in targets:
            setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """The tensors grouped by dtype and device (in order of first appearance, so the same on every
    rank), each group cut into runs of at most ``BUCKET_BYTES`` (or one larger tensor)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > BUCKET_BYTES:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            yield bucket


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view(t.shape))
