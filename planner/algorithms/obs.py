"""Structured Optimal Brain Surgeon (ZipLM / OBC style) on ONE linear layer.

A linear "consumer" layer computes ``y = W x`` with ``W`` of shape ``(d_out, d_in)``.
We prune *groups* of ``group_size`` adjacent input columns (an attention head is
``d_head`` columns of the attention output projection, an FFN neuron is one column
of the down projection).  The layer-wise objective is the output error
``||W X - W_hat X||^2`` over calibration inputs ``X`` whose Hessian is
``H = 2/n sum x x^T``; OBS works with the dampened ``Hd = H + lambda I``,
``lambda = damp * mean(diag H)``.

One greedy pass of :func:`group_obs` produces every sparsity level at once: the
removal order, the cumulative loss per level and (on request) the updated weights
at chosen levels.  After removing any set of groups the weights equal the
least-squares optimum on the kept columns under ``Hd`` (see :func:`reconstruct`).

Implementation notes (speed on small CPUs):

* The inverse-Hessian / weight downdates are *deferred*: after ``t`` removals since
  the last flush ``Hinv_t = Hb - U U^T`` and ``W_t = Wb - Z U^T`` where ``Hb``/``Wb``
  are the base matrices and ``U``/``Z`` collect one (scaled) factor per removal.
  Only the quantities the greedy scoring needs (diagonal blocks of ``Hinv_t`` and
  the per-group Gram blocks ``W_Q^T W_Q``) are updated each step; every ``block``
  columns the factors are folded into the bases with one GEMM and the bases are
  compacted to the still-active columns, so the cost shrinks as columns go.
* Everything runs in float64.  The diagonal of ``Hinv_t`` is bounded below by
  ``1/diag(Hd)`` (for an SPD matrix ``(A^-1)_jj >= 1/A_jj``); that bound is used as
  a floor, and small group pivots are factored with an eigenvalue-clamped fallback,
  so late, ill-conditioned steps never produce NaN.

This module knows nothing about models.
"""

from __future__ import annotations

import bisect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor

__all__ = [
    "HessianAccumulator",
    "dampen",
    "damping",
    "GroupOBSResult",
    "group_obs",
    "reconstruct",
    "reconstruct_cross",
    "reconstruct_cross_kept",
    "layer_error",
    "output_energy",
    "ErrorMeter",
    "magnitude_order",
]

_F64 = torch.float64
_PER_STEP_SPAN = 128  # a multi-column step removes at most 1/256 of the columns still alive


# --------------------------------------------------------------------------- Hessian


class HessianAccumulator:
    """Accumulate ``H = 2/n sum x x^T`` over calibration tokens.

    SparseGPT-style life cycle: call :meth:`add_batch` many times, then
    :meth:`hessian`.  A running mean is kept (``H_mean = 1/n sum x x^T``) so the
    accumulator stays well scaled for any number of tokens.  float64 by default.
    """

    def __init__(self, d_in: int, device="cpu", dtype=torch.float64, compute_dtype=None):
        self.d_in = int(d_in)
        self.device = torch.device(device)
        self.dtype = dtype
        # the per-batch product x^T x may run in a lower precision than the running mean (float32: half the time
        # of float64 on a CPU, and one batch's sum is short enough for it)
        self.compute_dtype = compute_dtype or dtype
        self.n: int = 0  # tokens seen
        self._mean = torch.zeros(self.d_in, self.d_in, device=self.device, dtype=dtype)  # (d_in, d_in)

    @torch.no_grad()
    def add_batch(self, x: Tensor, mask: Tensor | None = None) -> None:
        """x: (..., d_in); mask: (...) bool, True = real token (padding excluded)."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"expected last dim {self.d_in}, got shape {tuple(x.shape)}")
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} does not match x shape {tuple(x.shape[:-1])}"
                )
            m = mask.reshape(-1).to(device=x.device).bool()
            x = x.reshape(-1, self.d_in)[m]  # (t, d_in)
        else:
            x = x.reshape(-1, self.d_in)  # (t, d_in)
        t = x.shape[0]
        if t == 0:
            return
        x = x.detach().to(device=self.device, dtype=self.compute_dtype)
        n_new = self.n + t
        # mean <- mean * n/(n+t) + x^T x / (n+t)
        if self.compute_dtype == self.dtype:
            self._mean.mul_(self.n / n_new).addmm_(x.T, x, alpha=1.0 / n_new)
        else:
            self._mean.mul_(self.n / n_new).add_((x.T @ x).to(self.dtype), alpha=1.0 / n_new)
        self.n = n_new

    def hessian(self) -> Tensor:
        """(d_in, d_in) = 2/n sum x x^T (a new tensor)."""
        if self.n == 0:
            raise ValueError("no calibration tokens were added to the HessianAccumulator")
        return 2.0 * self._mean


def dampen(H: Tensor, damp: float = 0.01) -> Tensor:
    """Return ``H + damp * mean(diag H) * I`` (a new tensor; ``H`` is not modified).

    If the mean diagonal is not positive (all inputs dead) ``lambda = 1e-8`` is used.
    Dead inputs (diag 0) receive the same damping as all others.
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got {tuple(H.shape)}")
    Hd = H.clone()
    torch.diagonal(Hd).add_(_damp_lambda(H, damp))
    return Hd


