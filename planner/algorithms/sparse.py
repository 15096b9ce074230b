"""Sparse linear layers that a kernel actually exploits, for timing sparse options and running sparse plans.

CPU: compressed sparse rows (torch's CSR matmul). On the 2-core x86 CPU this project was built on it only
beats the dense GEMM at high sparsity (see benchmarks/bench_sparse_kernels.py), which the profile records as
measured. CUDA: 2:4 semi-structured sparsity (`torch.sparse.to_sparse_semi_structured`, Ampere or newer).
"""
from __future__ import annotations

import torch
from torch import nn

# the portable CSR layer lives in the file copied next to saved weights (no planner import there)
from ..adapters.remote.planner_common import PlannerCsrLinear as CsrLinear
from ..adapters.remote.planner_common import csr_like

KERNELS = ("csr", "2:4")


def kernel_for(device: str) -> str:
    return "2:4" if device == "cuda" else "csr"


class SparseLinear(nn.Module):
    """y = x W^T + b with W (out, in) held in 2:4 semi-structured form (CUDA). CSR layers use the portable
    `CsrLinear` that saved checkpoints load into, so the profile times exactly what a user runs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "2:4"):
        super().__init__()
        if kernel != "2:4":
            raise ValueError(f"SparseLinear is the 2:4 kernel; use CsrLinear for csr (got kernel {kernel!r})")
        from torch.sparse import to_sparse_semi_structured
        self.kernel = kernel
        self.out_features, self.in_features = weight.shape
        self.weight = to_sparse_semi_structured(weight.detach().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = nn.functional.linear(x.reshape(-1, self.in_features), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def random_mask(shape, sparsity: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean keep-mask with exactly round((1 - sparsity) * numel) True entries, spread at random (latency
    depends on the number of non-zeros, not on which)."""
    n = shape[0] * shape[1]
    keep = n - int(round(sparsity * n))
    m = torch.zeros(n, dtype=torch.bool)
    m[torch.randperm(n, generator=generator)[:keep]] = True
    return m.view(shape)


def two_four_mask(shape) -> torch.Tensor:
    """Keep 2 of every 4 consecutive inputs (the first two; timing only)."""
    m = torch.zeros(shape, dtype=torch.bool)
    m.view(shape[0], -1, 4)[:, :, :2] = True
    return m


def sparse_like(lin: nn.Linear, level, kernel: str, generator: torch.Generator | None = None) -> nn.Module:
    """A sparse layer of `lin`'s shape at `level` (a sparsity for CSR, "2:4" semi-structured), random mask."""
    w = lin.weight.detach()
    if kernel == "2:4":
        return SparseLinear(w * two_four_mask(w.shape).to(w.device), lin.bias, "2:4")
    if kernel != "csr":
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return csr_like(lin, float(level), w * random_mask(w.shape, float(level), generator).to(w.device))


def density(layer: nn.Module) -> float:
    w = layer.weight
    if isinstance(layer, CsrLinear):
        return float((w != 0).sum()) / w.numel()
    return 0.5 if getattr(layer, "kernel", None) == "2:4" else float((w != 0).sum()) / w.numel()
