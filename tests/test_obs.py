"""Tests for planner.obs (structured OBS on one linear layer). CPU, float64."""

import itertools

import pytest
import torch

from planner.algorithms.obs import (
    ErrorMeter,
    GroupOBSResult,
    HessianAccumulator,
    dampen,
    damping,
    group_obs,
    layer_error,
    magnitude_order,
    output_energy,
    reconstruct,
    reconstruct_cross,
    reconstruct_cross_kept,
)

F64 = torch.float64


def make_problem(d_out, d_in, n, seed, dead=(), correlated=True):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=gen, dtype=F64)
    if correlated:
        X = X @ (torch.eye(d_in, dtype=F64) + 0.5 * torch.randn(d_in, d_in, generator=gen, dtype=F64))
    X = X * (0.2 + 2 * torch.rand(d_in, generator=gen, dtype=F64))
    for j in dead:
        X[:, j] = 0
    W = torch.randn(d_out, d_in, generator=gen, dtype=F64)
    H = 2.0 / n * X.T @ X
    return W, H, X


def full_from_kept(W, kept_cols, W_S):
    out = torch.zeros_like(W)
    out[:, kept_cols] = W_S
    return out


# ------------------------------------------------------------------ HessianAccumulator


def test_hessian_matches_direct():
    torch.manual_seed(0)
    X = torch.randn(3, 7, 5, dtype=torch.float32)
    acc = HessianAccumulator(5)
    acc.add_batch(X)
    Xf = X.reshape(-1, 5).double()
    assert acc.n == 21
    torch.testing.assert_close(acc.hessian(), 2.0 / 21 * Xf.T @ Xf, rtol=1e-12, atol=1e-12)
    assert acc.hessian().dtype == F64


def test_hessian_mask_and_batches():
    torch.manual_seed(1)
    X = torch.randn(4, 6, 8, dtype=F64)
    mask = torch.rand(4, 6) > 0.4
    mask[0, 0] = True
    X_pad = X.clone()
    X_pad[~mask] = 1e3  # padding garbage must not matter
    acc = HessianAccumulator(8)
    acc.add_batch(X_pad, mask)
    Xr = X[mask]
    n = Xr.shape[0]
    assert acc.n == n
    torch.testing.assert_close(acc.hessian(), 2.0 / n * Xr.T @ Xr, rtol=1e-12, atol=1e-12)

    # several batches (incl. an all-padding one) == one batch
    acc2 = HessianAccumulator(8)
    for b in range(4):
        acc2.add_batch(X_pad[b], mask[b])
    acc2.add_batch(X_pad[0], torch.zeros(6, dtype=torch.bool))
    assert acc2.n == n
    torch.testing.assert_close(acc2.hessian(), acc.hessian(), rtol=1e-12, atol=1e-12)


def test_hessian_empty_raises():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.hessian()
    acc.add_batch(torch.randn(2, 4), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError):
        acc.hessian()


def test_dampen():
    H = torch.diag(torch.tensor([2.0, 0.0, 4.0], dtype=F64))
    Hd = dampen(H, 0.1)
    torch.testing.assert_close(torch.diagonal(Hd), torch.tensor([2.2, 0.2, 4.2], dtype=F64))
    assert H[1, 1] == 0  # not modified
    Z = dampen(torch.zeros(3, 3, dtype=F64))
    assert torch.all(torch.diagonal(Z) > 0)


# ------------------------------------------------------------------ group_obs vs least squares


@pytest.mark.parametrize("group_size", [1, 4])
@pytest.mark.parametrize("n", [200, 10])  # full rank and rank deficient (n < d_in)
@pytest.mark.parametrize("force_general", [False, True])
def test_every_level_equals_least_squares(group_size, n, force_general):
    d_out, d_in = 9, 24
    W, H, _ = make_problem(d_out, d_in, n, seed=10 + n + group_size, dead=(5,))
    n_groups = d_in // group_size
    W0, H0 = W.clone(), H.clone()
    res = group_obs(
        W, H, group_size, snapshot_levels=range(n_groups + 1), block=8, _force_general=force_general
    )
    assert torch.equal(W, W0) and torch.equal(H, H0)  # inputs untouched
    assert isinstance(res, GroupOBSResult)
    assert sorted(res.order.tolist()) == list(range(n_groups))
    assert res.loss.shape == (n_groups + 1,) and res.loss.dtype == F64
    assert res.loss[0] == 0
    Hd = dampen(H)
    assert torch.all(res.loss[1:] >= res.loss[:-1] - 1e-12)
    for n_kept in range(n_groups + 1):
        S = res.kept_columns(n_kept, group_size)
        assert S.numel() == n_kept * group_size
        ref = full_from_kept(W, S, reconstruct(W, H, S))
        snap = res.snapshots[n_kept]
        torch.testing.assert_close(snap, ref, rtol=1e-9, atol=1e-9)
        removed = torch.ones(d_in, dtype=torch.bool)
        removed[S] = False
        assert torch.all(snap[:, removed] == 0)
        # recorded OBS loss is exact under the dampened Hessian
        i = n_groups - n_kept
        assert res.loss[i].item() == pytest.approx(layer_error(W, snap, Hd), rel=1e-9, abs=1e-9)
    # removing everything costs the full output energy under Hd
    assert res.loss[-1].item() == pytest.approx(output_energy(W, Hd), rel=1e-10)


