"""Segmentation models: shapes and strides, heads, BN modes, parameter split and offline weights."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lib.config import parse
from lib.errors import ConfigError, DataError
from lib.models import ModelParams, SegOutput, build_model
from lib.models.artifact import save_model
from lib.models.backbone import load_backbone_state, read_state_dict
from lib.models.deeplabv2 import ATROUS_RATES, AsppSum, CpslHead
from lib.models.weights import (
    WeightsParams,
    import_weights,
    initialise,
    load_imported,
    write_scratch,
)

C = 5  # classes: small, so the heads stay cheap
ROOT = Path(__file__).resolve().parents[1]


def tiny(**kw) -> ModelParams:
    return ModelParams(**{"depth": 18, **kw})


def v2_size(n: int) -> int:
    """DeepLabV2 logits size: stem conv /2, ceil-mode max-pool /2, layer2 /2."""
    stem = math.ceil(n / 2)
    pooled = math.ceil((stem - 1) / 2) + 1
    return math.ceil(pooled / 2)


def bn_layers(model) -> list[nn.BatchNorm2d]:
    return [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]


def ids(params) -> set[int]:
    return {id(p) for p in params}


# --- shapes and strides --------------------------------------------------------------------

@pytest.mark.parametrize("depth", [18, 50, 101])
@pytest.mark.parametrize("arch", ["deeplabv2", "deeplabv3plus"])
def test_output_shapes_and_strides(arch, depth):
    model = build_model(ModelParams(arch=arch, depth=depth), C).eval()
    with torch.no_grad():  # batch 1 in eval mode must work for DeepLabV3+ too
        out = model(torch.randn(1, 3, 65, 65))
    assert isinstance(out, SegOutput)
    width = 1 if depth == 18 else 4
    channels = {"stem": 64, "layer1": 64 * width, "layer2": 128 * width,
                "layer3": 256 * width, "layer4": 512 * width}
    # 65 -> stem 33 -> pool 17 -> layer2 9 -> (v3+) layer3 5
    sizes = {"stem": 33, "layer1": 17, "layer2": 9, "layer3": 9, "layer4": 9}
    if arch == "deeplabv2":
        assert model.output_stride == 8
        assert out.logits.shape == (1, C, 9, 9) and out.aux_logits.shape == (1, C, 9, 9)
        assert "decoder_input" not in out.features
        assert out.features["embedding"] is out.features["layer4"]     # ASPP sum: layer4 is the embedding
        channels.update(embedding=channels["layer4"])
        sizes.update(embedding=9)
    else:
        sizes.update(layer3=5, layer4=5)
        channels.update(decoder_input=304, embedding=256)
        sizes.update(decoder_input=17, embedding=17)
        assert model.output_stride == 16
        assert out.logits.shape == (1, C, 17, 17) and out.aux_logits.shape == (1, C, 5, 5)
    assert {k: tuple(v.shape) for k, v in out.features.items()} == {
        k: (1, channels[k], sizes[k], sizes[k]) for k in channels}
    assert model.num_classes == C and model.params.depth == depth


def test_deeplabv2_at_output_stride_16():
    """layer3 strided, layer4 dilated 2: both heads at stride 16, the same tensors (weights load
    unchanged), and DeepLabV3+ refuses stride 8."""
    eight = build_model(ModelParams(arch="deeplabv2", depth=18), C)
    model = build_model(ModelParams(arch="deeplabv2", depth=18, output_stride=16), C).eval()
    assert model.output_stride == 16
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.logits.shape == (1, C, 5, 7) and out.aux_logits.shape == (1, C, 5, 7)   # ceil-mode pool: 17x25 -> 9x13 -> 5x7
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in eight.state_dict().items()}
    assert [m.dilation for m in model.backbone.layer4.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)] \
        == [(2, 2)] * 4
    with pytest.raises(ConfigError, match="output_stride 8 exists for arch 'deeplabv2' only"):
        parse(ModelParams, {"arch": "deeplabv3plus", "output_stride": 8}, "models.x.model")


@pytest.mark.parametrize("arch, dilations", [("deeplabv2", (1, 1, 2, 4)), ("deeplabv3plus", (1, 1, 1, 2))])
@pytest.mark.parametrize("depth", [18, 50])
def test_every_block_of_a_dilated_stage_is_dilated(arch, dilations, depth):
    backbone = build_model(ModelParams(arch=arch, depth=depth), C).backbone
    for stage, dilation in zip(("layer1", "layer2", "layer3", "layer4"), dilations):
        convs = [m for m in getattr(backbone, stage).modules() if isinstance(m, nn.Conv2d)]
        assert all(c.dilation == (dilation, dilation) for c in convs if c.kernel_size == (3, 3))
        assert all(c.padding == c.dilation for c in convs if c.kernel_size == (3, 3))
        if dilation > 1:
            assert all(c.stride == (1, 1) for c in convs)
    assert backbone.maxpool.ceil_mode == (arch == "deeplabv2")


def test_deeplabv2_matches_original_output_size():
    model = build_model(tiny(aux=False), C).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 1024))
    assert out.logits.shape[-2:] == (65, 129) == (v2_size(512), v2_size(1024))
    assert out.aux_logits is None


@pytest.mark.parametrize("size", [(64, 96), (71, 33)])
def test_strides_on_other_sizes(size):
    h, w = size
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        v2 = build_model(tiny(), C).eval()(x)
        v3 = build_model(tiny(arch="deeplabv3plus"), C).eval()(x)
    assert v2.logits.shape[-2:] == (v2_size(h), v2_size(w))
    assert v3.logits.shape[-2:] == v3.features["layer1"].shape[-2:]
    assert v3.aux_logits.shape[-2:] == v3.features["layer4"].shape[-2:]


def test_cpsl_head_embedding():
    model = build_model(tiny(head="cpsl", aux=False), C).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65))
    assert out.logits.shape == (1, C, 9, 9) and out.aux_logits is None
    assert out.features["embedding"].shape == (1, 256, 9, 9)
    assert model.head.classifier.bias is None


def test_deeplabv3plus_refuses_training_on_one_image():
    model = build_model(tiny(arch="deeplabv3plus"), C)
    with pytest.raises(ConfigError, match="batch size of at least 2"):
        model(torch.randn(1, 3, 33, 33))


# --- heads -------------------------------------------------------------------------------------

@pytest.mark.parametrize("compat, used", [(False, 4), (True, 2)])
def test_aspp_sum_is_the_sum_of_its_branches(compat, used):
    head = AsppSum(8, C, two_branch_compat=compat)
    x = torch.randn(2, 8, 30, 30)
    expected = sum(F.conv2d(x, conv.weight, conv.bias, padding=rate, dilation=rate)
                   for conv, rate in zip(head.branches[:used], ATROUS_RATES[:used]))
    assert len(head.branches) == 4  # unused branches still exist, so state dicts match
    torch.testing.assert_close(head(x), expected)
    assert all(p.requires_grad == (i < used) for i, conv in enumerate(head.branches)
               for p in conv.parameters())


def test_deeplabv2_heads_are_normal_0_01():
    model = build_model(tiny(), 19)
    for head in (model.head, model.aux_head):
        weights = torch.cat([conv.weight.flatten() for conv in head.branches])
        assert weights.std().item() == pytest.approx(0.01, rel=0.03)
        assert weights.mean().abs().item() < 1e-3
    cpsl = CpslHead(512, 19)
    assert cpsl.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert cpsl.fuse[0].weight.std().item() == pytest.approx(0.01, rel=0.03)


def test_deeplabv3plus_heads_are_kaiming_with_zero_bias():
    model = build_model(tiny(arch="deeplabv3plus"), C)
    conv = model.final1[0][0]
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert torch.all(model.final2.bias == 0) and torch.all(model.dsn[0].bias == 0)


# --- BatchNorm modes and the parameter split ------------------------------------------------------

def test_frozen_affine_bn_uses_batch_statistics_but_never_trains():
    model = build_model(tiny(bn="frozen_affine"), C).train()
    norms = bn_layers(model)
    before = norms[0].running_mean.clone()
    model(torch.randn(2, 3, 33, 33))
    assert not torch.equal(norms[0].running_mean, before)
    affine = ids(p for bn in norms for p in bn.parameters())
    assert not affine & ids(model.backbone_parameters())
    assert all(not p.requires_grad for bn in norms for p in bn.parameters())


def test_frozen_bn_stays_in_eval_mode():
    model = build_model(tiny(bn="frozen"), C)
    model.eval().train()
    norms = bn_layers(model)
    assert model.training and not any(bn.training for bn in norms)
    before = [bn.running_mean.clone() for bn in norms]
    model(torch.randn(2, 3, 33, 33))
    assert all(torch.equal(bn.running_mean, b) for bn, b in zip(norms, before))
    assert not ids(p for bn in norms for p in bn.parameters()) & ids(model.backbone_parameters())


def test_batch_bn_trains():
    model = build_model(tiny(bn="batch"), C)
    affine = ids(p for bn in bn_layers(model) for p in bn.parameters())
    assert affine <= ids(model.backbone_parameters())


CONFIGS = [
    tiny(bn="batch"),
    tiny(bn="frozen_affine", aspp_two_branch_compat=True),
    tiny(bn="batch", head="cpsl", aux=True),
    tiny(bn="frozen", head="cpsl", aux=False),
    tiny(bn="batch", arch="deeplabv3plus"),
    tiny(bn="frozen_affine", arch="deeplabv3plus", aux=False),
]


@pytest.mark.parametrize("params", CONFIGS, ids=str)
def test_every_trainable_parameter_is_backbone_or_head(params):
    model = build_model(params, C)
    backbone, head = ids(model.backbone_parameters()), ids(model.head_parameters())
    assert len(backbone) == len(model.backbone_parameters())
    assert not backbone & head
    assert backbone | head == ids(p for p in model.parameters() if p.requires_grad)
    assert ids(model.backbone.parameters()) >= backbone


@pytest.mark.parametrize("params", CONFIGS, ids=str)
def test_gradients_reach_every_trainable_parameter(params):
    torch.manual_seed(0)
    model = build_model(params, C).train()
    out = model(torch.randn(2, 3, 33, 33))
    loss = out.logits.square().mean()
    if out.aux_logits is not None:
        loss = loss + out.aux_logits.square().mean()
    loss.backward()
    starved = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not starved
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# --- weights ---------------------------------------------------------------------------------------
# A model's initialisation is its row's `from`: a weights artifact (lib.models.weights) holds the
# backbone tensors of a published file in this project's names, and `initialise` lays them on a model.

def save_resnet18(path: Path, wrap=lambda state: state) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(state), path)
    return state


def assert_backbone_equals(model, state):
    loaded = model.backbone.state_dict()
    assert set(state) - set(loaded) == {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def imported(path: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Import ``path`` as torchvision weights into ``out`` and read the artifact back."""
    written = import_weights(out.name, WeightsParams(format="torchvision", file=str(path)), out)
    state, meta = load_imported(out)
    assert meta == written == json.loads((out / "meta.json").read_text())
    return state, meta


