"""Model Stock (arXiv 2403.19522), as mergekit 0.1.5 computes it: the mean pairwise cosine of the
deltas (over the whole tensor, or per row with filter_wise) sets how far the models' average moves
from the base."""

from __future__ import annotations

import torch

from . import Param, register
from .whole_only import WholeInputs


def model_stock(w_0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w_0, ws = w_0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate there: keep the base
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


class ModelStock(WholeInputs):
    name = "model_stock"
    params = (Param("filter_wise", bool, per_expert=False, default=False, expect="true or false"),)
    experts_range = (2, None)

    def merge(self, job, base, inputs):
        return model_stock(base, inputs, job.params.shared["filter_wise"])


MODEL_STOCK = register(ModelStock())
