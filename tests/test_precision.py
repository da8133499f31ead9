"""Precision: bf16 autocast where the device computes bf16 natively, fp32 elsewhere; recorded as used."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lib import device
from lib.config import parse
from lib.errors import ConfigError
from lib.infer.inference import predict_logits
from lib.infer.params import InferenceParams
from lib.methods.source_only import SourceOnly, SourceOnlyParams
from lib.models.output import SegOutput
from lib.train.loop import TrainParams, train
from lib.train.optim import OptimizerParams, ScheduleParams
from tests.test_engine import TinySeg, stream


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-bf16"])
def native(request, monkeypatch):
    """Run the test as on a CPU with and without native bf16 (the probe is the only CPU-specific part)."""
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_effective_precision(native):
    assert device.effective("fp32", "cpu") == "fp32"
    assert device.effective("bf16", "cpu") == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        device.effective("fp16", "cpu")


@pytest.mark.parametrize("variable", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_a_onednn_cap_below_bf16_means_no_native_bf16(monkeypatch, variable):
    """A process whose oneDNN is capped below AVX512_CORE_BF16 computes bf16 emulated: fp32 is used,
    whatever the CPU has; a cap at or above it leaves the CPU's own answer."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert device.cpu_has_native_bf16()
    for isa in ("AVX2", "avx2", " AVX512_CORE_VNNI ", "SSE41"):
        monkeypatch.setenv(variable, isa)
        assert not device.cpu_has_native_bf16(), isa
        assert device.effective("bf16", "cpu") == "fp32"
    for isa in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "ALL", ""):
        monkeypatch.setenv(variable, isa)
        assert device.cpu_has_native_bf16(), isa


def test_cuda_follows_the_device_capability(monkeypatch):
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert device.effective("bf16", "cuda") == ("bf16" if supported else "fp32")
    assert device.effective("fp32", torch.device("cuda")) == "fp32"


def test_autocast_runs_convolutions_in_bf16_only_where_native(native):
    conv = nn.Conv2d(3, 4, 3)
    with device.autocast("bf16", "cpu"):
        out = conv(torch.randn(1, 3, 8, 8))
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
    with device.autocast("fp32", "cpu"):
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32


class ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 5, 1))

    def forward(self, x):
        return SegOutput(logits=self.body(x))


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_bf16_inference_returns_float32_logits_close_to_fp32(native, mode):
    model = ConvModel().eval()
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    kwargs = {"mode": mode, "window": (8, 8), "stride": (4, 4)} if mode == "slide" else {}
    full = predict_logits(model, x, (16, 24), precision="fp32", **kwargs)
    half = predict_logits(model, x, (16, 24), precision="bf16", **kwargs)
    assert half.dtype == torch.float32 and half.shape == full.shape
    if native:
        assert not torch.equal(half, full)                  # the bf16 path really ran
        torch.testing.assert_close(half, full, atol=0.05, rtol=0.02)
        assert (half.argmax(1) == full.argmax(1)).float().mean() > 0.95
    else:
        assert torch.equal(half, full)                      # fell back to fp32


def test_inference_precision_is_validated():
    assert parse(InferenceParams, {"precision": "bf16"}, "evaluate.inference").precision == "bf16"
    with pytest.raises(ConfigError, match="evaluate.inference.precision"):
        parse(InferenceParams, {"precision": "half"}, "evaluate.inference")
    with pytest.raises(ValueError, match="precision must be one of"):
        predict_logits(ConvModel().eval(), torch.zeros(1, 3, 4, 4), (4, 4), precision="half")


def test_training_step_runs_under_the_effective_autocast(native, tmp_path):
    """The loop hands the method bf16 activations exactly when the run is recorded as bf16."""
    seen = []

    class Probe(SourceOnly):
        def training_step(self, batch, it):
            seen.append(self.model.backbone[0](batch["source"]["image"]).dtype)
            return super().training_step(batch, it)

    torch.manual_seed(0)
    method = Probe(TinySeg(), SourceOnlyParams(aux_weight=0.4))
    train(method, {"source": stream(1)}, TrainParams(iters=3, checkpoint_every=3, log_every=1, precision="bf16"),
          {"model": OptimizerParams(type="sgd", lr=0.05)}, ScheduleParams(power=0.9), tmp_path / "ckpt",
          tmp_path / "live", "f")
    assert seen == [torch.bfloat16 if native else torch.float32] * 3
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in method.model.parameters())
