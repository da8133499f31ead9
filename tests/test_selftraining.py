"""The maths of CPSL's self-training (Li et al., CVPR 2022): Sinkhorn, rectification, EMA, KD, memories."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lib.data.classes import IGNORE
from lib.losses.clustering import (
    FifoQueue,
    consistency_kl,
    cosine_scores,
    prototype_weights,
    queue_contrast,
    rectify,
    self_labelling_loss,
    sinkhorn,
    symmetric_ce,
)
from lib.losses.distillation import kd_kl, kd_loss, kd_released
from lib.models.ema import ema_update


# ---------------------------------------------------------------- Sinkhorn
@settings(max_examples=30, deadline=None)
@given(b=st.integers(4, 64), k=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_sinkhorn_plan_has_the_prior_and_uniform_marginals(b, k, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, k, generator=g) * 2 - 1
    prior = torch.rand(k, generator=g) + 0.1
    prior = prior / prior.sum()
    q = sinkhorn(scores, prior, epsilon=0.5, iterations=500)
    plan = q / b                                   # the transport plan before the final x B
    assert torch.allclose(plan.sum(dim=1), torch.full((b,), 1.0 / b), atol=1e-6)   # columns: 1/B
    assert torch.allclose(plan.sum(dim=0), prior, atol=1e-4)                       # rows: r
    assert torch.allclose(q.sum(dim=1), torch.ones(b), atol=1e-5)


def test_sinkhorn_with_three_iterations_keeps_exact_pixel_marginals_and_moves_towards_r():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(256, 5, generator=g)
    scores[:, 0] += 1.0                                  # every pixel prefers class 0
    prior = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.2])
    q = sinkhorn(scores, prior, epsilon=0.05, iterations=3)
    assert torch.allclose(q.sum(dim=1), torch.ones(256), atol=1e-5)
    greedy = F.one_hot(scores.argmax(1), 5).float().mean(0)
    assert greedy[0] == 1.0
    assert (q.mean(0) - prior).abs().sum() < (greedy - prior).abs().sum() / 10


def test_sinkhorn_is_stable_for_large_scores():
    q = sinkhorn(torch.tensor([[100.0, -100.0], [90.0, 95.0]]), torch.tensor([0.5, 0.5]))
    assert torch.isfinite(q).all()


# ---------------------------------------------------------------- prototypes and rectification
def test_rectification_picks_the_class_both_agree_on():
    # 3 classes, one pixel; soft label prefers 0 slightly, prototypes say the feature is class 2
    protos = torch.eye(3)
    feature = torch.tensor([0.0, 0.1, 1.0]).reshape(1, 3, 1, 1)
    soft = torch.tensor([0.4, 0.25, 0.35]).reshape(1, 3, 1, 1)
    w = prototype_weights(feature, protos, temperature=0.08)
    assert rectify(soft, w).item() == 2
    # with a flat prototype weight the soft label decides
    assert rectify(soft, torch.full_like(w, 1 / 3)).item() == 0
    # a zero soft probability cannot win however close the prototype
    soft0 = torch.tensor([0.6, 0.4, 0.0]).reshape(1, 3, 1, 1)
    assert rectify(soft0, w).item() in (0, 1)


def test_rectification_threshold_ignores_unsure_pixels():
    soft = torch.tensor([0.5, 0.5]).reshape(1, 2, 1, 1)
    w = torch.tensor([0.5, 0.5]).reshape(1, 2, 1, 1)
    assert rectify(soft, w, threshold=0.6).item() == IGNORE
    assert rectify(soft, w, threshold=0.0).item() in (0, 1)


def test_cosine_scores_are_invariant_to_feature_scale():
    f = torch.randn(2, 4, 3, 3)
    c = torch.randn(5, 4)
    assert torch.allclose(cosine_scores(f, c), cosine_scores(7 * f, 0.5 * c), atol=1e-5)
    assert cosine_scores(f, c).abs().max() <= 1 + 1e-5


def test_self_labelling_loss_is_the_cross_entropy_to_the_targets():
    scores = torch.tensor([[0.2, -0.1], [0.0, 0.3]], requires_grad=True)
    q = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    tau = 0.5
    logp = F.log_softmax(scores / tau, 1)
    expected = -(q * logp).sum(1).mean()
    assert torch.allclose(self_labelling_loss(q, scores, tau), expected)


# ---------------------------------------------------------------- losses on target
def test_symmetric_ce_equals_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).t().reshape(1, 2, 1, 2)   # two pixels
    label = torch.tensor([[[0, IGNORE]]])
    p0 = math.exp(2) / (math.exp(2) + 1)
    ce = -math.log(p0)
    rce = -math.log(1e-4) * (1 - p0)
    assert symmetric_ce(logits, label).item() == pytest.approx(0.1 * ce + rce, rel=1e-5)


def test_symmetric_ce_of_an_all_ignored_label_is_zero_with_a_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = symmetric_ce(logits, torch.full((1, 2, 2), IGNORE))
    assert loss.item() == 0.0 and loss.requires_grad


def test_consistency_kl_is_zero_for_equal_assignments_and_masks_pixels():
    z = torch.softmax(torch.randn(2, 4, 3, 3), 1)
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    assert consistency_kl(z, z.log(), valid).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.softmax(torch.randn(2, 4, 3, 3), 1).log()
    full = consistency_kl(z, other, valid)
    per_pixel_kl = (z * (z.log() - other)).sum(1)
    assert full.item() == pytest.approx(per_pixel_kl.mean().item() / 4, rel=1e-5)   # divided by K
    valid[:, 0] = False
    assert consistency_kl(z, other, valid).item() == pytest.approx(
        per_pixel_kl[:, 1:].mean().item() / 4, rel=1e-5)


def test_queue_contrast_prefers_features_near_their_class():
    queue = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    queue_labels = torch.tensor([0, 0, 1, 1])
    near = F.normalize(torch.tensor([[1.0, 0.05]]), dim=1)
    far = F.normalize(torch.tensor([[0.05, 1.0]]), dim=1)
    label = torch.tensor([0])
    assert queue_contrast(near, label, queue, queue_labels, 0.08) < queue_contrast(far, label, queue, queue_labels, 0.08)
    # no positive in the queue -> no term
    assert queue_contrast(near, torch.tensor([5]), queue, queue_labels, 0.08).item() == 0.0


# ---------------------------------------------------------------- memory and EMA
def test_fifo_queue_keeps_the_newest_rows_first_and_reports_full():
    q = FifoQueue(5, 2)
    assert not q.full
    q.push(torch.tensor([[1.0, 1], [2, 2]]))
    q.push(torch.tensor([[3.0, 3], [4, 4]]))
    assert q.data[:, 0].tolist() == [3, 4, 1, 2, 0]
    assert not q.full
    q.push(torch.tensor([[5.0, 5], [6, 6]]))
    assert q.full
    assert q.data[:, 0].tolist() == [5, 6, 3, 4, 1]            # the oldest (2) dropped
    q.push(torch.arange(14.0).reshape(7, 2))                    # more rows than it holds
    assert q.data[:, 0].tolist() == [0, 2, 4, 6, 8]
    labels = FifoQueue(3, 0, torch.long)
    labels.push(torch.tensor([7, 8]))
    assert labels.data.tolist() == [7, 8, 0]
    restored = FifoQueue(5, 2)
    restored.load_state_dict(q.state_dict())
    assert torch.equal(restored.data, q.data)


def test_ema_update_averages_parameters_and_copies_buffers():
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        student.weight.fill_(2.0)
        teacher.weight.fill_(1.0)
        student.running_mean.fill_(5.0)
        student.num_batches_tracked.fill_(9)
    ema_update(teacher, student, momentum=0.9)
    assert torch.allclose(teacher.weight, torch.full((3,), 0.9 * 1 + 0.1 * 2))
    assert torch.equal(teacher.running_mean, student.running_mean)
    assert teacher.num_batches_tracked.item() == 9
    teacher.running_mean.zero_()
    ema_update(teacher, student, momentum=0.9, copy_buffers=False)
    assert torch.allclose(teacher.running_mean, torch.full((3,), 0.5))


def test_ema_with_momentum_zero_copies_and_one_freezes():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    before = [p.clone() for p in a.parameters()]
    ema_update(a, b, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), before))
    ema_update(a, b, 0.0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------- KD
def test_kd_released_on_hand_computed_values_is_negative():
    student = torch.tensor([0.0, 0.0]).reshape(1, 2, 1, 1)          # p = (0.5, 0.5)
    teacher = torch.log(torch.tensor([0.8, 0.2])).reshape(1, 2, 1, 1)
    t = np.array([0.8, 0.2])
    expected = (t * (np.log(t) - 0.5)).sum() / 2                     # mean over N K H W = 2 entries
    assert kd_released(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert expected < 0
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s, tt = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
        assert kd_released(s, tt).item() < 0


def test_kd_kl_on_hand_computed_values_and_zero_at_the_teacher():
    student = torch.tensor([0.0, 0.0]).reshape(1, 2, 1, 1)
    teacher = torch.log(torch.tensor([0.8, 0.2])).reshape(1, 2, 1, 1)
    t = np.array([0.8, 0.2])
    assert kd_kl(student, teacher).item() == pytest.approx((t * np.log(t / 0.5)).sum(), rel=1e-5)
    logits = torch.randn(2, 5, 4, 4)
    assert kd_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, torch.randn(2, 5, 4, 4), "kl").item() > 0
    with pytest.raises(ValueError, match="unknown KD form"):
        kd_loss(logits, logits, "mse")


def test_kd_released_gradient_raises_the_teachers_class():
    student = torch.zeros(1, 3, 1, 1, requires_grad=True)
    teacher = torch.tensor([3.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    kd_released(student, teacher).backward()
    # descending the gradient must increase the logit of the teacher's class
    assert student.grad[0, 0, 0, 0] < 0 and (student.grad[0, 1:] > 0).all()


# ---------------------------------------------------------------- the two methods, one step each
from lib.methods.cpsl_kd import CpslKd, CpslKdParams  # noqa: E402
from lib.methods.cpsl_stage1 import CpslStage1, CpslStage1Params  # noqa: E402
from lib.models import ModelParams, build_model  # noqa: E402
from lib.pseudo.stream import SOFT_GRID, soft_grid  # noqa: E402

C = 5
NORMALIZE = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def cpsl_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelParams(arch="deeplabv2", depth=18, aux=False, head="cpsl",
                                   head_width=32), C)


def chain_batch(seed: int = 0, soft: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    source = {"image": torch.randn(2, 3, 32, 64, generator=g), "label": torch.randint(0, C, (2, 32, 64), generator=g)}
    target = {"image": torch.randn(2, 3, 32, 64, generator=g),
              "pseudo": torch.randint(0, C, (2, 32, 64), generator=g)}
    if soft:      # as the loader hands it on: the stored map (logits' stride) and its sampling grid
        target["soft"] = torch.softmax(torch.randn(2, C, 5, 9, generator=g), 1).half()
        target[SOFT_GRID] = torch.from_numpy(soft_grid((32, 64), (5, 9), (5, 9))).permute(2, 0, 1).expand(2, 2, 32, 64)
    return {"source": source, "target": target}


def test_cpsl_stage1_step_trains_student_and_prototypes_and_moves_the_teacher():
    model = cpsl_model()
    params = CpslStage1Params(queue_length=64, samples_per_image=16, ema=0.5, cutmix_p=0.0)
    method = CpslStage1(model, params, torch.randn(C, 32), torch.full((C,), 1 / C), NORMALIZE)
    for m in method.modules().values():
        m.train()
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    losses = method.training_step(chain_batch(), 0)
    assert set(losses) == {"src", "sce", "cons", "sl"}                       # no L_con before the queue is full
    assert all(torch.isfinite(v) for v in losses.values())
    assert method.prototypes.weight.grad is not None and method.prototypes.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    method.after_step(0)
    moved = [not torch.equal(a, b) for a, b in zip(teacher_before, method.teacher.parameters())]
    assert all(moved)
    # the queues filled with 16 rows per image
    assert (method.prototypes.features.data.abs().sum(1) > 0).sum() == 32


def test_cpsl_self_labelling_loss_reaches_only_the_prototypes():
    model = cpsl_model()
    method = CpslStage1(model, CpslStage1Params(queue_length=64, samples_per_image=8), torch.randn(C, 32),
                        torch.full((C,), 1 / C), NORMALIZE)
    with torch.no_grad():
        out = method.teacher(torch.randn(2, 3, 32, 64))
    rng = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, *out.logits.shape[-2:], dtype=torch.long)
    loss = method._self_labelling(out.features["embedding"], out.logits, labels, rng)
    loss.backward()
    assert method.prototypes.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_cpsl_stage1_with_a_full_queue_adds_the_contrast_term():
    model = cpsl_model()
    method = CpslStage1(model, CpslStage1Params(queue_length=16, samples_per_image=16, cutmix_p=0.0),
                        torch.randn(C, 32), torch.full((C,), 1 / C), NORMALIZE)
    method.training_step(chain_batch(0), 0)
    assert method.prototypes.features.full
    losses = method.training_step(chain_batch(1), 1)
    assert "con" in losses and torch.isfinite(losses["con"])


def test_cpsl_kd_step_leaves_the_teacher_untouched():
    student, teacher = cpsl_model(0), cpsl_model(1).eval().requires_grad_(False)
    method = CpslKd(student, CpslKdParams(), teacher, NORMALIZE)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = method.training_step(chain_batch(soft=False), 0)
    assert set(losses) == {"src", "pl", "kd"} and losses["kd"] < 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(p.grad is not None for p in student.parameters())
    # the control: no pseudo-label and no KD term, only the source and the target's BN statistics
    control = CpslKd(cpsl_model(0), CpslKdParams(kd_weight=0.0, pl_weight=0.0), teacher, NORMALIZE)
    assert set(control.training_step(chain_batch(soft=False), 0)) == {"src"}


def test_cpsl_stage1_on_an_aspp_model_clusters_layer4_and_checks_the_prototype_width():
    """Under ASPP sum the embedding is layer4 (OUR CHOICE, lib/models/deeplabv2.py): stage 1 trains on it,
    and prototypes of another width are refused before any training."""
    from types import SimpleNamespace

    from lib.errors import ConfigError
    from lib.methods.base import StageContext
    torch.manual_seed(0)
    model = build_model(ModelParams(arch="deeplabv2", depth=18, aux=False, head="aspp_sum"), C)
    assert model.embedding_channels == 512 and cpsl_model().embedding_channels == 32
    pseudo = SimpleNamespace(form="soft", prototypes=torch.randn(C, 512), prior=torch.full((C,), 1 / C))
    params = CpslStage1Params(queue_length=64, samples_per_image=16, ema=0.5, cutmix_p=0.0)
    method = CpslStage1.build(model, params, StageContext(num_classes=C, pseudo=pseudo, normalize=NORMALIZE))
    for m in method.modules().values():
        m.train()
    losses = method.training_step(chain_batch(), 0)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["sl"] > 0
    assert model.head.branches[0].weight.grad is not None
    wrong = SimpleNamespace(form="soft", prototypes=torch.randn(C, 256), prior=pseudo.prior)
    with pytest.raises(ConfigError, match="prototypes are 256-d but the model's embedding has 512 channels"):
        CpslStage1.build(model, params, StageContext(num_classes=C, pseudo=wrong, normalize=NORMALIZE))


# ---------------------------------------------------------------- a distillation row of the model table
def test_a_distillation_rows_teacher_is_the_labeller_of_its_pseudo_label_set(tmp_path, monkeypatch):
    """A cpsl_kd row names no teacher: it distils the model that labelled its pseudo-label set, read
    from the set's own copy (<set>/labeller), which is part of the row's identity."""
    import json
    import shutil
    from pathlib import Path

    from lib.models.artifact import load_model
    from lib.pseudo.artifact import PseudoLabels
    from lib.pseudo.writer import PseudoParams, generate_pseudo_labels
    from lib.table import find_training_row
    from lib.train.stage import build_training_stage
    from tests import layouts as L
    from tests.tables import one_row, train

    L.prepare_gta_and_cityscapes(tmp_path)
    monkeypatch.chdir(tmp_path)
    model = {"arch": "deeplabv2", "depth": 18, "bn": "batch", "aux": False, "head": "cpsl", "head_width": 32}
    data = {"batch_size": 2, "crop": [8, 16], "workers": 0}
    recipe = {"model": model, "data": data, "optim": {"model": {"type": "adamw", "lr": 1e-3}},
              "train": {"iters": 2, "checkpoint_every": 2, "log_every": 1, "precision": "fp32"}}
    params = one_row("kd", "cpsl_kd", {**recipe, "pseudo_threshold": 0.5}, "gta", "cs", pseudo="set",
                     recipes={"source_only": recipe},
                     models={"warmup": {"recipe": "source_only", "from": "scratch"},
                             "other": {"recipe": "source_only", "from": "scratch",
                                       "overrides": {"train": {"seed": 1}}}},
                     pseudo_labels={"set": {"model": "warmup", "form": "hard_threshold", "options": {"threshold": 0.5}}})
    train(params, "warmup")
    train(params, "other")
    monkeypatch.setattr("lib.pseudo.writer.select_device", lambda: torch.device("cpu"))
    generate_pseudo_labels(Path("data/models/warmup"), "cs", "train", "hard_threshold",
                           PseudoParams(batch_size=1, workers=0, threshold=0.5), Path("data/pseudo/set"), progress=False)
    labeller = PseudoLabels.load("data/pseudo/set").labeller
    expected, _ = load_model(labeller)
    shutil.rmtree("data/models/warmup")               # the set's copy is what the row reads

    built = build_training_stage(find_training_row(params, "kd"))
    teacher = built.method.teacher
    assert not teacher.training                       # the loop keeps frozen modules in eval mode, gradients off
    assert teacher.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert built.method.frozen_modules() == {"teacher": teacher}
    student = built.model.state_dict()                # from scratch: not the teacher
    assert any(not torch.equal(v, student[k]) for k, v in teacher.state_dict().items() if v.is_floating_point())

    # another labeller is another teacher, so another run (the checkpoint must not resume across it)
    shutil.copyfile("data/models/other/model.pt", labeller / "model.pt")
    other = build_training_stage(find_training_row(params, "kd"))
    assert other.fingerprint != built.fingerprint
    other_state, _ = load_model("data/models/other")
    assert all(torch.equal(v, other_state.state_dict()[k]) for k, v in other.method.teacher.state_dict().items())

    out = train(params, "kd")
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["stage"], meta["method"], meta["from"], meta["pseudo"]) == (
        "selftrain@kd", "cpsl_kd", "scratch", "set")