def started_from(params: ModelParams, path: Path, out: Path):
    """A model built from ``params`` and initialised from the weights file ``path``."""
    state, meta = imported(path, out)
    model = build_model(params, C)
    initialise(model, out, state, meta)
    return model


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_our_resnet_is_torchvisions_under_the_same_seed(depth):
    """Same module names, shapes, random stream and forward pass: torchvision's files load into it and
    a seeded scratch model starts from the weights it started from when torchvision built it."""
    from lib.models.resnet import ResNet
    torch.manual_seed(depth)
    ours = ResNet(depth)
    torch.manual_seed(depth)
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    expected = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    assert list(ours.state_dict()) == list(expected)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in expected.items())
    x = torch.randn(1, 3, 64, 96)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        reference = theirs.layer4(theirs.layer3(theirs.layer2(theirs.layer1(
            theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(x))))))))
        torch.testing.assert_close(ours(x), reference, rtol=0, atol=0)


def test_building_a_model_does_not_import_torchvision():
    code = ("import sys; from lib.models import ModelParams, build_model; "
            "build_model(ModelParams(arch='deeplabv2', depth=18), 19); "
            "assert 'torchvision' not in sys.modules, 'torchvision imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_torchvision_resnet_imports_and_initialises_the_backbone(tmp_path):
    path = tmp_path / "r18.pth"
    state = save_resnet18(path)
    kept, meta = imported(path, tmp_path / "models/r18")
    # the artifact: the backbone tensors under torchvision's names, the classifier left out and reported
    assert set(kept) == set(state) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(kept[k], state[k]) for k in kept)
    assert meta["kind"] == "weights" and meta["format"] == "torchvision" and meta["name"] == "r18"
    assert meta["file"] == str(path) and meta["skipped"] == ["fc.bias", "fc.weight"]
    assert meta["mapped"] == len(state) - 2 and meta["missing"] == []
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for params in (tiny(), tiny(arch="deeplabv3plus"), tiny(bn="frozen")):
        model = build_model(params, C)
        heads = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
        initialise(model, tmp_path / "models/r18", kept, meta)
        assert_backbone_equals(model, state)
        # only the backbone: the heads keep their own initialisation
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in heads.items())


