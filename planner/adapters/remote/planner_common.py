"""Layers shared by every planner model file (copied next to the weights with it; torch only).

`PlannerCsrLinear` is the portable sparse layer: a linear whose weight was sparsified, stored as a plain dense
`weight` with zeros and run through a CSR matmul in eval mode. `_linear_like` builds a resized nn.Linear.
"""
import warnings

import torch
from torch import nn


class PlannerCsrLinear(nn.Linear):
    """A linear whose weight has been sparsified: stored and loaded as a plain dense `weight` (zeros
    included), run through a compressed-sparse-row matmul in eval mode. The CSR copy is built on first use
    and rebuilt whenever the weight changes; in training mode the dense path keeps autograd working."""

    def __init__(self, in_features, out_features, bias=True, sparsity=0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.sparsity = float(sparsity)           # nominal level, what the latency profile timed
        self._csr, self._csr_key = None, None

    def forward(self, x):
        if self.training:
            return nn.functional.linear(x, self.weight, self.bias)
        w = self.weight
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if self._csr_key != key:
            with warnings.catch_warnings():                  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self._csr, self._csr_key = w.detach().to_sparse_csr(), key
        lead = x.shape[:-1]
        y = (self._csr @ x.reshape(-1, self.in_features).T).T          # CSR (out, in) @ (in, N) -> (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def csr_like(lin, sparsity, weight=None):
    """A PlannerCsrLinear of `lin`'s shape and bias; weight (out, in) defaults to lin's."""
    new = PlannerCsrLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, sparsity=sparsity,
                           device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight if weight is None else weight)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new.train(lin.training)           # an eval model stays in eval mode: the CSR path


def _linear_like(lin, in_features=None, out_features=None):
    """A new nn.Linear of lin's kind resized (weights uninitialised), in lin's training mode: a layer made in
    training mode inside an eval model would, once sparsified, take PlannerCsrLinear's dense path."""
    new = nn.Linear(in_features or lin.in_features, out_features or lin.out_features, bias=lin.bias is not None)
    return new.to(device=lin.weight.device, dtype=lin.weight.dtype).train(lin.training)
