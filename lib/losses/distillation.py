"""The KD loss of CPSL/ProDA stages 2 and 3 (the released code: lslrh/CPSL, microsoft/ProDA), in both
forms.

- ``released``: what the released code computes, PyTorch's ``kl_div`` fed *probabilities* where
  it expects log-probabilities: (1 / (N K H W)) sum t (log t - p), with t = softmax(teacher) and
  p = softmax(student).  It is always negative (t log t <= 0 and -t p <= 0), matching the
  -0.02 ... -0.04 of the released logs, and its gradient raises sum_k t_k p_k.  Reproducing the
  released numbers needs this form (the ProDA authors confirm it should have been log_softmax).
- ``kl``: the intended KL(t || softmax(student)) summed over classes, averaged over pixels.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KD_FORMS = ("released", "kl")


def kd_released(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    t = teacher_logits.float().softmax(dim=1)
    p = student_logits.float().softmax(dim=1)
    return (t * (t.clamp_min(1e-12).log() - p)).mean()


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    t = teacher_logits.float().softmax(dim=1)
    logp = F.log_softmax(student_logits.float(), dim=1)
    return (t * (t.clamp_min(1e-12).log() - logp)).sum(dim=1).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            form: Literal["released", "kl"]) -> torch.Tensor:
    if form == "released":
        return kd_released(student_logits, teacher_logits)
    if form == "kl":
        return kd_kl(student_logits, teacher_logits)
    raise ValueError(f"unknown KD form {form!r} (known: {', '.join(KD_FORMS)})")