def test_scratch_changes_nothing(tmp_path):
    meta = write_scratch(tmp_path / "scratch")
    state, read = load_imported(tmp_path / "scratch")
    assert state == {} and read == meta and meta["kind"] == "weights" and meta["format"] == "none"
    torch.manual_seed(4)
    model = build_model(tiny(), C)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initialise(model, tmp_path / "scratch", state, meta)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_weights_file_with_wrapper_and_module_prefix(tmp_path):
    path = tmp_path / "ckpt.pth"
    state = save_resnet18(path, lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}})
    read = read_state_dict(path)
    assert set(read) == set(state) and all(torch.equal(read[k], state[k]) for k in state)
    assert_backbone_equals(started_from(tiny(arch="deeplabv3plus"), path, tmp_path / "models/ckpt"), state)


def test_load_backbone_state_ignores_the_classifier_and_loads_strictly(tmp_path):
    path = tmp_path / "r18.pth"
    state = save_resnet18(path)
    model = build_model(tiny(), C)
    load_backbone_state(model.backbone, read_state_dict(path), "r18")
    assert_backbone_equals(model, state)
    extra = {**state, "layer5.weight": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"^here: unexpected keys layer5\.weight$"):
        load_backbone_state(model.backbone, extra, "here")


def test_weights_file_missing_keys_is_an_error(tmp_path):
    path = tmp_path / "partial.pth"
    save_resnet18(path, lambda s: {k: v for k, v in s.items() if not k.startswith("layer4.1.")})
    with pytest.raises(ConfigError, match=r"partial\.pth.*missing keys layer4\.1\.conv1\.weight") as err:
        started_from(tiny(), path, tmp_path / "models/partial")
    assert "\n" not in str(err.value)


