"""The training engine: schedule values, parameter groups, exact resume, NaN guard, checkpoint safety."""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lib.config import parse
from lib.data.streams import DataParams
from lib.errors import ConfigError, DataError, OutputError
from lib.methods.base import Method, ParamGroup, available_methods, method_class
from lib.methods.source_only import SourceOnly, SourceOnlyParams
from lib.models.files import load_checked, save_atomic
from lib.models.output import SegOutput
from lib.train.checkpoint import (
    STATE_FILE,
    code_digest,
    training_identity,
    training_lock,
)
from lib.train.loop import TrainingDiverged, TrainParams, train
from lib.train.optim import (
    OptimizerParams,
    ScheduleParams,
    build_optimizer,
    build_scheduler,
    lr_factor,
    update_kernel,
)

ROOT = Path(__file__).resolve().parents[1]


class TinySeg(nn.Module):
    """A two-layer segmenter with the model interface (backbone/head split, SegOutput, dropout)."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop = nn.Dropout2d(0.2)
        self.head = nn.Conv2d(8, num_classes, 1)
        self.aux = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        f = self.backbone(x)
        return SegOutput(self.head(self.drop(f)), self.aux(f), {"layer4": f})

    def backbone_parameters(self):
        return list(self.backbone.parameters())

    def head_parameters(self):
        return list(self.head.parameters()) + list(self.aux.parameters())


def stream(seed: int):
    """Batch t depends only on (seed, t), like the real loaders; the factory starts at any t."""
    def factory(start: int):
        for t in itertools.count(start):
            g = torch.Generator().manual_seed(seed * 100_003 + t)
            image = torch.randn(2, 3, 8, 8, generator=g)
            label = (image[:, 0] > 0).long() + (image[:, 1] > 0.5).long()
            yield {"image": image, "label": label, "id": [f"{t}a", f"{t}b"], "draw": torch.tensor([t, t])}
    return factory


def run(tmp_path, iters: int, method_cls=SourceOnly, checkpoint_every: int = 3, fingerprint: str = "a",
        lr: float = 0.05) -> nn.Module:
    torch.manual_seed(0)
    method = method_cls(TinySeg(), SourceOnlyParams(aux_weight=0.4))
    params = TrainParams(iters=iters, checkpoint_every=checkpoint_every, log_every=2)
    train(method, {"source": stream(1)}, params, {"model": OptimizerParams(type="sgd", lr=lr)},
          ScheduleParams(power=0.9, warmup_iters=2), tmp_path / "ckpt", tmp_path / "live", fingerprint)
    return method.model


# ----------------------------------------------------------------------------------------------
# schedule and optimizer


def test_poly_values():
    s = ScheduleParams(power=0.9)
    assert lr_factor(0, 100, s) == 1.0
    assert lr_factor(50, 100, s) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(100, 100, s) == 0.0
    assert lr_factor(10, 100, ScheduleParams(power=0.0)) == 1.0


def test_warmup_values():
    s = ScheduleParams(power=1.0, warmup_iters=10, warmup_ratio=0.1)
    assert lr_factor(0, 100, s) == pytest.approx(0.1)
    assert lr_factor(5, 100, s) == pytest.approx((1 - 0.05) * (1 - 0.5 * 0.9))
    assert lr_factor(10, 100, s) == pytest.approx(0.9)      # warm-up over: poly alone


def test_cyclegan_constant_then_linear():
    s = ScheduleParams(power=1.0, constant_iters=100)
    assert [lr_factor(t, 200, s) for t in (0, 99, 100)] == [1.0, 1.0, 1.0]
    assert lr_factor(150, 200, s) == pytest.approx(0.5)
    assert lr_factor(200, 200, s) == 0.0


def test_advent_horizon_beyond_the_last_iteration():
    s = ScheduleParams(power=0.9, horizon=250000)
    assert lr_factor(120000, 120000, s) == pytest.approx((1 - 120000 / 250000) ** 0.9)   # ~0.555


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 500), st.floats(0.1, 2.0), st.integers(0, 50), st.floats(0.0, 1.0))
def test_factor_is_bounded_and_ends_at_zero(max_iters, power, warmup, ratio):
    s = ScheduleParams(power=power, warmup_iters=warmup, warmup_ratio=ratio)
    values = [lr_factor(t, max_iters, s) for t in range(max_iters + 1)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values[-1] == 0.0
    after = values[min(warmup, max_iters):]
    assert all(a >= b for a, b in zip(after, after[1:]))     # poly part never increases


def test_scheduler_applies_head_multiplier_and_schedule():
    model = TinySeg()
    opt = build_optimizer([ParamGroup(model.backbone_parameters()), ParamGroup(model.head_parameters(), head=True)],
                          OptimizerParams(type="sgd", lr=0.01, head_lr_mult=10))
    sched = build_scheduler(opt, 10, ScheduleParams(power=1.0))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.05])


def test_frozen_parameters_are_not_given_to_the_optimizer():
    model = TinySeg()
    model.backbone[1].weight.requires_grad_(False)
    opt = build_optimizer([ParamGroup(model.backbone_parameters())], OptimizerParams(type="adamw", lr=1e-3))
    given_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.backbone[1].weight) not in given_ids
    assert isinstance(opt, torch.optim.AdamW)


@pytest.mark.parametrize("optim", [OptimizerParams(type="adamw", lr=1e-2, weight_decay=0.01),
                                   OptimizerParams(type="adam", lr=1e-2),
                                   OptimizerParams(type="sgd", lr=1e-2, momentum=0.9, nesterov=True,
                                                   weight_decay=5e-4)])
def test_fused_update_is_the_per_tensor_update(optim):
    """The engine's optimizers use PyTorch's fused kernel on CPU; the update is the per-tensor one."""
    models = [TinySeg(), TinySeg()]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer([ParamGroup(m.backbone_parameters()), ParamGroup(m.head_parameters(), head=True)],
                            optim, fused=fused) for m, fused in zip(models, (None, False))]
    assert opts[0].defaults["fused"] is True and not opts[1].defaults.get("fused")
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p0, p1 in zip(models[0].parameters(), models[1].parameters()):
            p0.grad = torch.randn(p0.shape, generator=generator)
            p1.grad = p0.grad.clone()
        for opt in opts:
            opt.step()
    for p0, p1 in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p0, p1, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(models[0].parameters(), TinySeg().parameters()))


def test_update_kernel_is_fused_only_for_float_parameters_on_supported_devices():
    assert update_kernel([nn.Parameter(torch.zeros(2))]) == {"fused": True}
    assert update_kernel([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))]) == {}
    assert update_kernel([]) == {}


def test_optimizer_params_validation():
    with pytest.raises(ConfigError, match="lr"):
        parse(OptimizerParams, {"lr": -1.0}, "recipes.source_only.optim.model")
    with pytest.raises(ConfigError, match="type"):
        parse(OptimizerParams, {"type": "rmsprop"}, "recipes.source_only.optim.model")
    with pytest.raises(ConfigError, match="iters"):
        parse(TrainParams, {"iters": -5}, "recipes.source_only.train")


# ----------------------------------------------------------------------------------------------
# the loop


def test_training_lowers_the_loss(tmp_path):
    run(tmp_path, 30)
    table = pd.read_csv(tmp_path / "live/plots/metrics/train/loss/seg.tsv", sep="\t")
    assert table["seg"].iloc[-1] < table["seg"].iloc[0]
    assert list(table["step"]) == list(range(2, 31, 2))


def test_resume_equals_uninterrupted(tmp_path):
    """Stop at iteration 7 (last checkpoint at 6), resume to 12: identical to a straight run."""
    straight = run(tmp_path / "straight", 12)

    class Crash(SourceOnly):
        def training_step(self, batch, it):
            if it == 7:
                raise KeyboardInterrupt   # a kill between checkpoints
            return super().training_step(batch, it)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", 12, method_cls=Crash)
    state = load_checked(tmp_path / "resumed/ckpt" / STATE_FILE, "training checkpoint")
    assert state["iteration"] == 6
    resumed = run(tmp_path / "resumed", 12)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # the curves hold each step once, in order, after the replay
    table = pd.read_csv(tmp_path / "resumed/live/plots/metrics/train/loss/seg.tsv", sep="\t")
    assert list(table["step"]) == [2, 4, 6, 8, 10, 12]


def test_checkpoint_of_another_configuration_is_set_aside_and_taken_back(tmp_path, capsys):
    """A run of configuration b finds a's checkpoint: set aside, not resumed.  Back to a, it resumes."""
    class Crash(SourceOnly):
        def training_step(self, batch, it):
            if it == 4:
                raise KeyboardInterrupt
            return super().training_step(batch, it)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 8, method_cls=Crash, fingerprint="a" * 64)        # a's checkpoint at iteration 3
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, 8, method_cls=Crash, fingerprint="b" * 64)        # b starts from scratch
    out = capsys.readouterr().out
    assert "another configuration" in out and "resuming" not in out
    assert (tmp_path / "ckpt/set_aside" / f"{'a' * 16}.pt").is_file()
    straight = run(tmp_path / "straight", 8, fingerprint="a" * 64)
    resumed = run(tmp_path, 8, fingerprint="a" * 64)                   # takes a's back, sets b's aside
    assert "this configuration's own is taken back" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "ckpt/set_aside").iterdir()] == [f"{'b' * 16}.pt"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_keys_that_change_no_weight_keep_the_checkpoint():
    """Loader workers, checkpoint and log periods, processes and backend, the selection's loader and
    batch are out of the identity; what and when the selection scores is in."""
    raw = {"data": {"batch_size": 2, "workers": 2}, "target_data": {"workers": 2, "crop": [8, 8]},
           "train": {"iters": 5, "checkpoint_every": 1, "log_every": 1, "processes": 1, "backend": "gloo"},
           "method": {"ema": 0.9}, "select": {"every": 2, "images": 4, "workers": 2, "batch_size": 4}}
    other = {"data": {"batch_size": 2, "workers": 0}, "target_data": {"workers": 7, "crop": [8, 8]},
             "train": {"iters": 5, "checkpoint_every": 9, "log_every": 3}, "method": {"ema": 0.9},
             "select": {"every": 2, "images": 4, "workers": 0, "batch_size": 1}}
    data, train_params = DataParams(batch_size=2), TrainParams(iters=5)
    assert training_identity(raw, data, train_params) == training_identity(other, data, train_params)
    for changed in (dict(other, method={"ema": 0.99}), dict(other, select={"every": 3, "images": 4})):
        assert training_identity(changed, data, train_params) != training_identity(other, data, train_params)


def test_the_code_a_run_loaded_is_part_of_its_identity(tmp_path, monkeypatch):
    """A module of lib/ or stages/ edited between a kill and the resume makes another configuration."""
    (tmp_path / "lib").mkdir()
    module = tmp_path / "lib/edited_for_the_test.py"
    module.write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("lib_edited_for_the_test", module)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    monkeypatch.setitem(sys.modules, "lib_edited_for_the_test", loaded)
    before = code_digest(tmp_path)
    assert code_digest(tmp_path) == before
    module.write_text("VALUE = 1  # a comment\n")
    assert code_digest(tmp_path) != before


def test_diverged_weights_are_never_checkpointed_or_published(tmp_path):
    """The last update diverges (a finite loss, then inf weights): the run stops with one line and the
    last good checkpoint stays; before, the stage ended well and published the broken model."""
    class LastStepExplodes(SourceOnly):
        def after_step(self, it):
            if it == 5:
                with torch.no_grad():
                    self.model.head.weight.fill_(float("inf"))

    with pytest.raises(TrainingDiverged, match=r"iteration 5: model\.head\.weight holds non-finite values after "
                                               r"the update; training stopped and the last good checkpoint is kept"):
        run(tmp_path, 6, method_cls=LastStepExplodes)
    state = load_checked(tmp_path / "ckpt" / STATE_FILE, "training checkpoint")
    assert state["iteration"] == 3 and torch.isfinite(state["modules"]["model"]["head.weight"]).all()


def test_two_trainings_of_one_model_cannot_run_at_once(tmp_path):
    with training_lock(tmp_path / "ckpt", "train@m"):
        assert (tmp_path / "ckpt/.lock").read_text() == f"pid {os.getpid()}"
        holder = subprocess.run([sys.executable, "-c",
                                 "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path;"
                                 "from lib.train.checkpoint import training_lock;"
                                 "training_lock(Path(sys.argv[2]), 'train@m').__enter__()",
                                 str(ROOT), str(tmp_path / "ckpt")], capture_output=True, text=True)
        assert holder.returncode != 0 and f"ckpt: train@m is already being trained (pid {os.getpid()})" in holder.stderr
    assert not (tmp_path / "ckpt/.lock").exists()
    with training_lock(tmp_path / "ckpt", "train@m"):      # free again
        pass


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    class Diverges(SourceOnly):
        def training_step(self, batch, it):
            losses = super().training_step(batch, it)
            if it == 4:
                losses["seg"] = torch.tensor(float("nan"))
            return losses

    with pytest.raises(TrainingDiverged, match=r"iteration 4: loss 'seg' is nan.*last good checkpoint"):
        run(tmp_path, 10, method_cls=Diverges)
    state = load_checked(tmp_path / "ckpt" / STATE_FILE, "training checkpoint")
    assert state["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in state["modules"]["model"].values() if v.is_floating_point())


def test_missing_optimizer_entry_is_a_config_error(tmp_path):
    method = SourceOnly(TinySeg(), SourceOnlyParams())
    with pytest.raises(ConfigError, match="'model'"):
        train(method, {"source": stream(0)}, TrainParams(iters=2), {"disc": OptimizerParams()},
              ScheduleParams(), tmp_path / "c", tmp_path / "l", "x")


# ----------------------------------------------------------------------------------------------
# checkpoint files


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "meta": Payload()}, path)
    with pytest.raises(DataError, match="pickled Python objects"):
        load_checked(path, "model checkpoint")


