"""Pretrained weights in their published formats: files the tests write with the real key layouts and
shapes (a random network saved under the real names); the loaded backbone must equal the file's tensors."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lib.data.streams import NORMALIZATION
from lib.errors import ConfigError, DataError
from lib.models.backbone import ResNetBackbone
from lib.models.factory import build_model
from lib.models.params import ModelParams
from lib.models.weights import WeightsParams, import_weights, initialise, load_imported
from lib.table import find_training_row
from lib.train.stage import StageInputs, build_training_stage
from lib.validate import check_params
from tests import layouts as L
from tests.tables import ensure_scratch, one_row

C = 19
REPO = Path(__file__).resolve().parents[1]


def r101(style: str = "torchvision", **kw) -> ModelParams:
    return ModelParams(arch="deeplabv2", depth=101, bn="frozen_affine", aux=True, style=style, **kw)


def imported(tmp_path, fmt: str, state: dict, name: str = "w"):
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    meta = import_weights(name, WeightsParams(format=fmt, file=str(path)), tmp_path / "models" / name)
    return (*load_imported(tmp_path / "models" / name), meta)


def backbone_of(model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")}


def assert_loaded(model, file_state: dict[str, torch.Tensor]) -> None:
    own = backbone_of(model)
    for key, tensor in file_state.items():
        assert torch.equal(own[key], tensor), key


def random_torchvision_resnet101() -> dict[str, torch.Tensor]:
    return L.torchvision_resnet_state(101)


@pytest.mark.parametrize("style", ["torchvision", "caffe"])
def test_torchvision_imagenet_file_loads_into_either_layout(tmp_path, style):
    """ResNet-101 V1 and V2 files share these names; CPSL loads them, by name, into its Caffe-layout DeepLab."""
    state = random_torchvision_resnet101()
    kept, read, meta = imported(tmp_path, "torchvision", state)
    assert meta["skipped"] == ["fc.bias", "fc.weight"] and meta["mapped"] == len(state) - 2
    assert (meta["style"], meta["normalize"]) == (None, None)
    model = build_model(r101(style), C)
    initialise(model, tmp_path / "models/w", kept, read)
    assert_loaded(model, {k: v for k, v in state.items() if not k.startswith("fc.")})


caffe_reference, deeplab_init_file = L.caffe_reference, L.deeplab_caffe_state


def test_deeplab_init_strips_the_prefix_skips_its_classifier_and_keeps_rgb_inputs(tmp_path):
    reference = caffe_reference()
    file_state = deeplab_init_file(reference)
    kept, meta, written = imported(tmp_path, "deeplab_caffe", file_state, "deeplab_init")
    assert written["skipped"] == sorted(k.removeprefix("Scale.") for k in file_state if ".layer5." in k)
    assert (written["style"], written["normalize"]) == ("caffe", "caffe")
    model = build_model(r101("caffe"), C).eval()
    heads = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    initialise(model, tmp_path / "models/deeplab_init", kept, meta)
    # every tensor of the file, conv1 with its input channels in RGB order; the heads stay random
    file_backbone = {k.removeprefix("Scale."): v for k, v in file_state.items() if ".layer5." not in k}
    file_backbone["conv1.weight"] = file_backbone["conv1.weight"].flip(1)
    assert_loaded(model, file_backbone)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in heads.items())
    # the network on an RGB image normalised as `caffe` = the Caffe network on the BGR image minus the mean
    rgb = torch.rand(1, 3, 33, 49) * 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["caffe"])
    ours = model.backbone((rgb / 255 - mean) / std)["layer4"]
    bgr = rgb.flip(1) - torch.tensor([104.00698793, 116.66876762, 122.67891434]).view(1, 3, 1, 1)
    caffe_conv1 = torch.nn.functional.conv2d(bgr, file_state["Scale.conv1.weight"], stride=2, padding=3)
    assert torch.allclose(model.backbone.conv1((rgb / 255 - mean) / std), caffe_conv1, atol=1e-3)
    reference.conv1.weight.data.copy_(file_state["Scale.conv1.weight"])
    theirs = reference(bgr)["layer4"]
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()       # a random net: large activations


@pytest.mark.parametrize("style", ["torchvision", "caffe"])
@pytest.mark.parametrize("size, logits", [((512, 1024), (65, 129)), ((720, 1280), (91, 161))])
def test_output_size_is_the_references(style, size, logits):
    """ADVENT and BAFFT: 720x1280 -> 91x161, 512x1024 -> 65x129 logits (ceil-mode pool, output stride 8)."""
    with torch.device("meta"):
        model = build_model(r101(style), C)
        out = model(torch.empty(1, 3, *size))
    assert tuple(out.logits.shape[-2:]) == logits


def test_the_caffe_layout_puts_the_stride_on_the_first_1x1():
    caffe, torchvision_layout = (ResNetBackbone(101, (2, 4), True, "batch", style=s) for s in ("caffe", "torchvision"))
    assert (caffe.layer2[0].conv1.stride, caffe.layer2[0].conv2.stride) == ((2, 2), (1, 1))
    assert (torchvision_layout.layer2[0].conv1.stride, torchvision_layout.layer2[0].conv2.stride) == ((1, 1), (2, 2))
    assert {k: v.shape for k, v in caffe.state_dict().items()} == {k: v.shape for k, v in torchvision_layout.state_dict().items()}
    with pytest.raises(ConfigError, match="style 'caffe'.*depth 50 or 101"):
        ModelParams(depth=18, style="caffe").validate("model")


def test_simclr_file_skips_the_projection_head_and_reports_it(tmp_path):
    state = random_torchvision_resnet101()
    file_state = L.simclr_state(state)
    extra = {k: v for k, v in file_state["state_dict"].items() if k not in state or k.startswith("fc.")}
    kept, read, meta = imported(tmp_path, "simclr", file_state)
    assert meta["skipped"] == sorted(extra) and set(kept) == set(state) - {"fc.weight", "fc.bias"}
    model = build_model(r101("caffe", extra_bn=True, head="cpsl"), C)       # CPSL's KD-1 student
    initialise(model, tmp_path / "models/w", kept, read)
    assert_loaded(model, kept)


def test_weights_of_the_caffe_layout_refuse_a_torchvision_layout_model(tmp_path):
    kept, meta, _ = imported(tmp_path, "deeplab_caffe", deeplab_init_file(caffe_reference()))
    with pytest.raises(ConfigError, match=r"trained in the caffe ResNet layout.*set the recipe's model.style: caffe"):
        initialise(build_model(r101("torchvision"), C), tmp_path / "models/w", kept, meta)


def test_a_row_from_caffe_weights_needs_caffe_inputs(tmp_path, monkeypatch):
    """Before any training: the recipe must normalise as the weights were trained."""
    root = L.prepare_gta_and_cityscapes(tmp_path)
    monkeypatch.chdir(root)
    torch.save(deeplab_init_file(caffe_reference()), tmp_path / "init.pth")
    import_weights("deeplab_init", WeightsParams("deeplab_caffe", str(tmp_path / "init.pth")),
                   root / "data/models/deeplab_init")
    recipe = {"model": {"arch": "deeplabv2", "depth": 101, "style": "caffe"}, "normalize": "imagenet",
              "data": {"batch_size": 1, "crop": [8, 16], "workers": 0}, "optim": {"model": {"type": "sgd"}},
              "train": {"iters": 1}}
    params = one_row("advent_start", "source_only", recipe, "gta", "cs", start="deeplab_init",
                     weights={"deeplab_init": {"format": "deeplab_caffe", "file": str(tmp_path / "init.pth")}})
    ensure_scratch()
    with pytest.raises(ConfigError, match=r"trained on inputs normalised as 'caffe'; recipes.source_only.normalize "
                                          r"is 'imagenet' \(set it to 'caffe'\)"):
        build_training_stage(find_training_row(params, "advent_start"))


def test_a_missing_weights_file_is_one_line_naming_its_rows_and_its_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["weights"] = {"deeplab_init": {"format": "deeplab_caffe", "file": "data/pretrained/init.pth",
                                          "published": "AdaptSegNet's README (DeepLab_resnet_pretrained_init-f81d91e8.pth)"}}
    params["models"]["warmup"]["from"] = "deeplab_init"
    params["evaluate"]["models"] = {**params["models"], **params["selftrained"]}
    with pytest.raises(DataError) as err:
        check_params(params)
    assert str(err.value) == ("data/pretrained/init.pth: weights file not found (weights.deeplab_init, the start of "
                              "models.warmup; nothing is downloaded; obtain it from AdaptSegNet's README "
                              "(DeepLab_resnet_pretrained_init-f81d91e8.pth))")


def test_a_missing_file_points_at_the_torch_hub_cache_copy(tmp_path, monkeypatch):
    from lib.models.weights import missing_file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    params = WeightsParams("torchvision", "data/pretrained/resnet101-63fe2227.pth", published="torchvision")
    assert "obtain it from torchvision" in str(missing_file("imagenet_r101", params, []))
    cached = tmp_path / "torch/hub/checkpoints/resnet101-63fe2227.pth"
    cached.parent.mkdir(parents=True)
    torch.save(random_torchvision_resnet101(), cached)
    assert str(missing_file("imagenet_r101", params, [])).endswith(
        f"the torch hub cache holds {cached}: set weights.imagenet_r101.file to it)")
    kept, _, meta = imported(tmp_path, "torchvision", torch.load(cached, weights_only=True))   # and it loads
    assert meta["mapped"] == len(kept)


def test_a_trained_model_of_the_other_layout_is_refused_as_a_start(tmp_path):
    """Both ResNet layouts have the same tensor names and shapes: only the recorded style tells them apart."""
    caffe = build_model(ModelParams(arch="deeplabv2", depth=50, bn="frozen_affine", aux=False, style="caffe"), C)
    row = SimpleNamespace(where="selftrained.s1", recipe="cpsl_stage1")
    start = StageInputs(row, caffe.state_dict(), {"kind": "model", "model": {"style": "caffe"}},
                        paths=[tmp_path / "m/model.pt"])
    plain = ModelParams(arch="deeplabv2", depth=50, bn="frozen_affine", aux=False)
    with pytest.raises(ConfigError, match=r"selftrained\.s1\.from: .*m is a caffe-layout ResNet, "
                                          r"recipes\.cpsl_stage1\.model\.style is 'torchvision' \(set it to 'caffe'\)"):
        start.initialise(build_model(plain, C), plain)
    same = build_model(dataclasses.replace(plain, style="caffe"), C)
    start.initialise(same, dataclasses.replace(plain, style="caffe"))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), caffe.state_dict().values()))
