"""BAFFT (Yuan et al., "Birds of a Feather Flock Together", IEEE TIP 2022): regions, pooling, memories,
matching, ISIA/AIM, version A, and the step-1 / step-2 training steps on a small DeepLabV2."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lib.config import parse
from lib.data.classes import CITYSCAPES19, IGNORE, SYNTHIA16
from lib.errors import ConfigError
from lib.losses.category import (
    STUFF_19,
    THING_19,
    RingBank,
    check_split,
    class_centroids,
    classifier_agrees,
    connected_components,
    correct_prediction_mask,
    isia_intra,
    isia_separation,
    masked_average_pool,
    mean_abs_distance,
    nearest_distance,
    self_weighted,
    stuff_and_things,
    stuff_regions,
    thing_regions,
    version_a_diff,
    version_a_same,
    version_a_separation,
)
from lib.methods.base import method_class
from lib.models import ModelParams, build_model

C = 19
ROAD, CAR = 0, 13


# class split

def test_stuff_and_thing_split():
    assert stuff_and_things(CITYSCAPES19) == (STUFF_19, THING_19)
    stuff, things = stuff_and_things(SYNTHIA16)
    # SYNTHIA16: road .. fence | pole light sign | vegetation sky | person rider car bus motorcycle bicycle
    assert stuff == (0, 1, 2, 3, 4, 8, 9) and things == (5, 6, 7, 10, 11, 12, 13, 14, 15)
    check_split(STUFF_19, THING_19, 19, "x")
    with pytest.raises(ConfigError, match="synthia16 use stuff_classes"):
        check_split(STUFF_19, THING_19, 16, "x")
    with pytest.raises(ConfigError, match="both stuff and thing"):
        check_split((0, 1), (1, 2), 19, "x")


# regions

def test_correct_prediction_mask_keeps_agreeing_pixels():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = logits[0, 2, 1, :] = 1.0     # argmax [[0, 1], [2, 2]]
    label = torch.tensor([[[0, 0, 2, 2], [0, 0, 2, 2], [2, 2, 255, 255], [2, 2, 255, 255]]])  # 4x4 -> 2x2
    assert correct_prediction_mask(logits, label).tolist() == [[[0, 255], [2, 255]]]


def test_diagonal_blobs_are_one_component_with_8_connectivity():
    mask = np.zeros((5, 5), bool)
    mask[0:2, 0:2] = True
    mask[2:5, 2:5] = True            # touches the first blob only at a corner
    assert len(connected_components(mask, top_k=10, connectivity=2)) == 1
    four = connected_components(mask, top_k=10, connectivity=1)
    assert [int(c.sum()) for c in four] == [9, 4]            # largest first
    assert four[0][4, 4] and four[1][0, 0]


def test_components_top_k_by_size():
    mask = np.zeros((3, 12), bool)
    mask[0, 0:2] = True              # size 2
    mask[0, 4:9] = True              # size 5
    mask[2, 0:3] = True              # size 3
    mask[2, 10:11] = True            # size 1
    sizes = [int(c.sum()) for c in connected_components(mask, top_k=3)]
    assert sizes == [5, 3, 2]
    assert connected_components(np.zeros((3, 3), bool), top_k=10).shape == (0, 3, 3)


def test_stuff_and_thing_regions():
    labels = np.array([[0, 0, 255, 13],
                       [255, 255, 255, 13],
                       [13, 255, 2, 255]], np.int64)
    masks, classes = stuff_regions(labels, STUFF_19)
    assert classes == [0, 2] and masks.sum(axis=(1, 2)).tolist() == [2, 1]
    masks, classes = thing_regions(labels, THING_19, top_k=10)
    assert classes == [13, 13] and masks.sum(axis=(1, 2)).tolist() == [2, 1]
    assert thing_regions(labels, THING_19, top_k=1)[1] == [13]


def test_masked_average_pool():
    features = torch.arange(12, dtype=torch.float).reshape(2, 2, 3)   # D=2 over a 2x3 map
    masks = torch.tensor([[[1, 0, 0], [0, 0, 1]],
                          [[0, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    pooled = masked_average_pool(features, masks)
    assert pooled.tolist() == [[(0 + 5) / 2, (6 + 11) / 2], [0.0, 0.0]]   # an empty mask pools to 0


def test_class_centroids_pool_over_the_batch():
    features = torch.zeros(2, 2, 1, 2)
    features[0, :, 0, 0] = torch.tensor([1.0, 2.0])
    features[1, :, 0, 1] = torch.tensor([3.0, 6.0])
    labels = torch.tensor([[[1, 255]], [[0, 1]]])
    centroids, present = class_centroids(features, labels, 3)
    assert present.tolist() == [True, True, False]
    assert centroids.tolist() == [[0.0, 0.0], [2.0, 4.0], [0.0, 0.0]]


# memories

def test_ring_bank_wraps_and_becomes_ready_after_more_writes_than_slots():
    bank = RingBank(classes=(3, 7), capacity=3, dim=2)
    vectors = [torch.full((1, 2), float(i)) for i in range(5)]
    for i, v in enumerate(vectors):
        bank.write(7, v)
        assert bank.ready(7) == (i + 1 > 3)                 # after the 4th write, not the 3rd
    assert bank.entries(7)[:, 0].tolist() == [3.0, 4.0, 2.0]
    assert bank.writes.tolist() == [0, 5] and not bank.ready(3) and bank.ready_classes() == {7}

    at_once = RingBank(classes=(3, 7), capacity=3, dim=2)
    at_once.write(7, torch.cat(vectors[:2]))
    at_once.write(7, torch.cat(vectors[2:]))
    assert torch.equal(at_once.storage, bank.storage) and torch.equal(at_once.writes, bank.writes)
    many = RingBank(classes=(3, 7), capacity=3, dim=2)
    many.write(7, torch.cat(vectors))                        # more than the capacity in one write
    assert torch.equal(many.storage, bank.storage)


def test_ring_bank_state_dict_round_trip():
    bank = RingBank(classes=(0, 1), capacity=2, dim=3)
    bank.write(1, torch.randn(3, 3))
    fresh = RingBank(classes=(0, 1), capacity=2, dim=3)
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh.storage, bank.storage) and fresh.writes.tolist() == [0, 3]
    assert fresh.ready_classes() == {1}
    v = torch.ones(1, 3)
    fresh.write(1, v)
    bank.write(1, v)
    assert torch.equal(fresh.storage, bank.storage)


# matching

def test_distances_by_hand():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 0.0, 3.0])
    assert float(mean_abs_distance(a, b)) == pytest.approx(1.0)
    bank = torch.tensor([[2.0, 0.0, 3.0], [1.0, 2.0, 5.0], [9.0, 9.0, 9.0]])
    queries = torch.stack([a, torch.tensor([9.0, 9.0, 8.0])])
    assert nearest_distance(queries, bank).tolist() == pytest.approx([2 / 3, 1 / 3])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_nearest_distance_is_the_minimum_over_the_bank(seed):
    g = torch.Generator().manual_seed(seed)
    queries, bank = torch.randn(4, 6, generator=g), torch.randn(7, 6, generator=g)
    brute = torch.stack([torch.stack([mean_abs_distance(q, e) for e in bank]).min() for q in queries])
    assert torch.allclose(nearest_distance(queries, bank), brute, atol=1e-6)


def test_aim_self_weighting_gradient_is_two_d_grad_d():
    bank = torch.tensor([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    v = torch.tensor([[0.5, -1.0, 2.5]], requires_grad=True)
    d = nearest_distance(v, bank)
    (grad_d,) = torch.autograd.grad(d.sum(), v)
    (grad_aim,) = torch.autograd.grad(self_weighted(nearest_distance(v, bank)).sum(), v)
    assert float(d.detach()) == pytest.approx((0.5 + 2 + 0.5) / 3)
    assert torch.allclose(grad_aim, 2 * d.detach() * grad_d)
    assert torch.allclose(grad_d, torch.tensor([[1.0, -1.0, 1.0]]) / 3)   # sign(v - nearest)/D


class TupleHead(nn.Module):
    """A 1x1 classifier returning (logits, feat), like the CPSL head."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=False)
        self.conv.weight.data = weight[:, :, None, None].clone()
        self.drop = nn.Dropout(0.9)

    def forward(self, x):
        return self.drop(self.conv(x)), x


