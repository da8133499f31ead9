"""Multi-process training (lib.train.distributed) on CPU with gloo.

Two processes with batch B must train what one process with batch 2B trains: the same draws, the
same weights (a model without BatchNorm or dropout, a loss that sums over pixels, so the mean of the
two processes' gradients is the gradient of the doubled batch).  Rank 0 alone writes; a checkpoint
of two processes resumes exactly in two and in one with the doubled batch; a stage with
``processes: 2`` relaunches itself under torchrun; bad launch keys are one line.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from torch import nn

from lib.config import parse
from lib.data.streams import DataParams, training_stream
from lib.errors import ConfigError
from lib.methods.base import Method
from lib.models.files import load_checked
from lib.models.output import SegOutput
from lib.table import find_training_row
from lib.train import distributed
from lib.train.checkpoint import STATE_FILE, training_identity
from lib.train.loop import TrainParams, train
from lib.train.optim import OptimizerParams, ScheduleParams
from lib.train.stage import run_training_stage
from tests.layouts import prepare_gta_and_cityscapes
from tests.tables import ensure_scratch, one_row

ROOT = Path(__file__).resolve().parents[1]
ITERS, BATCH = 4, 2          # per process; the single-process reference uses 2 * BATCH
CRASH_AT = 3                 # the interrupted two-process run stops here; its checkpoint is at 2


class TinyNet(nn.Module):
    """Two convolutions at full resolution: no BatchNorm, no dropout."""

    def __init__(self, num_classes: int = 19):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(6, num_classes, 1)

    def forward(self, x):
        return SegOutput(self.head(self.body(x)))

    def backbone_parameters(self):
        return list(self.body.parameters())

    def head_parameters(self):
        return list(self.head.parameters())


class Interrupted(Exception):
    pass


class PixelSum(Method):
    """Cross-entropy summed over the pixels that are not ignored, divided by all pixels: a sum over
    samples, so halves of a batch average to the whole batch.  Records the draws it is given."""

    def __init__(self, model, crash_at: int | None = None):
        super().__init__(model, None)
        self.crash_at, self.draws = crash_at, []

    def training_step(self, batch, it):
        if it == self.crash_at:
            raise Interrupted
        source = batch["source"]
        self.draws.append(source["draw"].tolist())
        loss = F.cross_entropy(self.model(source["image"]).logits, source["label"], ignore_index=255,
                               reduction="sum") / source["label"].numel()
        loss.backward()
        return {"seg": loss.detach()}


def train_tiny(run_dir: Path, batch_size: int, processes: int, crash_at: int | None = None) -> PixelSum:
    """``ITERS`` iterations on the prepared 'gta' dataset of the current directory."""
    torch.manual_seed(0)
    method = PixelSum(TinyNet(), crash_at)
    stream = training_stream("gta", DataParams(batch_size=batch_size, crop=(8, 8), workers=0), "imagenet",
                             seed=5, labelled=True)
    params = TrainParams(iters=ITERS, checkpoint_every=2, log_every=1, precision="fp32", processes=processes)
    train(method, {"source": stream}, params, {"model": OptimizerParams(lr=0.05)}, ScheduleParams(power=0.9),
          run_dir / "ckpt", run_dir / "live", fingerprint="tiny")
    return method


def worker(rank: int, port: int, project: Path) -> None:
    """One of two gloo processes: the collectives' edge cases, a full run with a run folder per rank
    (so rank 1 writing anything would show), then a run sharing one folder, interrupted (its folder
    copied for the one-process resume) and resumed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    os.chdir(project)
    distributed.start(TrainParams(iters=1, processes=2), "test")
    results = project / "results"

    a, b, c = (nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), 2.0) if rank == 0 else None      # only rank 0's data reached a
    c.grad = torch.full((3,), float(rank + 1))
    distributed.average_gradients([a, b, c])
    buffers = [torch.full((2,), float(rank), dtype=torch.float64), torch.tensor([rank == 0, rank == 1])]
    distributed.broadcast_from_main(buffers)
    losses = distributed.average_losses({"seg": float(rank), **({"con": 4.0} if rank == 0 else {})})

    method = train_tiny(project / "runs/own" / f"rank{rank}", BATCH, processes=2)
    try:
        train_tiny(project / "runs/shared", BATCH, processes=2, crash_at=CRASH_AT)
    except Interrupted:
        pass
    if rank == 0:
        shutil.copytree(project / "runs/shared", project / "runs/interrupted")
    distributed.barrier()
    resumed = train_tiny(project / "runs/shared", BATCH, processes=2)
    torch.save({"grads": [a.grad, b.grad, c.grad], "buffers": buffers, "losses": losses, "draws": method.draws,
                "weights": method.model.state_dict(), "resumed_draws": resumed.draws,
                "resumed_weights": resumed.model.state_dict()}, results / f"rank{rank}.pt")
    distributed.barrier()   # neither process tears its gloo pairs down while the other still uses them


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return prepare_gta_and_cityscapes(tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def two_processes(project) -> list[dict]:
    (project / "results").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")          # inherited by the spawned workers
        mp.spawn(worker, args=(free_port(), project), nprocs=2, join=True)
    return [torch.load(project / "results" / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def one_process(project) -> PixelSum:
    """The reference: one process, the doubled batch."""
    with contextlib.chdir(project):
        return train_tiny(project / "runs/single", 2 * BATCH, processes=1)


def assert_close(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------- the collectives


def test_gradients_none_somewhere_count_as_zero_and_none_everywhere_stays_none(two_processes):
    for result in two_processes:
        a, b, c = result["grads"]
        assert torch.equal(a, torch.full((3,), 1.0)) and b is None and torch.equal(c, torch.full((3,), 1.5))


def test_buffers_follow_rank_0_and_losses_average_by_name(two_processes):
    for result in two_processes:
        assert torch.equal(result["buffers"][0], torch.zeros(2, dtype=torch.float64))
        assert result["buffers"][1].tolist() == [True, False]
        assert result["losses"] == {"seg": 0.5, "con": 4.0}


# ---------------------------------------------------------------- the training loop


def test_two_processes_train_what_one_process_trains_with_the_doubled_batch(two_processes, one_process):
    ranks = [r["draws"] for r in two_processes]
    global_batch = 2 * BATCH
    assert one_process.draws == [list(range(global_batch * t, global_batch * (t + 1))) for t in range(ITERS)]
    for t in range(ITERS):
        assert ranks[0][t] + ranks[1][t] == one_process.draws[t]       # rank r: slice [r*B, (r+1)*B)
    for name, value in two_processes[0]["weights"].items():
        assert torch.equal(value, two_processes[1]["weights"][name]), name   # the ranks stay identical
    assert_close(two_processes[0]["weights"], one_process.model.state_dict())
    assert not torch.equal(two_processes[0]["weights"]["head.weight"], TinyNet().head.weight)   # it trained


def test_rank_0_alone_writes(two_processes, project):
    own = project / "runs/own"
    assert (own / "rank0/ckpt" / STATE_FILE).is_file()
    assert (own / "rank0/live/metrics.json").is_file()
    assert not (own / "rank1").exists()


def test_a_two_process_run_resumes_exactly(two_processes):
    for result in two_processes:
        assert result["resumed_draws"] == result["draws"][2:]
        for name, value in result["resumed_weights"].items():
            assert torch.equal(value, two_processes[0]["weights"][name]), name


def test_a_two_process_checkpoint_resumes_in_one_process(two_processes, one_process, project):
    interrupted = project / "runs/interrupted"
    state = load_checked(interrupted / "ckpt" / STATE_FILE, "training checkpoint")
    assert state["iteration"] == 2 and state["world_size"] == 2 and len(state["rng_ranks"]) == 1
    with contextlib.chdir(project):
        resumed = train_tiny(interrupted, 2 * BATCH, processes=1)     # same global batch: the same fingerprint
    assert resumed.draws == one_process.draws[2:]                   # the data continues at global draw 8
    assert_close(resumed.model.state_dict(), one_process.model.state_dict())


def test_sync_bn_converts_the_batchnorm_layers_that_use_batch_statistics():
    from lib.models import ModelParams, build_model
    for bn, converted in (("batch", True), ("frozen", False)):
        model = build_model(ModelParams(depth=18, bn=bn, extra_bn=True), 19).eval()
        keys = list(model.state_dict())
        distributed.sync_batchnorm([model])
        assert model.training and list(model.state_dict()) == keys
        backbone = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert all(isinstance(m, nn.SyncBatchNorm) == converted for m in backbone)
        assert isinstance(model.extra_bn, nn.SyncBatchNorm)        # a head BatchNorm always trains
        model.eval().train()
        assert all(m.training == converted for m in backbone)       # frozen layers stay in eval mode


def test_the_fingerprint_counts_the_global_batch_not_the_processes():
    def seen(batch: int, processes: int, target_batch: int | None = None) -> dict:
        raw = {"data": {"batch_size": batch}, "train": {"iters": 5, "processes": processes, "backend": "gloo"}}
        if target_batch is not None:
            raw["target_data"] = {"batch_size": target_batch}
        return training_identity(raw, DataParams(batch_size=batch), TrainParams(iters=5, processes=processes))

    assert seen(2, 2) == seen(4, 1) == {"data": {"batch_size": 4}, "train": {"iters": 5}}
    assert seen(2, 2, target_batch=1) == seen(4, 1, target_batch=2)
    assert seen(2, 2) != seen(2, 1)         # another global batch: another configuration


# ---------------------------------------------------------------- params and launching


@pytest.mark.parametrize("train_raw, message", [
    ({"processes": 0}, "recipes.source_only.train.processes must be > 0, got 0"),
    ({"backend": "mpi"}, "recipes.source_only.train.backend = 'mpi' is not one of"),
    ({"processes": "two"}, "recipes.source_only.train.processes must be of type int"),
])
def test_bad_launch_keys_are_one_line(train_raw, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse(TrainParams, {"iters": 2, **train_raw}, "recipes.source_only.train")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusals")
@pytest.mark.parametrize("train_raw, message", [
    ({"processes": 2, "sync_bn": True}, "warmup.train.sync_bn needs CUDA"),
    ({"processes": 2, "backend": "nccl"}, "warmup.train.backend 'nccl' needs CUDA"),
])
def test_launches_this_machine_cannot_make_are_one_line(train_raw, message):
    with pytest.raises(ConfigError, match=message) as err:
        distributed.start(TrainParams(iters=2, **train_raw), "warmup")
    assert "\n" not in str(err.value)


def test_a_torchrun_world_other_than_processes_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="processes is 2 but torchrun started 4 processes"):
        distributed.start(TrainParams(iters=2, processes=2), "warmup")


def warmup_params(**train) -> dict:
    """The table of one row, ``warmup``: source-only from scratch on gta."""
    return one_row("warmup", "source_only", {
        "model": {"arch": "deeplabv2", "depth": 18, "bn": "frozen", "aux": False},
        "data": {"batch_size": 1, "crop": [8, 16], "workers": 0},
        "optim": {"model": {"lr": 1.0e-3}},
        "train": {"iters": 2, "checkpoint_every": 1, "log_every": 1, "precision": "fp32", **train}},
        source="gta")


def run_stage(project: Path, params: dict, name: str = "warmup") -> subprocess.CompletedProcess:
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    ensure_scratch(project)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stages.train", name], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_stage_asking_for_two_processes_runs_under_torchrun(project):
    res = run_stage(project, warmup_params(processes=2))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("wrote data/models/warmup") == 1        # rank 1 prints nothing
    assert json.loads((project / "data/models/warmup/meta.json").read_text())["world_size"] == 2
    assert (project / "metrics/train/warmup/plots/metrics/train/loss/seg.tsv").is_file()
    assert json.loads((project / "data/checkpoints/warmup/finished.json").read_text())["iterations"] == 2


def test_two_processes_select_a_checkpoint_and_publish_it_once(project):
    """Rank 0 scores the model; the other rank trains beside it and publishes nothing."""
    params = warmup_params(processes=2)
    params["recipes"]["source_only"]["select"] = {"every": 1, "domain": "source", "split": "train", "images": 2,
                                                  "batch_size": 1}
    res = run_stage(project, params)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("wrote data/models/warmup") == 1
    best = json.loads((project / "data/models/warmup/best/meta.json").read_text())
    assert best["iteration"] in (1, 2) and best["world_size"] == 2


def test_failing_workers_end_the_stage_with_their_exit_code_and_one_line(monkeypatch, capsys):
    launched = []

    class Torchrun:
        def __init__(self, command):
            launched.append(command)

        def wait(self):
            return 1

    monkeypatch.setattr(distributed.subprocess, "Popen", Torchrun)
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", SimpleNamespace(name="stages.train"))
    monkeypatch.setattr(sys, "argv", ["/project/stages/train.py", "ctl"])
    with pytest.raises(SystemExit) as ended:
        distributed.start(TrainParams(iters=2, processes=3), "ctl")
    assert ended.value.code == 1
    assert launched == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                         "-m", "stages.train", "ctl"]]
    assert capsys.readouterr().err.strip() == ("error: ctl: the 3 torchrun workers failed (exit code 1); "
                                               "their errors are above")


def test_run_training_stage_in_process_refuses_to_relaunch(project, monkeypatch):
    monkeypatch.chdir(project)
    ensure_scratch()
    with pytest.raises(ConfigError, match=r"processes = 2 needs the stage to run as `python -m stages.<name>`"):
        run_training_stage(find_training_row(warmup_params(processes=2), "warmup"))


# ---------------------------------------------------------------- CPSL's memories under two processes
QUEUE_BATCH, QUEUE_PIXELS = 4, 5          # the global batch and the pixels sampled per image


def cpsl_memories(images: slice, steps: int = 3) -> dict:
    """CPSL stage 1's self-labelling on ``images`` of a fixed global batch for ``steps`` iterations:
    the memories (12 rows: they fill and wrap) and each step's loss."""
    from lib.methods.cpsl_stage1 import CpslStage1, CpslStage1Params
    torch.manual_seed(0)
    k, d = 4, 6
    method = CpslStage1(nn.Conv2d(3, 3, 1), CpslStage1Params(queue_length=12, samples_per_image=QUEUE_PIXELS),
                        torch.randn(k, d), torch.full((k,), 1 / k), ((0, 0, 0), (1, 1, 1)))
    losses = []
    for step in range(steps):
        data = torch.Generator().manual_seed(step)
        f_bar = torch.randn(QUEUE_BATCH, d, 3, 4, generator=data)
        o_bar = torch.randn(QUEUE_BATCH, k, 3, 4, generator=data)
        labels = torch.randint(0, k, (QUEUE_BATCH, 3, 4), generator=data)
        loss = method._self_labelling(f_bar[images], o_bar[images], labels[images], torch.Generator().manual_seed(9))
        loss.backward()
        losses.append(loss.detach())
    memories = method.prototypes
    return {"features": memories.features.data, "labels": memories.labels.data, "logits": memories.logits.data,
            "losses": torch.stack(losses), "grad": memories.weight.grad}


def queue_worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.start(TrainParams(iters=1, processes=2), "test")
    half = QUEUE_BATCH // 2
    torch.save(cpsl_memories(slice(rank * half, (rank + 1) * half)), out / f"queue{rank}.pt")
    distributed.barrier()   # neither process tears its gloo pairs down while the other still uses them


def test_cpsl_memories_take_every_process_pixels_as_one_process_with_the_whole_batch(tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        mp.spawn(queue_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"queue{r}.pt", weights_only=True) for r in range(2)]
    whole = cpsl_memories(slice(0, QUEUE_BATCH))
    for rank in ranks:
        for name in ("features", "labels", "logits"):
            torch.testing.assert_close(rank[name], whole[name], rtol=0, atol=0, msg=name)
    # each process's loss is the mean over its images; the processes' mean is the whole batch's
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, whole["losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((ranks[0]["grad"] + ranks[1]["grad"]) / 2, whole["grad"], rtol=1e-5, atol=1e-6)