def test_fast_and_general_paths_agree():
    W, H, _ = make_problem(16, 40, 100, seed=3, dead=(0, 7))
    a = group_obs(W, H, 1, block=16)
    b = group_obs(W, H, 1, block=16, _force_general=True)
    c = group_obs(W, H, 1, block=1000)  # no flush at all
    assert torch.equal(a.order, b.order) and torch.equal(a.order, c.order)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.loss, c.loss, rtol=1e-10, atol=1e-10)


def test_keep_all_and_snapshot_subset():
    W, H, _ = make_problem(6, 12, 50, seed=4)
    W32 = W.float()
    res = group_obs(W32, H, 3, snapshot_levels=[4, 2, 0], device="cpu")
    assert set(res.snapshots) == {0, 2, 4}
    assert res.snapshots[4].dtype == torch.float32
    torch.testing.assert_close(res.snapshots[4], W32)  # nothing removed -> W unchanged
    assert torch.all(res.snapshots[0] == 0)
    assert res.kept_groups(4).tolist() == [0, 1, 2, 3]
    assert res.kept_groups(0).numel() == 0
    cols = res.kept_columns(2, 3)
    assert torch.all(res.snapshots[2][:, [c for c in range(12) if c not in cols.tolist()]] == 0)
    with pytest.raises(ValueError):
        group_obs(W, H, 5)


def test_snapshot_callback_sees_the_same_weights_and_keeps_none():
    W, H, _ = make_problem(5, 40, 80, seed=7)
    kept = group_obs(W, H, 4, snapshot_levels=[10, 6, 3, 0])
    seen = {}
    res = group_obs(W, H, 4, snapshot_levels=[10, 6, 3, 0], on_snapshot=lambda nk, Wh: seen.__setitem__(nk, Wh.clone()))
    assert res.snapshots == {} and set(seen) == {10, 6, 3, 0}
    for nk in seen:
        torch.testing.assert_close(seen[nk], kept.snapshots[nk])
    assert torch.equal(res.order, kept.order)


