"""FeatCal math (spec §3.2-3.6): token-weighted statistics, the streaming fold over experts and the
closed-form solves. Plain functions on tensors, no model code.

Statistics are formed in the activations' dtype per batch (fp32 in the loop) and summed in fp64;
everything after the sums (fold, Cholesky, Cramer) is fp64. Padding rows (ω = 0) are dropped before
any product, so padding changes no statistic bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Per-expert statistics (§3.2)


def _real_rows(x: Tensor, omega: Tensor) -> tuple[Tensor, Tensor]:
    """Rows [N, k] and their weights [N] with the ω = 0 rows removed."""
    x = x.reshape(-1, x.shape[-1])
    omega = omega.reshape(-1).to(x.dtype)
    keep = omega != 0
    if bool(keep.all()):
        return x, omega
    return x[keep], omega[keep]


@dataclass
class LinearStats:
    """Σω, Σω x_s, Σω x_t, Σω x_s x_sᵀ, Σω x_s x_tᵀ for one shared Linear input and one expert.

    When the teacher equals the student (α = 0) `t` and `st` alias `s` and `ss`: nothing is computed
    twice."""
    weight: float
    s: Tensor
    t: Tensor
    ss: Tensor
    st: Tensor
    same: bool  # teacher input == student input

    @classmethod
    def zeros(cls, d: int, same: bool = False, device=None) -> "LinearStats":
        s, ss = torch.zeros(d, dtype=F64, device=device), torch.zeros(d, d, dtype=F64, device=device)
        if same:
            return cls(0.0, s, s, ss, ss, True)
        return cls(0.0, s, torch.zeros_like(s), ss, torch.zeros_like(ss), False)

    def add(self, xs: Tensor, xt: Tensor | None, omega: Tensor) -> None:
        """Add one batch: xs, xt [..., d] token rows (xt None: x_t = x_s), omega [...] token weights."""
        keep = omega.reshape(-1) != 0
        xs, w = _real_rows(xs, omega)
        wx = xs * w[:, None]
        sum_s, sum_ss = wx.sum(0).to(F64), (wx.T @ xs).to(F64)
        self.s += sum_s
        self.ss += sum_ss
        if not self.same:
            if xt is None:
                self.t += sum_s
                self.st += sum_ss
            else:
                xt = xt.reshape(-1, xt.shape[-1])
                xt = xt if bool(keep.all()) else xt[keep]
                self.t += (xt * w[:, None]).sum(0).to(F64)
                self.st += (wx.T @ xt).to(F64)
        self.weight += float(w.to(F64).sum())

    def moments(self) -> "Moments":
        if self.weight <= 0:
            raise ValueError("no tokens with positive weight were accumulated")
        k = 1.0 / self.weight
        return Moments(self.s * k, self.t * k, self.ss * k, self.st * k)


@dataclass
class Moments:
    """μ_s = E[x_s], μ_t = E[x_t], C_ss = E[x_s x_sᵀ], C_st = E[x_s x_tᵀ] (fp64)."""
    mu_s: Tensor
    mu_t: Tensor
    css: Tensor
    cst: Tensor

    def scale(self, eps: float) -> float:
        """s_i = 1/max(‖C_ss‖_F, ε_c): makes λ a relative ridge and W* blind to feature scale."""
        return 1.0 / max(float(torch.linalg.matrix_norm(self.css)), eps)


def normalize(x: Tensor, kind: str, eps: float) -> Tensor:
    """The norm's output without its affine: RMSNorm x/√(mean x²+eps), LayerNorm (x−mean)/√(var+eps)."""
    if kind == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "layernorm":
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps)
    raise ValueError(f"unknown norm kind {kind!r}")


@dataclass
class NormStats:
    """Σω, Σω z_k, Σω z_k² per channel of the merged model's normalised input (one expert)."""
    weight: float
    z: Tensor
    z2: Tensor

    @classmethod
    def zeros(cls, k: int, device=None) -> "NormStats":
        return cls(0.0, torch.zeros(k, dtype=F64, device=device), torch.zeros(k, dtype=F64, device=device))

    def add(self, x: Tensor, omega: Tensor, kind: str, eps: float) -> None:
        """x [B, S, ..., k]: every leading index beyond (B, S) is another row (q_norm/k_norm heads),
        each carrying its token's weight."""
        omega = omega.reshape(*omega.shape, *([1] * (x.dim() - 1 - omega.dim()))).expand(x.shape[:-1])
        x, w = _real_rows(x, omega)
        z = normalize(x, kind, eps)
        wz = z * w[:, None]
        self.z += wz.sum(0).to(F64)
        self.z2 += (wz * z).sum(0).to(F64)
        self.weight += float(w.to(F64).sum())

    def moments(self) -> tuple[Tensor, Tensor]:
        """(m, e) = (E[z], E[z²]) per channel."""
        if self.weight <= 0:
            raise ValueError("no tokens with positive weight were accumulated")
        return self.z / self.weight, self.z2 / self.weight


# ---------------------------------------------------------------------------------------------
# Streaming fold (§3.6): one expert's statistics are live at a time


