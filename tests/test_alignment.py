"""Output-space alignment: discriminators, entropy, adversarial losses, AdaptSegNet / AdvEnt /
MinEnt / Global-Local (our reconstruction) training steps."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.config import parse
from lib.errors import ConfigError
from lib.losses.adversarial import SOURCE, TARGET, frozen, gan_loss
from lib.losses.entropy import entropy_loss, self_information
from lib.methods.base import ParamGroup, method_class
from lib.methods.globallocal import (
    GLOBAL_PARAMS,
    GlobalAlignment,
    pick,
    source_groups,
    target_groups,
)
from lib.methods.parts.output_space import (
    AdversarialOutputSpace,
    AdversarialParams,
    MinEntParams,
)
from lib.models import ModelParams, build_model
from lib.models.discriminator import FCDiscriminator, PixelDiscriminator

C = 5


# discriminators

@pytest.mark.parametrize("size, expected", [((512, 1024), (16, 32)), ((720, 1280), (22, 40))])
def test_fc_discriminator_patch_map_size(size, expected):
    d = FCDiscriminator(19, ndf=4)
    assert d(torch.zeros(1, 19, *size)).shape == (1, 1, *expected)


def test_fc_discriminator_layers():
    convs = [m for m in FCDiscriminator(19).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (19, 64, (4, 4), (2, 2)), (64, 128, (4, 4), (2, 2)), (128, 256, (4, 4), (2, 2)),
        (256, 512, (4, 4), (2, 2)), (512, 1, (4, 4), (2, 2))]
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in FCDiscriminator(19).modules()) == 4


def test_pixel_discriminator_is_per_pixel_and_class_conditional():
    d = PixelDiscriminator(C)
    x = torch.randn(2, C, 7, 9)
    out = d(x)
    assert out.shape == (2, C, 7, 9)
    y = x.clone()
    y[:, :, 3, 4] += 1.0                       # a change at one pixel changes only that pixel's logits
    changed = (d(y) - out).abs().sum(dim=1) > 0
    assert changed[:, 3, 4].all() and changed.sum() == 2


# entropy

@settings(max_examples=50, deadline=None)
@given(st.integers(2, 19), st.integers(0, 2**31 - 1), st.floats(0.1, 10.0))
def test_entropy_map_sums_to_normalised_entropy(classes, seed, scale):
    g = torch.Generator().manual_seed(seed)
    prob = (scale * torch.randn(2, classes, 3, 4, generator=g)).softmax(dim=1)
    total = self_information(prob).sum(dim=1)
    reference = -(prob * prob.log()).sum(dim=1) / math.log(classes)
    assert torch.allclose(total, reference, atol=1e-5)
    assert (total >= 0).all() and (total <= 1 + 1e-6).all()
    assert entropy_loss(prob) == pytest.approx(float(total.mean()), abs=1e-6)


def test_entropy_extremes():
    uniform = torch.full((1, C, 2, 2), 1.0 / C)
    onehot = torch.nn.functional.one_hot(torch.zeros(1, 2, 2, dtype=torch.long), C).permute(0, 3, 1, 2).float()
    assert entropy_loss(uniform) == pytest.approx(1.0)
    assert entropy_loss(onehot) == pytest.approx(0.0, abs=1e-6)


# adversarial losses

def test_gan_loss_values():
    logits = torch.tensor([[0.0, 2.0]])
    assert gan_loss(logits, SOURCE) == pytest.approx((math.log(2) + math.log(1 + math.e ** 2)) / 2)
    assert gan_loss(logits, TARGET, "ls") == pytest.approx((1 + 1) / 2)
    mask = torch.tensor([[True, False]])
    assert gan_loss(logits, SOURCE, mask=mask) == pytest.approx(math.log(2))
    assert gan_loss(logits, SOURCE, mask=torch.zeros_like(mask)) == 0.0


def test_frozen_restores_requires_grad():
    d = FCDiscriminator(C, ndf=2)
    next(d.parameters()).requires_grad_(False)
    before = [p.requires_grad for p in d.parameters()]
    with frozen([d]):
        assert not any(p.requires_grad for p in d.parameters())
    assert [p.requires_grad for p in d.parameters()] == before


# Global-Local reconstruction helpers

def test_pick_takes_each_pixels_own_class():
    logits = torch.arange(2 * 3 * 1 * 2, dtype=torch.float).reshape(2, 3, 1, 2)
    classes = torch.tensor([[[0, 2]], [[1, 1]]])
    assert pick(logits, classes).tolist() == [[[0.0, 5.0]], [[8.0, 9.0]]]


def test_groups_and_masks():
    label = torch.tensor([[[0, 0, 255, 255], [1, 1, 3, 3]]])
    y, mask = source_groups(label, (2, 2), ignored=(3,))
    assert y.tolist() == [[[0, 255], [1, 3]]] and mask.tolist() == [[[True, False], [True, False]]]
    prob = torch.tensor([[[[0.9, 0.4]], [[0.1, 0.6]]]])
    classes, confident = target_groups(prob, 0.5)
    assert classes.tolist() == [[[0, 1]]] and confident.tolist() == [[[True, True]]]
    assert target_groups(prob, 0.7)[1].tolist() == [[[True, False]]]


# methods on a small DeepLabV2

METHODS = [("adaptsegnet", {}), ("adaptsegnet", {"gan": "ls"}), ("advent", {}), ("minent", {}),
           ("globallocal", {"global_method": "advent"}), ("globallocal", {"global_method": "adaptsegnet"}),
           ("globallocal", {"global_method": "minent", "resolution": "input", "target_threshold": 0.2})]


def build(name: str, raw: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelParams(arch="deeplabv2", depth=18, aux=True), C)
    cls = method_class(name)
    return cls(model, parse(cls.params_type, raw, name))


def fixed_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, C, (2, 32, 48), generator=g)
    label[:, :4] = 255
    return {"source": {"image": torch.randn(2, 3, 32, 48, generator=g), "label": label},
            "target": {"image": torch.randn(2, 3, 40, 56, generator=g)}}   # another size, as ADVENT


def optimizers(method, lr: float):
    return {name: torch.optim.SGD([p for g in groups for p in g.params if p.requires_grad], lr=lr)
            for name, groups in method.param_groups().items()}


def losses_at(method, batch):
    for m in method.modules().values():
        m.zero_grad(set_to_none=True)
    return {k: float(v) for k, v in method.training_step(batch, 0).items()}


@pytest.mark.parametrize("name, raw", METHODS)
def test_one_step_lowers_each_loss(name, raw):
    """Each optimizer lowers its own objective: the generator's (summed) losses with the
    discriminators of before the step, and each discriminator's loss (separate parameters) on the
    generator of before the step."""
    method = build(name, raw)
    for m in method.modules().values():
        m.train()
    batch = fixed_batch()
    g_names = [n for n in method.modules() if n == "model"]
    d_names = [n for n in method.modules() if n != "model"]
    before_state = {n: copy.deepcopy(m.state_dict()) for n, m in method.modules().items()}
    before = losses_at(method, batch)
    assert set(before) >= {"seg", "seg_aux"}
    for opt in optimizers(method, lr=1e-3).values():
        opt.step()
    after_state = {n: copy.deepcopy(m.state_dict()) for n, m in method.modules().items()}

    for n in d_names:                                   # new generator, old discriminators
        method.modules()[n].load_state_dict(before_state[n])
    generator = losses_at(method, batch)
    for n in d_names:                                   # old generator, new discriminators
        method.modules()[n].load_state_dict(after_state[n])
    for n in g_names:
        method.modules()[n].load_state_dict(before_state[n])
    discriminator = losses_at(method, batch)

    g_keys = [k for k in before if not k.startswith("d_")]
    assert sum(generator[k] for k in g_keys) < sum(before[k] for k in g_keys)
    for key in (k for k in before if k.startswith("d_")):
        assert discriminator[key] < before[key], f"{name}: {key} went from {before[key]} to {discriminator[key]}"
    if name != "minent" and raw.get("global_method") != "minent":
        assert any(k.startswith("adv_") for k in before) and any(k.startswith("d_") for k in before)


def grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("name, raw", [m for m in METHODS if m[0] != "minent"])
def test_generator_and_discriminator_steps_do_not_touch_each_other(name, raw, monkeypatch):
    batch = fixed_batch()
    method = build(name, raw)
    d_modules = [m for n, m in method.modules().items() if n != "model"]

    # the generator's losses alone (no discriminator step) give the discriminators no gradient
    monkeypatch.setattr(method, "discriminator_losses", lambda *a, **k: {})
    losses_at(method, batch)
    assert all(g is None for d in d_modules for g in grads(d))
    monkeypatch.undo()

    # the discriminator step adds nothing to the generator's gradient
    method = build(name, raw)
    monkeypatch.setattr(method, "discriminator_losses", lambda *a, **k: {})
    losses_at(method, batch)
    without = grads(method.model)
    monkeypatch.undo()
    method = build(name, raw)
    losses_at(method, batch)
    full_generator_grads = grads(method.model)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(without, full_generator_grads))
    assert all(g is not None for n, d in method.modules().items() if n != "model" for g in grads(d))


def test_advent_discriminator_sees_self_information_and_adaptsegnet_the_softmax():
    logits = torch.randn(1, C, 4, 4)
    prob = logits.softmax(1)
    assert torch.allclose(build("advent", {}).discriminator_input(prob), self_information(prob))
    assert torch.equal(build("adaptsegnet", {}).discriminator_input(prob), prob)


def test_single_level_has_one_discriminator():
    method = build("adaptsegnet", {"adv_aux": 0.0})
    assert list(method.d) == ["main"]


def test_zero_adversarial_weights_leave_a_control_without_discriminators():
    method = build("advent", {"adv_main": 0.0, "adv_aux": 0.0})
    assert set(method.param_groups()) == {"model"}
    assert set(method.training_step(fixed_batch(), 0)) == {"seg", "seg_aux"}


def test_minent_has_no_discriminator_optimizer():
    assert set(build("minent", {}).param_groups()) == {"model"}
    assert set(build("advent", {}).param_groups()) == {"model", "discriminator"}


def test_globallocal_parameters():
    method = build("globallocal", {"global_method": "minent"})
    assert set(method.discriminators()) == {"local_discriminator"}
    assert isinstance(method.param_groups()["discriminator"][0], ParamGroup)
    with pytest.raises(ConfigError, match="globallocal.global_params"):
        parse(method_class("globallocal").params_type, {"global_params": {"adv_mian": 1}}, "warmup.globallocal")
    late = build("globallocal", {"local_start": 5})
    assert not any("local" in k for k in late.training_step(fixed_batch(), 0))
    assert "adv_local" in late.training_step(fixed_batch(), 5)


def test_the_output_space_methods_share_one_alignment():
    for name in ("adaptsegnet", "advent"):
        assert issubclass(method_class(name), AdversarialOutputSpace)
        assert method_class(name).params_type is AdversarialParams
    assert method_class("minent").params_type is MinEntParams
    assert GLOBAL_PARAMS == {"advent": AdversarialParams, "adaptsegnet": AdversarialParams, "minent": MinEntParams}
    method = build("globallocal", {"global_method": "advent"})
    assert isinstance(method.global_alignment, GlobalAlignment)
    prob = torch.randn(1, C, 4, 4).softmax(1)
    assert torch.allclose(method.global_alignment.discriminator_input(prob), self_information(prob))
    softmax = build("globallocal", {"global_method": "adaptsegnet"}).global_alignment
    assert torch.equal(softmax.discriminator_input(prob), prob)


@pytest.mark.parametrize("global_method", ["advent", "adaptsegnet", "minent"])
def test_globallocal_without_its_local_term_is_its_global_method(global_method):
    """The global term is the method itself: same discriminators, same losses on the same batch."""
    alone = build(global_method, {})
    joint = build("globallocal", {"global_method": global_method, "local_weight": 0.0})
    batch = fixed_batch()
    torch.manual_seed(3)
    expected = losses_at(alone, batch)
    torch.manual_seed(3)
    assert losses_at(joint, batch) == expected
    assert {n: [p.shape for p in m.parameters()] for n, m in alone.discriminators().items()} == \
        {n: [p.shape for p in m.parameters()] for n, m in joint.discriminators().items() if n != "local_discriminator"}
