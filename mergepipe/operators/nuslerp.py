"""NuSLERP, as mergekit 0.1.5 computes it: two models' spherical interpolation at t = w_1 / (w_0 + w_1),
over the flattened tensor (default), each row, or each column; with a base, of the two deltas, added
to it. Without a base_model the first model is read as the base and is also expert 0."""

from __future__ import annotations

import torch

from . import Param, register
from .whole_only import WholeInputs, is_base


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
            flatten: bool = False) -> torch.Tensor:
    out_shape = v0.shape

    def normalize(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u, v1_u = normalize(v0), normalize(v1)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


class NuSlerp(WholeInputs):
    name = "nuslerp"
    params = (
        Param("weight", float, per_expert=True, expect="a number"),
        Param("nuslerp_row_wise", bool, per_expert=False, default=False, expect="true or false"),
        Param("nuslerp_flatten", bool, per_expert=False, default=True, expect="true or false"),
    )
    base_policy = "optional"
    experts_range = (2, 2)

    def merge(self, job, base, inputs):
        shared, weights = job.params.shared, job.params.weights()
        total = sum(weights)
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        dim, flatten = (0 if shared["nuslerp_row_wise"] else -1), shared["nuslerp_flatten"]
        if is_base(job, 0):  # no base_model: the two models themselves
            return nuslerp(t, inputs[0], inputs[1], dim=dim, flatten=flatten)
        return base + nuslerp(t, inputs[0] - base, inputs[1] - base, dim=dim, flatten=flatten)


NUSLERP = register(NuSlerp())
