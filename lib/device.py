"""Where and in which arithmetic a run computes: CUDA when present, else the CPU; bf16 autocast
where the hardware computes bf16 natively, else fp32.

``precision: bf16`` (training, evaluation, pseudo-labelling) asks for ``torch.autocast`` with
bfloat16.  It is applied on a CUDA device that supports bf16 and on a CPU with native bf16
instructions (AVX512-BF16 or AMX, e.g. AMD Zen 4, Intel Sapphire Rapids), where oneDNN runs the
convolutions about twice as fast as fp32 (bench/precision.py).  Anywhere else bf16 would be
emulated, i.e. slower than fp32, so the run falls back to fp32.  ``effective`` is what a run
actually used; it is recorded in every provenance block (lib.provenance), so two results
made in different arithmetic can be told apart.  ``fp32`` always means fp32.
"""
from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("fp32", "bf16")


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# oneDNN's instruction-set levels below its first with native bf16 (AVX512_CORE_BF16): a process
# started with ``ONEDNN_MAX_CPU_ISA`` at one of them (or ``DNNL_MAX_CPU_ISA``, its older name) runs
# bf16 emulated, as a CPU without the instructions would, so it falls back to fp32 as well.  This is
# also how an AVX2-only machine is reproduced on a bf16-capable one (bench/README.md).
ISA_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def onednn_isa_cap() -> str | None:
    """The instruction-set cap this process gave oneDNN, upper-cased (None: none set)."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip() else None


def cpu_has_native_bf16() -> bool:
    """The CPU executes bf16 natively (AVX512-BF16 or AMX tiles), as oneDNN's bf16 kernels need, and
    oneDNN is not capped below the instruction set that has them."""
    if onednn_isa_cap() in ISA_WITHOUT_BF16:
        return False
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe() for probe in probes if probe is not None)


def native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def effective(requested: str, device: torch.device | str) -> str:
    """The arithmetic a run with ``precision: requested`` uses on ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{requested}'")
    return "bf16" if requested == "bf16" and native_bf16(device) else "fp32"


def autocast(requested: str, device: torch.device | str):
    """The context a forward pass runs in: bf16 autocast when ``effective`` says so, else nothing."""
    device = torch.device(device)
    if effective(requested, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
