"""SparseGPT (OBS unstructured and N:M pruning of one layer) against exact references and magnitude pruning."""
import pytest
import torch

from planner.algorithms.obs import dampen, layer_error
from planner.algorithms.sparsegpt import levels, magnitude_prune, sparsegpt, sparsity_of


def _problem(d_out=24, d_in=64, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 0.6 * torch.randn(d_in, d_in, generator=g) / d_in ** 0.5     # correlated inputs
    X = (torch.randn(n, d_in, generator=g) @ mix).double()
    return torch.randn(d_out, d_in, generator=g).double(), 2.0 / n * X.T @ X


def test_no_pruning_changes_nothing():
    W, H = _problem()
    assert torch.equal(sparsegpt(W, H, 0.0), W)


@pytest.mark.parametrize("s", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("block", [16, 128])
def test_exact_sparsity_per_block(s, block):
    W, H = _problem()
    Wh = sparsegpt(W, H, s, block=block)
    for i in range(0, W.shape[1], block):
        blk = Wh[:, i:i + block]
        assert int((blk == 0).sum()) == round(s * blk.numel())


def test_nm_pattern():
    W, H = _problem()
    Wh = sparsegpt(W, H, nm=(2, 4), block=32)
    nz = (Wh != 0).view(W.shape[0], -1, 4).sum(-1)
    assert int(nz.max()) <= 2 and sparsity_of(Wh) == pytest.approx(0.5)


def test_isotropic_inputs_reduce_to_magnitude_pruning():
    # H = c*I: no input is correlated with another, so OBS has nothing to compensate with and the saliency
    # w^2/[Hinv]_jj^2 orders weights as |w| does: the result is magnitude pruning (one block = the whole matrix)
    W, _ = _problem()
    H = 3.0 * torch.eye(W.shape[1], dtype=torch.float64)
    for s in (0.3, 0.7):
        torch.testing.assert_close(sparsegpt(W, H, s, block=W.shape[1]), magnitude_prune(W, s))
    torch.testing.assert_close(sparsegpt(W, H, nm=(2, 4)), magnitude_prune(W, nm=(2, 4)))


def test_single_removal_is_the_obs_closed_form():
    # one weight removed, from the first column: every other column may still move, so the update must be
    # OBS's  delta = -w_q / [Hd^-1]_qq * Hd^-1[:, q]  exactly
    W, H = _problem(d_out=1, d_in=16)
    W[0, 0] = 1e-3                                               # the least salient weight by far
    Wh = sparsegpt(W, H, 1 / 16, block=16, damp=0.01)
    Hinv = torch.linalg.inv(dampen(H, 0.01))
    ref = W[0] - W[0, 0] / Hinv[0, 0] * Hinv[:, 0]
    torch.testing.assert_close(Wh[0], ref, rtol=1e-9, atol=1e-12)
    assert Wh[0, 0] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_beats_magnitude_at_every_level(seed):
    W, H = _problem(seed=seed)
    lv = levels(W, H, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], nm=[(2, 4), (1, 4)], block=32)
    for level, (Wh, err) in lv.items():
        nm = tuple(map(int, level.split(":"))) if isinstance(level, str) else None
        mag = magnitude_prune(W, 0.0 if nm else level, nm)
        assert err < layer_error(W, mag, H), level
    errs = [lv[s][1] for s in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert errs == sorted(errs)                                  # more sparsity, more error


def test_dead_inputs_and_bad_arguments():
    W, H = _problem(d_in=16)
    H[3, :] = H[:, 3] = 0                                        # input 3 never fires
    Wh = sparsegpt(W, H, 0.25, block=8)
    assert torch.isfinite(Wh).all() and Wh[:, 3].eq(0).all()
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt(W, H, 1.0)
    with pytest.raises(ValueError, match="N:M"):
        sparsegpt(W, H, nm=(2, 3))
    with pytest.raises(ValueError, match="d_in"):
        sparsegpt(W, H[:8, :8], 0.5)