def _damp_lambda(H: Tensor, damp: float) -> float:
    """The lambda :func:`dampen` adds: damp * mean(diag H), or 1e-8 if that mean is not > 0."""
    diag = torch.diagonal(H)
    return damping(float(diag.mean()) if diag.numel() else 0.0, damp)


def damping(mean_diag: float, damp: float) -> float:
    """The lambda :func:`dampen` adds to a Hessian whose diagonal has this mean."""
    return damp * mean_diag if (mean_diag > 0 and mean_diag < float("inf")) else 1e-8


# --------------------------------------------------------------------------- helpers


def _spd_inverse(A: Tensor) -> Tensor:
    """Inverse of a symmetric positive (semi)definite matrix, robust to near singularity. Only A's lower
    triangle is read (symmetrising a wide float64 matrix twice cost as much as its Cholesky factor)."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        A = 0.5 * (A + A.T)
        scale = float(torch.diagonal(A).abs().mean()) or 1.0
        eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        for e in range(-12, -2):
            L, info = torch.linalg.cholesky_ex(A + (scale * 10.0**e) * eye)
            if int(info) == 0:
                break
        else:
            return torch.linalg.pinv(A, hermitian=True)
    return torch.cholesky_inverse(L)  # symmetric: both triangles are written


def _spd_chol(A: Tensor, floor: Tensor) -> Tensor:
    """Lower Cholesky factor of SPD (..., g, g) blocks; blocks that fail are replaced by
    their eigenvalue-clamped version (eigenvalues >= floor (...,), and >= 1e-12 max eig)."""
    A = 0.5 * (A + A.mT)
    L, info = torch.linalg.cholesky_ex(A)
    bad = info != 0
    if bool(bad.any()):
        Ab = A[bad]
        evals, evecs = torch.linalg.eigh(Ab)
        fl = torch.maximum(floor.expand(A.shape[:-2])[bad], 1e-12 * evals.abs().amax(-1))
        evals = torch.maximum(evals, fl.unsqueeze(-1))
        Ab = (evecs * evals.unsqueeze(-2)) @ evecs.mT
        Lb, _ = torch.linalg.cholesky_ex(0.5 * (Ab + Ab.mT))
        L = L.clone()
        L[bad] = Lb
    return L


def _as_f64(t: Tensor, device) -> Tensor:
    return t.detach().to(device=device, dtype=_F64)


@contextmanager
def _no_tf32():
    """TF32 off inside (CUDA matmuls would otherwise round float32 inputs to 10 mantissa bits)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# --------------------------------------------------------------------------- result