def test_classifier_gate():
    head = nn.Conv2d(3, 3, 1, bias=False)
    head.weight.data = torch.eye(3)[:, :, None, None]
    vectors = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [2.0, 0.0, 3.0]])
    assert classifier_agrees(head, vectors, [1, 0, 2]).tolist() == [True, False, True]
    tuple_head = TupleHead(torch.eye(3)).train()
    assert classifier_agrees(tuple_head, vectors, [1, 0, 2]).tolist() == [True, False, True]  # no dropout
    assert tuple_head.training
    assert classifier_agrees(head, torch.zeros(0, 3), []).shape == (0,)


def test_classifier_gate_on_an_atrous_head_uses_the_centre_taps():
    model = build_model(ModelParams(arch="deeplabv2", depth=18, aux=False), 4)
    with torch.no_grad():
        vectors = torch.rand(6, 512)
        expected = sum(conv.weight[:, :, 1, 1] @ vectors.T + conv.bias[:, None] for conv in model.head.branches)
    classes = expected.argmax(dim=0).tolist()
    assert classifier_agrees(model.head, vectors, classes).all()


# ISIA

def test_isia_intra_and_separation_on_constructed_centroids():
    e = torch.eye(3)
    everywhere = torch.ones(3, dtype=torch.bool)
    assert float(isia_intra(e, e, everywhere, everywhere)) == 0.0
    assert float(isia_intra(e, 2 * e, everywhere, everywhere)) == pytest.approx(3 * 1 / 3)
    # orthogonal classes: (1 + 0)/2 for each of the 6 ordered pairs i != k
    assert float(isia_separation(e, e, everywhere, everywhere)) == pytest.approx(6 * 0.5)
    same = torch.ones(3, 3)                                  # all classes alike: (1 + 1)/2 per pair
    assert float(isia_separation(same, same, everywhere, everywhere)) == pytest.approx(6 * 1.0)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    two = torch.ones(2, dtype=torch.bool)
    assert float(isia_separation(opposite, opposite, two, two)) == pytest.approx(0.0, abs=1e-7)
    only_first = torch.tensor([True, False, False])
    assert float(isia_intra(e, 2 * e, everywhere, only_first)) == pytest.approx(1 / 3)
    assert float(isia_separation(e, e, everywhere, only_first)) == pytest.approx(2 * 0.5)   # (1,0), (2,0)


