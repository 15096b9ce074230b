"""Unstructured and N:M sparsification of ONE linear layer with the OBS update (SparseGPT, arXiv 2301.00774).

A linear layer computes ``y = W x`` with ``W`` (d_out, d_in); calibration inputs give
``H = 2/n sum x x^T`` (d_in, d_in) and the layer-wise objective ``||W X - W_hat X||^2``.
SparseGPT visits the input columns left to right. When column j is fixed (its pruned
entries set to 0), the error it leaves, ``(w_j - q_j) / [Hinv]_jj``, is spread over the
not-yet-visited columns through row j of the upper Cholesky factor of ``Hd^-1``
(``Hd = H + damp * mean(diag H) * I``), which is the OBS update restricted to the
columns that can still move. Work goes in lazy blocks of ``block`` columns: inside a
block the update is applied column by column, to the rest of the matrix once per block.
The mask is chosen per block (adaptive mask selection): the ``sparsity`` share of the
block's weights with the smallest ``w^2 / [Hinv]_jj^2``; for N:M, in every run of m
consecutive columns each row keeps the n weights with the largest saliency.

This module knows nothing about models; everything runs in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .obs import dampen, layer_error

__all__ = ["sparsegpt", "magnitude_prune", "sparsity_of", "levels"]

_F64 = torch.float64


def _check(W: Tensor, H: Tensor, sparsity: float, nm: tuple[int, int] | None) -> None:
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be (d_out, d_in) and H (d_in, d_in); got {tuple(W.shape)} and {tuple(H.shape)}")
    if nm is not None:
        n, m = nm
        if not (0 < n < m) or W.shape[1] % m:
            raise ValueError(f"N:M needs 0 < n < m and d_in divisible by m; got {n}:{m}, d_in={W.shape[1]}")
    elif not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


@torch.no_grad()
def sparsegpt(W: Tensor, H: Tensor, sparsity: float = 0.0, nm: tuple[int, int] | None = None, block: int = 128,
              damp: float = 0.01) -> Tensor:
    """Sparsified and OBS-corrected weights (d_out, d_in), float64.

    sparsity: share of weights set to zero (unstructured), exact per block of columns.
    nm=(n, m): instead, at most n non-zeros in every m consecutive inputs of each row (2:4 = 50%).
    """
    _check(W, H, sparsity, nm)
    dev = W.device
    W = W.detach().to(dev, _F64).clone()                    # (d_out, d_in)
    H = H.detach().to(dev, _F64).clone()                    # (d_in, d_in)
    dead = torch.diagonal(H) == 0                           # inputs that never fire: their weights are free
    W[:, dead] = 0.0
    H[dead, dead] = 1.0
    Hd = dampen(H, damp)
    # upper Cholesky factor U of Hd^-1 (Hd^-1 = U^T U): row j of U is the OBS update for column j given that
    # columns < j are fixed, scaled by U_jj = sqrt([Hinv]_jj) of the shrinking inverse
    L = torch.linalg.cholesky(Hd)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)   # (d_in, d_in)
    d_out, d_in = W.shape
    if nm is None and sparsity == 0.0:
        return W
    for i1 in range(0, d_in, block):
        i2 = min(i1 + block, d_in)
        W1 = W[:, i1:i2].clone()                            # (d_out, b) the block being fixed
        U1 = U[i1:i2, i1:i2]                                # (b, b)
        d1 = torch.diagonal(U1)                             # (b,)
        Err1 = torch.zeros_like(W1)
        if nm is None:
            sal = W1 ** 2 / d1[None, :] ** 2                # OBS saliency of each weight
            k = int(round(sparsity * sal.numel()))
            prune = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                prune.view(-1)[torch.topk(sal.view(-1), k, largest=False).indices] = True
        else:
            prune = torch.zeros_like(W1, dtype=torch.bool)
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                sal = W1[:, j:j + m] ** 2 / d1[None, j:j + m] ** 2          # (d_out, m) with updates so far
                prune.scatter_(1, j + torch.topk(sal, m - n, dim=1, largest=False).indices, True)
            w = W1[:, j]
            q = torch.where(prune[:, j], torch.zeros_like(w), w)
            err = (w - q) / d1[j]                            # (d_out,)
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            W1[:, j] = q                                     # exactly zero where pruned
            Err1[:, j] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]                   # the block's errors, onto the later columns at once
    return W


@torch.no_grad()
def magnitude_prune(W: Tensor, sparsity: float = 0.0, nm: tuple[int, int] | None = None) -> Tensor:
    """The baseline: zero the smallest |w| of the whole matrix (or per row in every m inputs for N:M); float64."""
    _check(W, torch.empty(W.shape[1], W.shape[1]), sparsity, nm)
    W = W.detach().to(_F64).clone()
    if nm is not None:
        n, m = nm
        g = W.abs().view(W.shape[0], -1, m)                   # (d_out, d_in/m, m)
        drop = torch.topk(g, m - n, dim=2, largest=False).indices
        W.view(W.shape[0], -1, m).scatter_(2, drop, 0.0)
        return W
    k = int(round(sparsity * W.numel()))
    if k:
        W.view(-1)[torch.topk(W.abs().view(-1), k, largest=False).indices] = 0.0
    return W


def sparsity_of(W: Tensor) -> float:
    return float((W == 0).sum()) / W.numel()


@torch.no_grad()
def levels(W: Tensor, H: Tensor, sparsities: list[float], nm: list[tuple[int, int]] = (), block: int = 128,
           damp: float = 0.01, H_eval: Tensor | None = None) -> dict:
    """Every level of one layer from its Hessian: {level: (weights, error)} where level is a sparsity (float)
    or an "n:m" string, and error = mean ||(W - W_hat) x||^2 on H_eval (default: H)."""
    H_eval = H if H_eval is None else H_eval
    out = {}
    for s in sparsities:
        Wh = sparsegpt(W, H, s, None, block, damp)
        out[float(s)] = (Wh, layer_error(W, Wh, H_eval))
    for n, m in nm:
        Wh = sparsegpt(W, H, 0.0, (n, m), block, damp)
        out[f"{n}:{m}"] = (Wh, layer_error(W, Wh, H_eval))
    return out