@dataclass
class GroupOBSResult:
    """Output of :func:`group_obs`.

    order:     (n_groups,) int64, group indices in removal order (first removed first)
    loss:      (n_groups+1,) float64, ``loss[i]`` = cumulative OBS loss (sum err/2) after
               removing ``i`` groups; ``loss[0] = 0``.  Equals the per-token output error
               ``layer_error(W, W_hat, dampen(H))`` at that level.
    snapshots: n_kept -> full-size W_hat (d_out, d_in) (removed columns zero), only for the
               requested levels; dtype and device of the input ``W``.
    """

    order: torch.LongTensor
    loss: torch.Tensor
    snapshots: dict[int, Tensor] = field(default_factory=dict)

    @property
    def n_groups(self) -> int:
        return int(self.order.numel())

    def _check(self, n_kept: int) -> int:
        n_kept = int(n_kept)
        if not 0 <= n_kept <= self.n_groups:
            raise ValueError(f"n_kept must be in [0, {self.n_groups}], got {n_kept}")
        return n_kept

    def kept_groups(self, n_kept: int) -> torch.LongTensor:
        """(n_kept,) sorted indices of the groups kept when ``n_kept`` groups remain."""
        n_kept = self._check(n_kept)
        kept = self.order[self.n_groups - n_kept :]
        return torch.sort(kept).values

    def kept_columns(self, n_kept: int, group_size: int) -> torch.LongTensor:
        """(n_kept * group_size,) sorted column indices kept at that level."""
        g = self.kept_groups(n_kept)
        ar = torch.arange(group_size, dtype=torch.long)
        return (g.unsqueeze(1) * group_size + ar).reshape(-1)


# --------------------------------------------------------------------------- OBS