# code version A

def test_version_a_diff_is_the_degenerate_constant():
    g = torch.Generator().manual_seed(0)
    p_s = torch.randn(2, C, 5, 7, generator=g).softmax(1)
    p_t = torch.randn(2, C, 5, 7, generator=g).softmax(1).requires_grad_(True)
    dim = 512
    value = version_a_diff(p_s, p_t, dim)
    assert float(value.detach()) == pytest.approx(C * (C - 1) / dim, rel=1e-5)
    (grad,) = torch.autograd.grad(value, p_t)
    assert grad.abs().max() < 1e-6
    assert float(version_a_diff(p_s, p_t.detach(), 2048)) == pytest.approx(19 * 18 / 2048, rel=1e-5)   # ≈ 0.167 (R101)


def test_version_a_same_and_separation_by_hand():
    p_s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])     # (1, 2, 1, 2)
    p_t = torch.tensor([[[[0.5, 0.0]], [[0.5, 1.0]]]])
    assert float(version_a_same(p_s, p_t, dim=4)) == pytest.approx((0.5 + 0.5) / 4)
    stuff = torch.tensor([[1.0, 0.0]])
    instances = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])   # class 5: cos 1, 0; class 6: cos 0
    expected = 500 * ((1.0 + 0.5) / 2 + 0.5) / 2                    # mean per thing class, summed
    assert float(version_a_separation(stuff, instances, [5, 5, 6], dim=2)) == pytest.approx(expected)
    assert float(version_a_separation(stuff[:0], instances, [5, 5, 6], dim=2)) == 0.0


# the methods on a small DeepLabV2

CROP = (32, 64)


def build(name: str, raw: dict | None = None, head: str = "aspp_sum", seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelParams(arch="deeplabv2", depth=18, aux=True, head=head), C)
    cls = method_class(name)
    return cls(model, parse(cls.params_type, raw or {}, name))


def predict_only(method, cls: int) -> None:
    """Make the main classifier predict ``cls`` for any input (the classifier gate then agrees with it)."""
    with torch.no_grad():
        for conv in method.model.head.branches:
            conv.weight.zero_()
            conv.bias.zero_()
        method.model.head.branches[0].bias[cls] = 10.0


def batch(seed: int = 1, label=None, pseudo=None):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, C, (2, *CROP), generator=g) if label is None else label
    out = {"source": {"image": torch.randn(2, 3, *CROP, generator=g), "label": label},
           "target": {"image": torch.randn(2, 3, *CROP, generator=g)}}
    if pseudo is not None:
        out["target"]["pseudo"] = pseudo
    return out


def road_and_two_cars() -> torch.Tensor:
    """Image 0: road on top, two cars far apart below; image 1: no road, no car."""
    label = torch.full((2, *CROP), 2)                 # building
    label[0, :16] = ROAD
    label[0, 16:, :16] = CAR
    label[0, 16:, 48:] = CAR
    return label