@dataclass
class LinearSums:
    """Running sums for one shared Linear input (a group such as q/k/v) over the experts so far."""
    lhs: Tensor  # Σ s_i C_ss,i  [d, d]
    s: float = 0.0  # Σ s_i
    s_mu: Tensor | None = None  # Σ s_i μ_s,i  [d]
    rhs: dict[str, Tensor] = field(default_factory=dict)  # per module Σ s_i C_st,i W_iᵀ  [d, out]
    bias_t: dict[str, Tensor] = field(default_factory=dict)  # per module Σ s_i (b_i + W_i μ_t,i)
    experts: int = 0

    @classmethod
    def zeros(cls, d: int, device=None) -> "LinearSums":
        return cls(lhs=torch.zeros(d, d, dtype=F64, device=device), s_mu=torch.zeros(d, dtype=F64, device=device))


def fold_linear(sums: LinearSums, mom: Moments, weights: dict[str, tuple[Tensor, Tensor | None]],
                eps: float) -> float:
    """Fold expert i's moments and its weights {module: (W_i, b_i)} into the running sums; returns s_i."""
    s = mom.scale(eps)
    sums.lhs += s * mom.css
    sums.s += s
    sums.s_mu += s * mom.mu_s
    for name, (w, b) in weights.items():
        w = w.to(F64)
        rhs = s * (mom.cst @ w.T)
        bt = s * (w @ mom.mu_t + (b.to(F64) if b is not None else 0.0))
        sums.rhs[name] = sums.rhs[name] + rhs if name in sums.rhs else rhs
        sums.bias_t[name] = sums.bias_t[name] + bt if name in sums.bias_t else bt
    sums.experts += 1
    return s


@dataclass
class NormSums:
    """Running per-channel sums for one norm: Σe, Σeγ, Σm, Σmγ, Σmβ, Σβ and the expert count T."""
    e: Tensor
    eg: Tensor
    m: Tensor
    mg: Tensor
    mb: Tensor
    b: Tensor
    experts: int = 0

    @classmethod
    def zeros(cls, k: int, device=None) -> "NormSums":
        return cls(*(torch.zeros(k, dtype=F64, device=device) for _ in range(6)))


def fold_norm(sums: NormSums, m: Tensor, e: Tensor, gamma: Tensor, beta: Tensor | None = None) -> None:
    """Fold expert i's (E[z], E[z²]) and its affine (γ_i, β_i) into the running sums."""
    gamma = gamma.to(F64).reshape(-1)
    sums.e += e
    sums.eg += e * gamma
    sums.m += m
    sums.mg += m * gamma
    if beta is not None:
        beta = beta.to(F64).reshape(-1)
        sums.mb += m * beta
        sums.b += beta
    sums.experts += 1


# ---------------------------------------------------------------------------------------------
# Solves


def anchor(merged: Tensor, base: Tensor, rho: float) -> Tensor:
    """ρ θ_m + (1−ρ) θ₀ in fp64: ρ > 1 extrapolates the merge away from the base."""
    return rho * merged.to(F64) + (1.0 - rho) * base.to(F64)


def spd_solver(lhs: Tensor):
    """Factor an SPD matrix once; returns solve(R) = lhs⁻¹ R. Cholesky in fp64, with the reference's
    pseudo-inverse fallback when the factorisation fails (numerically indefinite)."""
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0 and bool(torch.isfinite(chol).all()):
        return lambda r: torch.cholesky_solve(r, chol)
    pinv = torch.linalg.pinv(lhs, hermitian=True)
    return lambda r: pinv @ r


def solve_linear(sums: LinearSums, anchors: dict[str, tuple[Tensor, Tensor | None]], lam: float,
                 eps: float) -> dict[str, tuple[Tensor, Tensor | None]]:
    """W* = ((LHS + (λ+ε_c)I)⁻¹ (RHS + λAᵀ))ᵀ for every module of the group, one factorisation;
    b* (§3.4) where an anchor bias is given (None: the bias is not calibrated)."""
    d = sums.lhs.shape[0]
    solve = spd_solver(sums.lhs + (lam + eps) * torch.eye(d, dtype=F64, device=sums.lhs.device))
    out = {}
    for name, (a_w, a_b) in anchors.items():
        a_w = a_w.to(F64)
        w = solve(sums.rhs[name] + lam * a_w.T).T.contiguous()
        b = None
        if a_b is not None:
            b = (sums.bias_t[name] - w @ sums.s_mu + lam * a_b.to(F64)) / (sums.s + lam)
        out[name] = (w, b)
    return out


def solve_rmsnorm(sums: NormSums, a_gamma: Tensor, lam: float, eps: float) -> Tensor:
    """γ*_k = (Σ e_k γ_k + λ a_k) / (Σ e_k + λ); ε_c keeps an all-zero channel at a finite value."""
    a = a_gamma.to(F64).reshape(-1)
    return (sums.eg + lam * a) / torch.clamp(sums.e + lam, min=eps)


def solve_layernorm(sums: NormSums, a_gamma: Tensor, a_beta: Tensor, lam: float,
                    eps: float) -> tuple[Tensor, Tensor]:
    """Per channel 2×2 system [Σe+λ, Σm; Σm, T+λ][γ; β] = r by Cramer's rule, det clamped to ≥ ε_c."""
    ag, ab = a_gamma.to(F64).reshape(-1), a_beta.to(F64).reshape(-1)
    a11, a12, a22 = sums.e + lam, sums.m, sums.experts + lam
    r1 = sums.eg + sums.mb + lam * ag
    r2 = sums.mg + sums.b + lam * ab
    det = torch.clamp(a11 * a22 - a12 * a12, min=eps)
    return (r1 * a22 - a12 * r2) / det, (a11 * r2 - a12 * r1) / det