@torch.no_grad()
@_no_tf32()
def group_obs(
    W: Tensor,
    H: Tensor,
    group_size: int = 1,
    damp: float = 0.01,
    snapshot_levels: Iterable[int] = (),
    device=None,
    *,
    on_snapshot=None,
    on_kept=None,
    block: int = 128,
    dtype: torch.dtype = _F64,
    inverse_dtype: torch.dtype | None = None,
    per_step: int = 1,
    _force_general: bool = False,
) -> GroupOBSResult:
    """Greedy group OBS over all levels in one pass.

    W: (d_out, d_in) weights of the consumer layer.  H: (d_in, d_in) *undampened*
    Hessian ``2/n sum x x^T``.  ``d_in % group_size == 0``.  Works in float64 on
    ``device`` (default: ``W.device``); does not modify its inputs.
    ``snapshot_levels``: numbers of kept groups at which to return the updated W.
    ``on_snapshot(n_kept, W_hat)``: if given, called at each snapshot level instead of keeping the
    snapshot (a large layer at many levels would not fit in memory: 176 levels of a 2048 x 5632 FFN are 16 GB).
    ``on_kept(n_kept, cols, W_S_T)``: instead, the kept columns (s,) and their weights transposed (s, d_out),
    in the pass's dtype, never scattered to full size (scoring a wide layer at every level that way saved a
    tenth of its database time).
    ``block``: number of columns of deferred updates between flushes (tuning knob).
    ``dtype``: precision of the greedy pass; float32 halves the memory traffic of the per-step matrix-vector
    products that dominate on large layers (tests/test_obs.py and benchmarks/bench_obs_precision.py measure what
    float32 changes against the float64 pass). ``inverse_dtype`` (default ``dtype``): precision of the damped
    inverse; a float32 Cholesky that fails falls back to float64.
    ``per_step``: with group_size 1, remove up to this many columns per greedy step while at least
    ``per_step * 256`` remain (one column per step below that, where the choice matters most). Each step reads
    the whole weight matrix once, so on a wide FFN this divides the dominant memory traffic; 1 = exact greedy.
    """
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D, got {tuple(W.shape)}")
    d_out, d_in = W.shape
    if tuple(H.shape) != (d_in, d_in):
        raise ValueError(f"H must be ({d_in}, {d_in}), got {tuple(H.shape)}")
    g = int(group_size)
    if g < 1 or d_in % g != 0:
        raise ValueError(f"d_in={d_in} is not divisible by group_size={group_size}")
    n_groups = d_in // g
    dev = torch.device(device) if device is not None else W.device
    out_dtype = W.dtype if W.is_floating_point() else _F64
    levels = sorted({int(x) for x in snapshot_levels})
    for lv in levels:
        if not 0 <= lv <= n_groups:
            raise ValueError(f"snapshot level {lv} outside [0, {n_groups}]")
    level_set = set(levels)

    dt = dtype
    tiny = torch.finfo(dt).tiny
    # the damped inverse in the pass's precision: in float32 the kept sets' loss stayed within 3e-4 of the float64
    # pass on a 2048 x 5632 FFN with outlier features (benchmarks/bench_obs_precision.py); a float32 Cholesky that
    # fails (a Hessian too ill-conditioned for it) falls back to float64
    inv_dt = inverse_dtype or dt
    Hd = H.detach().to(device=dev, dtype=inv_dt, copy=True)  # (d_in, d_in)
    torch.diagonal(Hd).add_(_damp_lambda(Hd, damp))  # damped in place: one copy
    hd_diag = torch.diagonal(Hd).clone().clamp_min(tiny).to(dt)  # (d_in,)
    L, info = torch.linalg.cholesky_ex(Hd) if Hd.dtype != _F64 else (None, 1)
    if int(info) == 0:
        Hinv = torch.cholesky_inverse(L)  # (d_in, d_in)
        del L
    else:
        Hd = Hd.to(_F64)
        Hinv = _spd_inverse(Hd).to(dt)
    del Hd
    W0 = W.detach().to(device=dev, dtype=dt)  # (d_out, d_in)

    snapshots: dict[int, Tensor] = {}

    def _emit(n_kept: int, Wfull: Tensor) -> None:
        if on_snapshot is not None:
            on_snapshot(n_kept, Wfull)
        else:
            snapshots[n_kept] = Wfull.to(device=W.device, dtype=out_dtype)

    if n_groups in level_set:
        if on_kept is not None:
            on_kept(n_groups, torch.arange(d_in, device=dev), W0.T)
        else:
            _emit(n_groups, W0.clone())

    errs = torch.zeros(n_groups, dtype=dt, device=dev)  # (n_groups,)
    order: list[int] = []
    cap = max(int(block), g)
    if cap % g:
        cap += g - cap % g

    # ---- base state (compacted to active columns at every flush)
    base_groups = list(range(n_groups))  # local group -> global group id
    base_cols = torch.arange(d_in, device=dev)  # (k,) local col -> global col
    Hb = Hinv  # (k, k)
    WT = torch.empty(d_in, d_out, dtype=dt, device=dev).copy_(W0.T)  # (k, d_out), its own memory: updated in place
    fast = g == 1 and not _force_general

    def _init_state(alive=None):
        k = Hb.shape[0]
        m = k // g
        U = torch.zeros(k, cap, dtype=dt, device=dev)  # (k, cap) deferred Hinv factors
        ZT = torch.zeros(cap, d_out, dtype=dt, device=dev)  # (cap, d_out) deferred W factors
        if alive is None:
            alive = torch.ones(m, dtype=torch.bool, device=dev)  # (m,)
        fl = hd_diag[base_cols]  # (k,)
        if g == 1 and fast:
            D = torch.diagonal(Hb).clone()  # (k,) diag of Hinv_t
            G = (WT * WT).sum(1)  # (k,) column norms^2 of W_t
            floor = 1.0 / fl  # (k,) lower bound of diag(Hinv_t)
        else:
            D = Hb.reshape(m, g, m, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).clone()  # (m,g,g)
            Wg = WT.reshape(m, g, d_out)
            G = Wg @ Wg.mT  # (m, g, g) Gram blocks W_Q^T W_Q
            floor = 1.0 / fl.reshape(m, g).sum(1)  # (m,) eigenvalue floor of Hinv_t[Q,Q]
        return U, ZT, alive, D, G, floor

    U, ZT, alive, D, G, floor = _init_state()
    T = 0  # columns of U/ZT in use

    def _current_active() -> tuple[Tensor, Tensor]:
        # W_t^T on the base columns (k, d_out) and which of them are alive (k,)
        Wt = torch.addmm(WT, U[:, :T], ZT[:T], alpha=-1.0)  # (k, d_out)
        return Wt, (alive.repeat_interleave(g) if g > 1 else alive)

    def _current_full() -> Tensor:
        # W_t on the active columns, scattered to full size (d_out, d_in)
        Wt, colmask = _current_active()
        full = torch.zeros(d_out, d_in, dtype=dt, device=dev)
        full[:, base_cols[colmask]] = Wt[colmask].T
        return full

    if fast:
        eye_g = None
    else:
        eye_g = torch.eye(g, dtype=dt, device=dev)

    below = sorted(level_set)  # snapshot levels, ascending: a multi-column step never jumps over one
    i = 0  # groups removed so far
    while i < n_groups:
        n_alive = n_groups - i
        # columns removed this step: one (exact greedy) unless asked for more on a wide layer, never past the
        # next snapshot level
        r = 1
        if fast and per_step > 1:
            j = bisect.bisect_left(below, n_alive) - 1
            nxt = below[j] if j >= 0 else 0
            r = max(1, min(per_step, n_alive // _PER_STEP_SPAN, n_alive - nxt, cap))
        # ---- flush deferred updates when the block is full; compact to the live columns once a quarter are
        # dead (compacting copies the k x k base: at every flush that was 10% of a wide layer's time)
        if T + r * g > cap and int(alive.sum()) > 0.75 * alive.numel():
            Hb.addmm_(U[:, :T], U[:, :T].T, alpha=-1.0)
            WT.addmm_(U[:, :T], ZT[:T], alpha=-1.0)
            U, ZT, alive, D, G, floor = _init_state(alive)
            T = 0
        elif T + r * g > cap:
            keep_g = alive.nonzero().squeeze(1)  # (m',)
            kc = (keep_g.unsqueeze(1) * g + torch.arange(g, device=dev)).reshape(-1)  # (k',)
            Uk = U.index_select(0, kc)[:, :T]  # (k', T)
            Hb = Hb.index_select(0, kc).index_select(1, kc)
            # only rows of Hb and its diagonal are read, so the tiny asymmetry rounding leaves is harmless
            # (symmetrising every flush cost 10% of a wide layer's time)
            Hb.addmm_(Uk, Uk.T, alpha=-1.0)
            WT = torch.addmm(WT.index_select(0, kc), Uk, ZT[:T], alpha=-1.0)
            kg = keep_g.tolist()
            base_groups = [base_groups[j] for j in kg]
            base_cols = base_cols[kc]
            U, ZT, alive, D, G, floor = _init_state()
            T = 0

        m = alive.numel()
        if r > 1:
            # ---------------- group_size == 1, r columns at once: the r best by their own score, removed as one
            # OBS set step. A lower Cholesky factor of Hinv_t[Q,Q] orders the step: row j of its solves is
            # column Q[j] removed after Q[:j], so the loss curve stays exact for this order.
            scores = G / torch.maximum(D, floor)  # (k,)
            scores.masked_fill_(~alive, float("inf"))
            Q = torch.topk(scores, r, largest=False).indices  # (r,) ascending score
            Uq = U.index_select(0, Q)[:, :T]  # (r, T)
            hT = torch.addmm(Hb.index_select(0, Q), Uq, U[:, :T].T, alpha=-1.0)  # (r, k) = Hinv_t[Q, :]
            wT = torch.addmm(WT.index_select(0, Q), Uq, ZT[:T], alpha=-1.0)  # (r, d_out) = W_t[:, Q]^T
            Lq = _spd_chol(hT.index_select(1, Q), floor.index_select(0, Q).min())  # (r, r)
            unT = torch.linalg.solve_triangular(Lq, hT, upper=False)  # (r, k)
            znT = torch.linalg.solve_triangular(Lq, wT, upper=False)  # (r, d_out)
            M = znT @ znT.T  # (r, r)
            errs[i : i + r] = M.diagonal()
            D.sub_((unT * unT).sum(0))
            P = WT @ znT.T  # (k, r)
            P.addmm_(U[:, :T], ZT[:T] @ znT.T, alpha=-1.0)  # = W_t^T Zn
            unt = unT.T  # (k, r)
            G.add_(((unt @ M) * unt).sum(1) - 2.0 * (unt * P).sum(1))
            U[:, T : T + r] = unt
            ZT[T : T + r] = znT
            T += r
            alive[Q] = False
            order.extend(base_groups[q] for q in Q.tolist())
        elif fast:
            # ---------------- group_size == 1: vector ops only
            scores = G / torch.maximum(D, floor)  # (k,)
            scores.masked_fill_(~alive, float("inf"))
            p = int(torch.argmin(scores))
            up = U[p, :T]  # (T,)
            h = torch.addmv(Hb[p], U[:, :T], up, alpha=-1.0)  # (k,) = Hinv_t[p, :]
            w = torch.addmv(WT[p], ZT[:T].T, up, alpha=-1.0)  # (d_out,) = W_t[:, p]
            hqq = torch.maximum(h[p], floor[p])
            s = hqq.rsqrt()
            un = h * s  # (k,)
            zn = w * s  # (d_out,)
            M = torch.dot(zn, zn)
            errs[i] = M
            D.addcmul_(un, un, value=-1.0)
            P = torch.addmv(WT @ zn, U[:, :T], ZT[:T] @ zn, alpha=-1.0)  # (k,) = W_t^T zn
            # G_j <- ||W_t[:,j] - zn un_j||^2 = G_j - 2 un_j P_j + un_j^2 M
            G.add_(un * (un * M - 2.0 * P))
            U[:, T] = un
            ZT[T] = zn
            T += 1
        else:
            # ---------------- general group size
            Dm = torch.where(alive.view(m, 1, 1), D, eye_g)  # (m,g,g)
            LD = _spd_chol(Dm, floor)
            sol = torch.cholesky_solve(G, LD)  # (m,g,g) inv(D_Q) G_Q
            scores = sol.diagonal(dim1=-2, dim2=-1).sum(-1)  # (m,)
            scores.masked_fill_(~alive, float("inf"))
            p = int(torch.argmin(scores))
            c0, c1 = p * g, (p + 1) * g
            Uq = U[c0:c1, :T]  # (g, T)
            hT = torch.addmm(Hb[c0:c1], Uq, U[:, :T].T, alpha=-1.0)  # (g, k) = Hinv_t[Q, :]
            wT = torch.addmm(WT[c0:c1], Uq, ZT[:T], alpha=-1.0)  # (g, d_out) = W_t[:, Q]^T
            Lq = _spd_chol(hT[:, c0:c1], floor[p])  # (g, g)
            unT = torch.linalg.solve_triangular(Lq, hT, upper=False)  # (g, k) = (Hinv_t[:,Q] Lq^-T)^T
            znT = torch.linalg.solve_triangular(Lq, wT, upper=False)  # (g, d_out)
            M = znT @ znT.T  # (g, g)
            errs[i] = torch.trace(M)
            unb = unT.T.reshape(m, g, g)  # (m, g, g) rows of each group
            D = D - unb @ unb.mT
            P = WT @ znT.T  # (k, g)
            P.addmm_(U[:, :T], ZT[:T] @ znT.T, alpha=-1.0)  # = W_t^T Zn
            X = unb @ P.reshape(m, g, g).mT  # (m, g, g)
            G = G - X - X.mT + unb @ M @ unb.mT
            U[:, T : T + g] = unT.T
            ZT[T : T + g] = znT
            T += g

        if r == 1:
            alive[p] = False
            order.append(base_groups[p])
        i += r
        n_kept = n_groups - i
        if n_kept in level_set:
            if on_kept is not None:
                Wt, colmask = _current_active()
                on_kept(n_kept, base_cols[colmask], Wt[colmask])
            elif n_kept == 0:
                _emit(0, torch.zeros(d_out, d_in, dtype=dt, device=dev))
            else:
                _emit(n_kept, _current_full())

    loss = torch.zeros(n_groups + 1, dtype=_F64)
    loss[1:] = torch.cumsum(errs.cpu().double() * 0.5, 0)
    return GroupOBSResult(
        order=torch.tensor(order, dtype=torch.long),
        loss=loss,
        snapshots=snapshots,
    )


# --------------------------------------------------------------------------- least squares


def _solve_spd_right(B: Tensor, A: Tensor) -> Tensor:
    """Return B @ inv(A) for SPD A (s, s), B (r, s)."""
    if A.shape[0] == 0:
        return B.new_zeros(B.shape[0], 0)
    A = 0.5 * (A + A.T)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return B @ _spd_inverse(A)
    return torch.cholesky_solve(B.T, L).T


@torch.no_grad()
def reconstruct(W: Tensor, H: Tensor, kept_cols: Tensor, damp: float = 0.01) -> Tensor:
    """Least-squares optimum on the kept columns under the dampened Hessian.

    W (d_out, d_in), H (d_in, d_in) undampened, kept_cols (s,) column indices.
    Returns (d_out, s) = W @ Hd[:, S] @ inv(Hd[S, S]); ``s == 0`` gives (d_out, 0).
    """
    dev = W.device
    out_dtype = W.dtype if W.is_floating_point() else _F64
    S = torch.as_tensor(kept_cols, dtype=torch.long, device=dev).reshape(-1)
    W64 = _as_f64(W, dev)
    if S.numel() == 0:
        return torch.zeros(W.shape[0], 0, dtype=out_dtype, device=dev)
    Hd = dampen(_as_f64(H, dev), damp)
    HS = Hd.index_select(1, S)  # (d_in, s)
    B = W64 @ HS  # (d_out, s)
    return _solve_spd_right(B, HS.index_select(0, S)).to(out_dtype)


@torch.no_grad()
def reconstruct_cross(
    W: Tensor, H_hat: Tensor, C: Tensor, kept_cols: Tensor, damp: float = 0.01
) -> Tensor:
    """Sequential-calibration least squares: minimise ``||W X - W_S X_hat_S||^2``.

    W (d_out, d_in); H_hat (d_in, d_in) = 2/n sum x_hat x_hat^T (inputs of the already
    compressed model); C (d_in, d_in) = 2/n sum x x_hat^T; kept_cols (s,).
    Returns (d_out, s) = (W @ C[:, S] + lam * W[:, S]) @ inv(dampen(H_hat)[S, S]),
    lam = damp * mean(diag H_hat).  The dampening acts as a proximal term
    ``lam * n/2 * ||W_S_hat - W[:, S]||^2`` (the same one OBS/:func:`reconstruct` minimise
    under ``Hd``), so with ``X_hat == X`` (``C == H_hat == H``) this equals
    :func:`reconstruct` exactly; for ``damp -> 0`` it is ``W C[:,S] inv(H_hat[S,S])``.
    """
    dev = W.device
    out_dtype = W.dtype if W.is_floating_point() else _F64
    S = torch.as_tensor(kept_cols, dtype=torch.long, device=dev).reshape(-1)
    if S.numel() == 0:
        return torch.zeros(W.shape[0], 0, dtype=out_dtype, device=dev)
    Hh = _as_f64(H_hat, dev)
    return reconstruct_cross_kept(W, Hh.index_select(0, S).index_select(1, S),
                                  _as_f64(W, dev) @ _as_f64(C, dev).index_select(1, S), _damp_lambda(Hh, damp), S)


@torch.no_grad()
def reconstruct_cross_kept(W: Tensor, H_SS: Tensor, WC_S: Tensor, lam: float, kept_cols: Tensor) -> Tensor:
    """:func:`reconstruct_cross` from the kept parts only: H_SS = H_hat[S, S] (s, s), WC_S = W @ C[:, S]
    (d_out, s) and the damping ``lam`` (= damp * mean(diag H_hat), from the full diagonal). WC_S is
    ``2/n sum y x_hat_S^T`` with y = W x the dense layer's outputs, so it accumulates from them directly: with
    H_SS that is (s^2 + d_out s) per token against the full statistics' 2 d_in^2, and no d_out x d_in x s
    product at the end."""
    dev = W.device
    out_dtype = W.dtype if W.is_floating_point() else _F64
    S = torch.as_tensor(kept_cols, dtype=torch.long, device=dev).reshape(-1)
    if S.numel() == 0:
        return torch.zeros(W.shape[0], 0, dtype=out_dtype, device=dev)
    B = _as_f64(WC_S, dev).clone()  # (d_out, s)
    B.add_(_as_f64(W, dev).index_select(1, S), alpha=lam)
    A = _as_f64(H_SS, dev).clone()  # (s, s)
    torch.diagonal(A).add_(lam)
    return _solve_spd_right(B, A).to(out_dtype)


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def layer_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """Per-token output error ``mean ||(W - W_hat) x||^2 = trace(dW H dW^T) / 2``.

    W, W_hat (d_out, d_in) full size; H (d_in, d_in) = 2/n sum x x^T (undampened for the
    true error on the data H came from; pass a dampened H to get the OBS objective).
    """
    dev = W.device
    dW = _as_f64(W, dev) - _as_f64(W_hat, dev)  # (d_out, d_in)
    return float(((dW @ _as_f64(H, dev)) * dW).sum() * 0.5)


class ErrorMeter:
    """Held-out output error ``mean ||(W - W_hat) x||^2`` of many candidate ``W_hat`` for one layer, cheaply.

    The database scores every level of a layer against the same held-out inputs, so the fixed parts are
    prepared once: with ``X`` (n, d_in) the held-out inputs and n <= d_in, the error is
    ``||X W^T - X W_hat^T||^2 / n`` (cost d_out * d_in * n per level, against d_out * d_in^2 for the Hessian
    form of :func:`layer_error`); with more tokens than inputs, the Hessian form. ``dtype`` float32 with TF32
    off (tests/test_obs.py measures it against the float64 :func:`layer_error`).
    """

    def __init__(self, W: Tensor, X: Tensor | None = None, H: Tensor | None = None, dtype=torch.float32):
        dev, self.dtype = W.device, dtype
        self.W = W.detach().to(dtype)  # (d_out, d_in)
        if X is not None and X.shape[0] <= X.shape[1]:
            self.X = X.detach().to(device=dev, dtype=dtype)  # (n, d_in)
            self.Y = self.X @ self.W.T  # (n, d_out) the dense layer's held-out outputs
            self.H = None
        else:
            if H is None:
                if X is None:
                    raise ValueError("ErrorMeter needs the held-out inputs X or their Hessian H")
                X64 = X.detach().to(device=dev, dtype=_F64)
                H = 2.0 / X64.shape[0] * X64.T @ X64
            self.H = H.detach().to(device=dev, dtype=dtype)  # (d_in, d_in)

    @torch.no_grad()
    def error(self, W_hat: Tensor) -> float:
        """W_hat (d_out, d_in) full size (removed columns zero)."""
        with _no_tf32():
            W_hat = W_hat.to(device=self.W.device, dtype=self.dtype)
            if self.H is None:
                live = W_hat.any(0).nonzero().squeeze(1)  # (s,) the kept columns: the product skips the rest
                d = self.Y - self.X.index_select(1, live) @ W_hat.index_select(1, live).T  # (n, d_out)
                return float((d.double() ** 2).sum() / self.X.shape[0])
            dW = self.W - W_hat
            return float(((dW @ self.H) * dW).double().sum() * 0.5)

    @torch.no_grad()
    def error_kept(self, cols: Tensor, W_S_T: Tensor) -> float:
        """The error of the weights W_hat whose kept columns `cols` (s,) hold W_S_T.T, W_S_T (s, d_out);
        the other columns zero."""
        with _no_tf32():
            W_S_T = W_S_T.to(device=self.W.device, dtype=self.dtype)
            if self.H is None:
                d = torch.addmm(self.Y, self.X.index_select(1, cols), W_S_T, alpha=-1.0)  # (n, d_out)
                return float((d.double() ** 2).sum() / self.X.shape[0])
            W_hat = torch.zeros_like(self.W)
            W_hat[:, cols] = W_S_T.T
        return self.error(W_hat)

    def energy(self) -> float:
        """``mean ||W x||^2``: the layer's own held-out output energy."""
        return self.error(torch.zeros_like(self.W))


@torch.no_grad()
def output_energy(W: Tensor, H: Tensor) -> float:
    """``trace(W H W^T) / 2 = mean ||W x||^2``; W (d_out, d_in), H (d_in, d_in)."""
    dev = W.device
    W64 = _as_f64(W, dev)
    return float(((W64 @ _as_f64(H, dev)) * W64).sum() * 0.5)


@torch.no_grad()
def magnitude_order(W: Tensor, group_size: int = 1) -> torch.LongTensor:
    """(n_groups,) removal order by ascending L2 norm of each column group (baseline)."""
    d_out, d_in = W.shape
    if d_in % group_size:
        raise ValueError(f"d_in={d_in} is not divisible by group_size={group_size}")
    norms = (_as_f64(W, W.device) ** 2).sum(0).reshape(d_in // group_size, group_size).sum(1)
    return torch.argsort(norms, stable=True).cpu()


if __name__ == "__main__":  # hand-run timing check: python -m planner.obs
    import time

    def _problem(d_out: int, d_in: int, n: int = 4096):
        gen = torch.Generator().manual_seed(0)
        X = torch.randn(n, d_in, generator=gen) @ (
            torch.eye(d_in) + torch.randn(d_in, d_in, generator=gen) / d_in**0.5
        )
        X = X.double()
        return torch.randn(d_out, d_in, generator=gen), 2.0 / n * X.T @ X

    for d_out, d_in, gs, reps in [(384, 1536, 1, 3), (384, 384, 32, 20), (384, 384, 1, 3)]:
        Wb, Hb_ = _problem(d_out, d_in)
        group_obs(Wb, Hb_, gs)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            group_obs(Wb, Hb_, gs)
        dt = (time.perf_counter() - t0) / reps
        print(f"group_obs {d_out}x{d_in} group_size={gs}: {dt * 1e3:.1f} ms "
              f"(torch threads={torch.get_num_threads()})")