def step(method, b, it: int = 0) -> dict[str, float]:
    for m in method.modules().values():
        m.zero_grad(set_to_none=True)
    return {k: float(v) for k, v in method.training_step(b, it).items()}


def fill(bank: RingBank, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    for c in bank.classes:
        bank.write(c, torch.rand(bank.capacity + 1, bank.storage.shape[-1], generator=g))


SETUPS = [("bafft_step1", {}, "aspp_sum"), ("bafft_step1", {"alignment": "sim"}, "aspp_sum"),
          ("bafft_step1", {"code_faithful": True}, "aspp_sum"), ("bafft_step1", {}, "cpsl"),
          ("bafft_step2", {}, "aspp_sum")]
KEYS = {"sim": {"stuff", "instance"}, "isia": {"stuff", "instance", "isia_intra", "isia_sep"},
        "version_a": {"stuff", "instance", "same", "diff", "sep"}}


@pytest.mark.parametrize("name, raw, head", SETUPS)
def test_one_step_gives_finite_named_losses(name, raw, head):
    method = build(name, raw, head)
    pseudo = torch.randint(0, C, (2, *CROP)) if name == "bafft_step2" else None
    losses = step(method, batch(pseudo=pseudo), it=1)
    kind = "version_a" if raw.get("code_faithful") else raw.get("alignment", "isia")
    expected = {"seg", "seg_aux", "adv_main", "d_main"} | KEYS[kind]
    if pseudo is not None:
        expected.add("seg_target")
    assert set(losses) == expected
    assert all(math.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in method.model.head.parameters() if p.requires_grad)
    assert set(method.modules()) == {"model", "discriminator", "stuff_bank", "thing_bank"}
    assert set(method.param_groups()) == {"model", "discriminator"}


def grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("name", ["bafft_step1", "bafft_step2"])
def test_discriminator_gets_no_gradient_from_generator_terms(name, monkeypatch):
    b = batch(pseudo=torch.randint(0, C, (2, *CROP)))
    method = build(name, {"stuff_slots": 1, "thing_slots": 1})
    for bank in (method.stuff_bank, method.thing_bank):
        fill(bank)
    monkeypatch.setattr(method, "discriminator_losses", lambda *a, **k: {})
    losses = step(method, b, it=1)
    assert losses["adv_main"] > 0 and (losses["stuff"] > 0 or losses["instance"] > 0)
    assert all(g is None for g in grads(method.adversarial.d))
    without = grads(method.model)
    monkeypatch.undo()

    method = build(name, {"stuff_slots": 1, "thing_slots": 1})
    for bank in (method.stuff_bank, method.thing_bank):
        fill(bank)
    step(method, b, it=1)
    assert all(g is not None for g in grads(method.adversarial.d))
    assert all((a is None and c is None) or torch.equal(a, c) for a, c in zip(without, grads(method.model)))


def test_memories_fill_from_correctly_predicted_source_regions():
    method = build("bafft_step1")
    predict_only(method, ROAD)          # road pixels are correct, the cars are not
    step(method, batch(label=road_and_two_cars()))
    assert method.stuff_bank.writes.tolist() == [1, 0, 0, 0, 0, 0, 0, 0]     # image 0's road only
    assert method.thing_bank.writes.sum() == 0
    road = method.stuff_bank.entries(ROAD)[0]
    assert road.abs().sum() > 0

    method = build("bafft_step1")
    predict_only(method, CAR)           # now the two cars are correct: two 8-connected instances
    step(method, batch(label=road_and_two_cars()))
    assert method.stuff_bank.writes.sum() == 0
    assert method.thing_bank.writes[THING_19.index(CAR)] == 2 and method.thing_bank.writes.sum() == 2


def test_memory_matching_waits_for_the_second_iteration_and_full_memories():
    pseudo = torch.full((2, *CROP), IGNORE)
    pseudo[0] = road_and_two_cars()[0]
    for it, filled, active in ((0, True, False), (1, False, False), (1, True, True)):
        method = build("bafft_step2", {"stuff_slots": 2, "thing_slots": 2})
        predict_only(method, ROAD)
        if filled:
            fill(method.stuff_bank)
            fill(method.thing_bank)
        losses = step(method, batch(pseudo=pseudo), it)
        assert (losses["stuff"] > 0) == active and (losses["instance"] > 0) == active


def test_isia_self_weights_what_sim_matches_plainly():
    """One road region and one car instance in image 0 of 2: sim gives λ d / 2, isia λ d² / 2 for
    the road and β_AIM λ d² / 2 for the car, on the same memories."""
    pseudo = torch.full((2, *CROP), IGNORE)
    pseudo[0] = road_and_two_cars()[0]
    pseudo[0, 16:, 48:] = 2                           # keep one car
    b = batch(pseudo=pseudo)
    out = {}
    for alignment in ("sim", "isia"):
        method = build("bafft_step2", {"alignment": alignment, "beta_aim": 3.0, "stuff_slots": 2,
                                       "thing_slots": 2, "stuff_weight": 1.0, "instance_weight": 1.0})
        predict_only(method, ROAD)
        fill(method.stuff_bank)
        fill(method.thing_bank)
        out[alignment] = step(method, b, it=1)
    road, car = 2 * out["sim"]["stuff"], 2 * out["sim"]["instance"]
    assert road > 0 and car > 0
    assert out["isia"]["stuff"] == pytest.approx(road * road / 2, rel=1e-5)
    assert out["isia"]["instance"] == pytest.approx(3.0 * car * car / 2, rel=1e-5)


def test_step2_learns_from_pseudo_labels_only_where_valid():
    method = build("bafft_step2")
    ignored = step(method, batch(pseudo=torch.full((2, *CROP), IGNORE)), it=1)
    assert ignored["seg_target"] == 0.0
    assert ignored["isia_intra"] == 0.0 and ignored["isia_sep"] == 0.0    # no target regions at all
    labelled = step(build("bafft_step2"), batch(pseudo=road_and_two_cars()), it=1)
    assert labelled["seg_target"] > 0 and labelled["isia_sep"] > 0
    assert method_class("bafft_step2").needs_pseudo and not method_class("bafft_step1").needs_pseudo


def test_version_a_diff_in_the_step_is_the_constant():
    method = build("bafft_step1", {"code_faithful": True, "isia_weight": 1.0})
    losses = step(method, batch())
    assert losses["diff"] == pytest.approx(C * (C - 1) / 512, rel=1e-4)     # R18: D = 512


def test_params():
    cls = method_class("bafft_step1")
    with pytest.raises(ConfigError, match="code_faithful"):
        parse(cls.params_type, {"alignment": "sim", "code_faithful": True}, "warmup.bafft_step1")
    with pytest.raises(ConfigError, match="thing_slots"):
        parse(cls.params_type, {"thing_slots": 0}, "warmup.bafft_step1")
    step2 = parse(method_class("bafft_step2").params_type, {}, "selftrain.bafft_step2")
    assert (step2.adv_weight, step2.stuff_weight, step2.instance_weight, step2.isia_weight,
            step2.target_weight) == (1e-3, 1e-3, 1e-3, 1e-3, 1.0)
    model = build_model(ModelParams(arch="deeplabv2", depth=18, aux=False), 16)
    with pytest.raises(ConfigError, match="synthia16"):
        cls(model, parse(cls.params_type, {}, "bafft_step1"))
    stuff, things = stuff_and_things(SYNTHIA16)
    raw = {"stuff_classes": list(stuff), "thing_classes": list(things)}
    method = cls(model, parse(cls.params_type, raw, "bafft_step1"))
    assert method.stuff_bank.classes == stuff


def test_both_steps_share_one_alignment():
    """Step 1 and step 2 are one BAFFT alignment that differ in the target regions (the argmax of
    the prediction, the pseudo-labels) and the target supervision (none, CE on the pseudo-labels)."""
    from lib.methods.parts.bafft import (
        BafftAlignment,
        BafftParams,
        SoftmaxDiscriminator,
    )
    step1, step2 = method_class("bafft_step1"), method_class("bafft_step2")
    assert issubclass(step1, BafftAlignment) and issubclass(step2, BafftAlignment)
    assert step1.params_type is BafftParams and issubclass(step2.params_type, BafftParams)
    method = build("bafft_step1")
    assert isinstance(method.adversarial, SoftmaxDiscriminator)
    prob = torch.randn(1, C, 4, 4).softmax(1)
    assert torch.equal(method.adversarial.discriminator_input(prob), prob)     # AdaptSegNet's softmax
    out = method.model(torch.randn(2, 3, *CROP))
    pseudo = road_and_two_cars()
    assert torch.equal(method.target_regions(out, {"pseudo": pseudo}), out.logits.detach().argmax(1))
    assert method.target_supervision(out, {"pseudo": pseudo}) == {}
    regions = build("bafft_step2").target_regions(out, {"pseudo": pseudo})
    assert regions.shape == out.logits.shape[:1] + out.logits.shape[2:]
    assert set(regions.unique().tolist()) <= {ROAD, CAR, 2}