def test_late_steps_stay_finite_with_tiny_damping():
    # nearly singular data, tiny dampening: no NaN, monotone loss
    W, H, _ = make_problem(8, 32, 4, seed=5, dead=(1, 2, 3))
    for g in (1, 4):
        res = group_obs(W, H, g, damp=1e-10, snapshot_levels=range(32 // g + 1))
        assert torch.isfinite(res.loss).all()
        assert all(torch.isfinite(s).all() for s in res.snapshots.values())


# ------------------------------------------------------------------ baselines and brute force


@pytest.mark.parametrize("group_size", [1, 4])
def test_obs_beats_magnitude(group_size):
    d_out, d_in = 12, 32
    n_groups = d_in // group_size
    gaps = []
    for seed in range(6):
        W, H, _ = make_problem(d_out, d_in, 120, seed=100 + seed, dead=(3,))
        Hd = dampen(H)
        res = group_obs(W, H, group_size, snapshot_levels=range(n_groups + 1))
        mag = magnitude_order(W, group_size)
        for n_kept in range(n_groups + 1):
            kept_g = torch.sort(mag[n_groups - n_kept :]).values
            S = (kept_g[:, None] * group_size + torch.arange(group_size)).reshape(-1)
            W_mag = torch.zeros_like(W)
            W_mag[:, S] = W[:, S]  # magnitude, no update
            W_mag_ls = full_from_kept(W, S, reconstruct(W, H, S))  # magnitude + LS update
            e_obs = layer_error(W, res.snapshots[n_kept], Hd)
            e_mag = layer_error(W, W_mag, Hd)
            e_ls = layer_error(W, W_mag_ls, Hd)
            assert e_obs <= e_mag + 1e-9
            gaps.append(e_obs - e_ls)
    assert sum(gaps) / len(gaps) <= 1e-9


def test_magnitude_order():
    W = torch.tensor([[3.0, 0.1, 1.0, 0.0], [0.0, 0.1, 1.0, 0.5]])
    assert magnitude_order(W).tolist() == [1, 3, 2, 0]
    assert magnitude_order(W, 2).tolist() == [1, 0]


@pytest.mark.parametrize("group_size", [1, 2])
def test_first_step_is_true_best_single_group(group_size):
    n_groups = 6
    d_in = n_groups * group_size
    for seed in range(5):
        W, H, _ = make_problem(5, d_in, 30, seed=200 + seed)
        Hd = dampen(H)
        res = group_obs(W, H, group_size)
        errs = []
        for q in range(n_groups):
            S = torch.tensor([c for c in range(d_in) if c // group_size != q])
            W_S = full_from_kept(W, S, reconstruct(W, H, S))
            errs.append(layer_error(W, W_S, Hd))
        best = min(range(n_groups), key=errs.__getitem__)
        assert res.order[0].item() == best
        assert res.loss[1].item() == pytest.approx(errs[best], rel=1e-9)
        # greedy is a heuristic: the exhaustive best pair can only be at least as good
        pairs = [
            layer_error(
                W,
                full_from_kept(
                    W,
                    S := torch.tensor([c for c in range(d_in) if c // group_size not in pr]),
                    reconstruct(W, H, S),
                ),
                Hd,
            )
            for pr in itertools.combinations(range(n_groups), 2)
        ]
        assert min(pairs) <= res.loss[2].item() + 1e-9


# ------------------------------------------------------------------ reconstruct / cross


def test_reconstruct_edge_cases():
    W, H, _ = make_problem(4, 8, 20, seed=6)
    assert reconstruct(W, H, torch.tensor([], dtype=torch.long)).shape == (4, 0)
    full = reconstruct(W, H, torch.arange(8))
    torch.testing.assert_close(full, W, rtol=1e-10, atol=1e-10)


def test_reconstruct_cross():
    d_out, d_in, n = 6, 16, 300
    W, H, X = make_problem(d_out, d_in, n, seed=7, dead=(2,))
    S = torch.tensor([0, 1, 3, 5, 8, 9, 12, 15])
    # X_hat == X -> identical to reconstruct
    torch.testing.assert_close(
        reconstruct_cross(W, H, H, S), reconstruct(W, H, S), rtol=1e-10, atol=1e-10
    )
    assert reconstruct_cross(W, H, H, torch.tensor([], dtype=torch.long)).shape == (d_out, 0)
    # X_hat != X: cross solution is at least as good on the true objective
    gen = torch.Generator().manual_seed(8)
    for scale in (0.05, 0.3):
        X_hat = X + scale * torch.randn(n, d_in, generator=gen, dtype=F64) * X.std(0)
        H_hat = 2.0 / n * X_hat.T @ X_hat
        C = 2.0 / n * X.T @ X_hat
        for damp in (1e-8, 0.01):
            W_cross = reconstruct_cross(W, H_hat, C, S, damp=damp)
            W_plain = reconstruct(W, H, S, damp=damp)
            # proximal damping term of the cross problem (pulls W_S towards W[:, S])
            mu = damp * torch.diagonal(H_hat).mean() * n / 2

            def obj(W_S):
                r = W @ X.T - W_S @ X_hat[:, S].T
                return (r**2).sum() + mu * ((W_S - W[:, S]) ** 2).sum()

            assert obj(W_cross) <= obj(W_plain) * (1 + 1e-12)
            if damp == 1e-8:
                r_c = ((W @ X.T - W_cross @ X_hat[:, S].T) ** 2).sum()
                r_p = ((W @ X.T - W_plain @ X_hat[:, S].T) ** 2).sum()
                assert r_c <= r_p * (1 + 1e-9)


def test_layer_error_and_energy():
    W, H, X = make_problem(5, 10, 40, seed=9)
    W_hat = W.clone()
    W_hat[:, :3] = 0
    direct = ((W - W_hat) @ X.T).pow(2).sum().item() / 40
    assert layer_error(W, W_hat, H) == pytest.approx(direct, rel=1e-10)
    assert output_energy(W, H) == pytest.approx((W @ X.T).pow(2).sum().item() / 40, rel=1e-10)


# ------------------------------------------------------------------ the database's lean settings


def _wide_problem(d_out=24, d_in=1024, n=3000, seed=5):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, d_in, dtype=F64)                  # a decaying spectrum, as in real activations
    X = torch.relu(torch.randn(n, d_in, generator=gen, dtype=F64) * scale
                   @ torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=F64))[0])
    return torch.randn(d_out, d_in, generator=gen, dtype=F64), 2.0 / n * X.T @ X, X


def test_multi_column_steps_stay_exact_and_close_to_greedy():
    W, H, _ = _wide_problem()
    d_in = W.shape[1]
    levels = list(range(0, d_in + 1, 100))
    one = group_obs(W, H, 1)
    many = group_obs(W, H, 1, per_step=8, snapshot_levels=levels)
    assert sorted(many.order.tolist()) == list(range(d_in))
    assert set(many.snapshots) == set(levels)                        # a step never jumps over a snapshot level
    Hd = dampen(H)
    for n_kept in levels:
        S = many.kept_columns(n_kept, 1)
        ref = full_from_kept(W, S, reconstruct(W, H, S))
        torch.testing.assert_close(many.snapshots[n_kept], ref, rtol=1e-7, atol=1e-9)
        # the loss curve is exact for the order it reports, and within 1% of one-at-a-time greedy
        assert many.loss[d_in - n_kept].item() == pytest.approx(layer_error(W, ref, Hd), rel=1e-8, abs=1e-10)
        assert many.loss[d_in - n_kept].item() == pytest.approx(one.loss[d_in - n_kept].item(), rel=0.01, abs=1e-9)
    assert torch.all(many.loss[1:] >= many.loss[:-1] - 1e-12)


def test_float32_pass_matches_float64():
    W, H, _ = _wide_problem(d_in=768, seed=6)
    a, b = group_obs(W, H, 1), group_obs(W, H, 1, dtype=torch.float32)
    assert b.loss.dtype == F64
    big = a.loss > 1e-3 * a.loss[-1]
    rel = ((a.loss - b.loss).abs() / a.loss.clamp_min(1e-30))[big]
    assert float(rel.max()) < 1e-4
    c = group_obs(W, H, 1, dtype=torch.float32, inverse_dtype=torch.float64)      # the float64-inverse fallback
    assert float((((a.loss - c.loss).abs() / a.loss.clamp_min(1e-30))[big]).max()) < 1e-4
    for keep in (600, 384, 192, 48):
        overlap = len(set(a.kept_groups(keep).tolist()) & set(b.kept_groups(keep).tolist())) / keep
        assert overlap >= 0.99
    g = group_obs(W, H, 32, dtype=torch.float32)                      # the general (head) path too
    torch.testing.assert_close(g.loss, group_obs(W, H, 32).loss, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("n", [300, 2000])                            # fewer tokens than inputs, and more
def test_error_meter_equals_layer_error(n):
    W, _, _ = make_problem(20, 500, 10, seed=2)
    _, _, X = make_problem(20, 500, n, seed=3)
    H = 2.0 / n * X.T @ X
    W_hat = W.clone()
    W_hat[:, ::3] = 0
    W_hat[:, 1::3] *= 0.9
    meter = ErrorMeter(W.float(), X=X)
    assert (meter.H is None) == (n <= 500)
    assert meter.error(W_hat) == pytest.approx(layer_error(W, W_hat, H), rel=1e-5)
    assert meter.energy() == pytest.approx(output_energy(W, H), rel=1e-5)
    assert ErrorMeter(W.float(), H=H).error(W_hat) == pytest.approx(layer_error(W, W_hat, H), rel=1e-5)


def test_float32_products_in_the_accumulator():
    X = torch.randn(4, 50, 64, dtype=F64)
    ref = 2.0 / 200 * X.reshape(-1, 64).T @ X.reshape(-1, 64)
    acc = HessianAccumulator(64, dtype=torch.float32, compute_dtype=torch.float32)
    for x in X:
        acc.add_batch(x)
    torch.testing.assert_close(acc.hessian().double(), ref, rtol=1e-5, atol=1e-5)


def test_reconstruct_cross_from_the_kept_parts_only():
    W, H_hat, _ = make_problem(7, 30, 200, seed=8)
    _, C, _ = make_problem(7, 30, 200, seed=9)
    S = torch.tensor([0, 3, 4, 10, 11, 29])
    lam = damping(float(torch.diagonal(H_hat).mean()), 0.01)
    torch.testing.assert_close(reconstruct_cross_kept(W, H_hat[S][:, S], W @ C[:, S], lam, S),
                               reconstruct_cross(W, H_hat, C, S, damp=0.01), rtol=1e-10, atol=1e-10)


def test_kept_snapshots_score_as_the_full_ones():
    W, H, X = make_problem(12, 60, 40, seed=4)
    levels = [0, 5, 17, 60]
    full, kept = {}, {}
    group_obs(W, H, 1, snapshot_levels=levels, on_snapshot=lambda n, Wf: full.__setitem__(n, Wf.clone()))
    group_obs(W, H, 1, snapshot_levels=levels, on_kept=lambda n, c, Wt: kept.__setitem__(n, (c.clone(), Wt.clone())))
    for mk in (ErrorMeter(W.float(), X=X), ErrorMeter(W.float(), H=2.0 / 40 * X.T @ X)):   # both forms
        for n in levels:
            cols, W_S_T = kept[n]
            assert cols.numel() == n and torch.equal(full[n][:, cols], W_S_T.T)
            assert mk.error_kept(cols, W_S_T) == pytest.approx(mk.error(full[n]), rel=1e-5, abs=1e-6)
