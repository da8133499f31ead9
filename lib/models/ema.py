"""Exponential moving averages of a network (mean teachers: CPSL stage 1, DACS/CISS)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, copy_buffers: bool = True) -> None:
    """theta_bar <- m theta_bar + (1 - m) theta for every parameter the two share by name.

    Buffers (BatchNorm running statistics) are copied from the student, as CPSL's released
    code does (lslrh/CPSL); ``copy_buffers=False`` averages floating buffers like parameters instead.
    Parameters only the teacher has (none here) or only the student has (CPSL's extra BN) are left.
    """
    student_params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        if name in student_params:
            p.mul_(momentum).add_(student_params[name].detach(), alpha=1.0 - momentum)
    student_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        if name not in student_buffers:
            continue
        source = student_buffers[name]
        if copy_buffers or not b.is_floating_point():
            b.copy_(source)
        else:
            b.mul_(momentum).add_(source, alpha=1.0 - momentum)


def warmup_momentum(t: int, maximum: float) -> float:
    """DACS's mean-teacher momentum at iteration t: alpha_t = min(1 - 1/(t+1), maximum)
    (Tranheden et al., WACV 2021; as in the released code, SysCV/CISS).

    alpha_0 = 0 (the teacher is a copy of the student), alpha_1 = 1/2, ..., so early on the teacher is
    the plain average of the students so far, until the cap (DACS 0.99, DAFormer/CISS 0.999) takes over.
    """
    if t < 0:
        raise ValueError(f"iteration must be >= 0, got {t}")
    return min(1.0 - 1.0 / (t + 1), maximum)
