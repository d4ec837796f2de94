"""SLERP between the base and one model over each whole tensor, as mergekit 0.1.5 computes it: norms
from per-chunk norms, the dot product of the normalised chunks, linear interpolation where the two
are (anti)collinear. Chunks of 2^20 elements, float32, as mergekit's batch of one output tensor."""

from __future__ import annotations

import torch

from . import Param, register
from .whole_only import WholeInputs

CHUNK = 1024 * 1024  # mergekit's _CHUNK_ELEMENTS, over a batch of one tensor


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=torch.float32, device=v0.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape)
    n = a.shape[1]
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, s:s + CHUNK], dim=1, keepdim=True)
                                                   for s in range(0, n, CHUNK)]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, s:s + CHUNK], dim=1, keepdim=True)
                                                   for s in range(0, n, CHUNK)]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([(a[:, s:s + CHUNK] / norm_a * (b[:, s:s + CHUNK] / norm_b)).sum(dim=1, keepdim=True)
                       for s in range(0, n, CHUNK)]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in range(0, n, CHUNK):
        result[:, s:s + CHUNK] = coef_a * a[:, s:s + CHUNK] + coef_b * b[:, s:s + CHUNK]
    return result.reshape(v0.shape)


class Slerp(WholeInputs):
    name = "slerp"
    params = (Param("t", float, per_expert=False, expect="a number"),)
    experts_range = (1, 1)

    def merge(self, job, base, inputs):
        return slerp(job.params.shared["t"], base, inputs[0])


SLERP = register(Slerp())