def test_weights_file_of_another_depth_is_an_error(tmp_path):
    path = tmp_path / "r18.pth"
    save_resnet18(path)
    with pytest.raises(ConfigError, match=r"r18\.pth\) does not fit the model's backbone: missing keys") as err:
        started_from(ModelParams(depth=50), path, tmp_path / "models/r18")
    assert "\n" not in str(err.value)


def test_missing_weights_file_is_one_error(tmp_path):
    path = tmp_path / "no" / "such.pth"
    with pytest.raises(DataError, match=r"such\.pth: weights file not found") as err:
        import_weights("w", WeightsParams(format="torchvision", file=str(path)), tmp_path / "models/w")
    assert "\n" not in str(err.value) and not (tmp_path / "models/w").exists()
    with pytest.raises(ConfigError, match=r"such\.pth not found"):
        read_state_dict(path)


@pytest.mark.parametrize("content, match", [
    (b"not a checkpoint", r"bad\.pth: not a readable PyTorch weights file"),
    ([1, 2], r"bad\.pth: expected a state dict of tensors"),
    ({"conv.weight": torch.zeros(1), "step": 3}, r"bad\.pth: expected a state dict of tensors"),
    ({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, r"bad\.pth: not a ResNet state dict"),
], ids=["corrupt", "list", "not-only-tensors", "not-a-resnet"])
def test_wrong_weights_file_is_one_error(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(DataError, match=match) as err:
        import_weights("w", WeightsParams(format="torchvision", file=str(path)), tmp_path / "models/w")
    assert "\n" not in str(err.value) and not (tmp_path / "models/w").exists()


def test_load_imported_refuses_other_artifacts(tmp_path):
    save_model(tmp_path / "trained", build_model(tiny(), C), {"kind": "model"})
    with pytest.raises(DataError, match=r"trained/model\.pt: not a weights artifact"):
        load_imported(tmp_path / "trained")
    with pytest.raises(DataError, match=r"none/model\.pt: weights artifact not found"):
        load_imported(tmp_path / "none")


@pytest.mark.parametrize("value, match", [
    ({"format": "caffe", "file": "x.pth"}, "weights.w.format"),
    ({"format": "torchvision", "file": ""}, "weights.w.file"),
    ({"format": "torchvision"}, "missing key 'weights.w.file'"),
])
def test_weights_params_errors(value, match):
    with pytest.raises(ConfigError, match=match):
        parse(WeightsParams, value, "weights.w")


# --- params ---------------------------------------------------------------------------------------

def test_params_parse_with_defaults():
    params = parse(ModelParams, {"depth": 50}, "model")
    assert params == ModelParams(depth=50)
    assert params.arch == "deeplabv2" and params.bn == "frozen_affine" and params.aux


@pytest.mark.parametrize("value, match", [
    ({"arch": "deeplabv3plus", "head": "cpsl"}, "model.head"),
    ({"head": "cpsl", "aspp_two_branch_compat": True}, "model.aspp_two_branch_compat"),
    ({"arch": "deeplabv3plus", "aspp_two_branch_compat": True}, "model.aspp_two_branch_compat"),
    ({"weights": "imagenet"}, "unknown key 'model.weights'"),      # a model starts from its row's `from`
    ({"depth": 34}, "model.depth"),
])
def test_params_errors(value, match):
    with pytest.raises(ConfigError, match=match):
        parse(ModelParams, value, "model")


def test_build_model_validates_params():
    with pytest.raises(ConfigError, match="cpsl"):
        build_model(tiny(arch="deeplabv3plus", head="cpsl"), C)