def test_corrupt_and_missing_checkpoints(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="bad.pt: not a readable"):
        load_checked(path, "model checkpoint")
    with pytest.raises(DataError, match="not found"):
        load_checked(tmp_path / "none.pt", "model checkpoint")
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match="bad.pt"):
        load_checked(path, "model checkpoint")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    save_atomic({"a": torch.ones(1)}, path)

    def boom(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OutputError, match=r"x.pt: could not be written \(No space left on device\)"):
        save_atomic({"a": torch.zeros(1)}, path)
    assert torch.equal(load_checked(path, "x")["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


# ----------------------------------------------------------------------------------------------
# methods


def test_methods_are_found_by_module_name():
    assert "source_only" in available_methods()
    assert method_class("source_only") is SourceOnly
    with pytest.raises(ConfigError, match=r"recipe 'nope' names no method.*lib/methods/<name>\.py.*source_only"):
        method_class("nope")


def test_source_only_loss_is_ce_plus_weighted_aux():
    model = TinySeg()
    batch = next(stream(3)(0))
    losses = SourceOnly(model, SourceOnlyParams(aux_weight=0.4)).training_step({"source": batch}, 0)
    out = model(batch["image"])
    ce = nn.functional.cross_entropy
    assert not math.isclose(float(losses["seg"]), 0.0)
    # dropout makes the main output random: compare the deterministic auxiliary term exactly
    assert float(losses["seg_aux"]) == pytest.approx(0.4 * float(ce(out.aux_logits.detach(), batch["label"])), rel=1e-5)
    assert all(p.grad is not None for p in model.parameters())


def test_method_base_rejects_being_trained_directly():
    with pytest.raises(NotImplementedError):
        Method(TinySeg(), None).training_step({}, 0)
