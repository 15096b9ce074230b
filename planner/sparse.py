"""Sparse linear layers that a kernel actually exploits, for timing sparse options and running sparse plans.

CPU: compressed sparse rows (torch's CSR matmul). On the 2-core x86 CPU this project was built on it only
beats the dense GEMM at high sparsity (see benchmarks/bench_sparse_kernels.py), which the profile records as
measured. CUDA: 2:4 semi-structured sparsity (`torch.sparse.to_sparse_semi_structured`, Ampere or newer).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

KERNELS = ("csr", "2:4")


def kernel_for(device: str) -> str:
    return "2:4" if device == "cuda" else "csr"


class SparseLinear(nn.Module):
    """y = x W^T + b with W held in a sparse format; W (out, in) is given dense (its zeros are the sparsity)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "csr"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        if kernel == "csr":
            with warnings.catch_warnings():                  # "CSR support is in beta": said once per layer
                warnings.simplefilter("ignore", UserWarning)
                self.weight = w.to_sparse_csr()              # (out, in), nnz values
        else:
            from torch.sparse import to_sparse_semi_structured
            self.weight = to_sparse_semi_structured(w.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                 # (N, in)
        if self.kernel == "csr":
            y = (self.weight @ x2.T).T                       # CSR (out, in) @ (in, N): the fast CPU path
        else:
            y = nn.functional.linear(x2, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    @property
    def density(self) -> float:
        nnz = self.weight._nnz() if self.kernel == "csr" else self.out_features * self.in_features // 2
        return nnz / (self.out_features * self.in_features)


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


def sparse_like(lin: nn.Linear, level, kernel: str, generator: torch.Generator | None = None) -> SparseLinear:
    """A SparseLinear of `lin`'s shape at `level` (a sparsity for CSR, "2:4" for semi-structured)."""
    w = lin.weight.detach()
    mask = two_four_mask(w.shape) if kernel == "2:4" else random_mask(w.shape, float(level), generator)
    return SparseLinear(w * mask.to(w.device), lin.bias, kernel)
