"""Layers shared by every planner model file (copied next to the weights with it; torch only).

`PlannerCsrLinear` is the portable sparse layer: a linear whose weight was sparsified, stored as a plain dense
`weight` with zeros and run through a CSR matmul in eval mode. `_linear_like` builds a resized nn.Linear.
"""
import warnings

import torch
from torch import nn

from .planner_compat import cache_from_kwargs


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


class RemovedDecoderAttention(nn.Module):
    """Stands in for a decoder attention module with nothing kept: returns (its output projection's bias or a
    0-dim zero, None).

    Generation reads positions and mask sizes from the KV cache (`get_seq_length()` of layer 0, the mask sizes
    of the first full-attention layer), so this layer still advances its cache slot by the T new tokens. A
    slot of zero heads would not do: a DynamicLayer whose tensors have no elements reports length 0. The
    placeholder is one zero per token, (B, 1, T, 1): negligible next to a real layer's (B, heads, T, head_dim)."""

    def __init__(self, layer_idx, hidden, bias):
        super().__init__()
        self.layer_idx = layer_idx
        self.bias = nn.Parameter(torch.zeros(hidden)) if bias else None

    def forward(self, hidden_states, *args, **kwargs):
        cache = cache_from_kwargs(kwargs)                            # `cache=` (5.24+) or `past_key_values=`
        if cache is not None:
            b, t = hidden_states.shape[:2]
            kv = hidden_states.new_zeros(b, 1, t, 1)                 # (B, 1, T, 1) keeps this slot's length right
            cache.update(kv, kv, self.layer_idx)
        out = self.bias if self.bias is not None else hidden_states.new_zeros(())   # (d,) or () broadcast on h
        return out, None


class RemovedProjection(nn.Module):
    """The output projection of a module with nothing kept (an FFN's down projection, an MLP): returns its
    bias, or a 0-dim zero, broadcast onto the residual stream."""

    def __init__(self, hidden, bias):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden)) if bias else None

    def forward(self, hidden_states):
        return self.bias if self.bias is not None else hidden_states.new_zeros(())


def planner_layer_specs(layers, config):
    """[(layer, heads, ffn, attn_sparsity, ffn_sparsity)] from config.planner_layers ([] for a dense config)."""
    spec = getattr(config, "planner_layers", None)
    if not spec:
        return []
    if len(spec) != len(layers):
        raise ValueError(f"config.planner_layers has {len(spec)} entries for {len(layers)} layers")
    return [(layer, int(s["heads"]), int(s["ffn"]), float(s.get("attn_sparsity", 0.0)), float(s.get("ffn_sparsity", 0.0)))
            for layer, s in zip(layers, spec)]


def planner_portable_classes(namespace, module, families, heads, reshape_model, prepare=None):
    """Make Planner<Family><Head> available in `namespace` for every such transformers class: the base class
    whose __init__ then runs `prepare(model)` (if given) and `reshape_model(model, config)`, so the checkpoint's
    per-layer shapes exist before its weights load. Each class is made when first asked for (the module's
    __getattr__), so importing a model file does not import every transformers model it could extend."""
    import transformers

    names = {"Planner" + f + h for f in families for h in heads}

    def make(base_cls):
        def __init__(self, config, *args, **kwargs):
            base_cls.__init__(self, config, *args, **kwargs)
            if prepare is not None:
                prepare(self)
            reshape_model(self, config)
        return type("Planner" + base_cls.__name__, (base_cls,), {"__init__": __init__, "__module__": module})

    def __getattr__(name):
        base = getattr(transformers, name[len("Planner"):], None) if name in names else None
        if base is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        namespace[name] = make(base)
        return namespace[name]

    namespace["__getattr__"] = __getattr__


def planner_reshape_by_slots(layer, heads, ffn, head_dim, attn_sparsity, ffn_sparsity, slots, remove_, set_heads_):
    """Give a multi-head-attention `layer` the module shapes of `heads` kept heads and `ffn` kept neurons (weights
    uninitialised), through the family's functions: slots(layer, kind) lists a module's linears, consumer last
    ([] once removed); remove_(layer, kind) puts in the stand-ins; set_heads_(layer, heads) sets size attributes.
    A producer may stack several blocks of the consumer's width (GPT-2's c_attn: q, k, v); each block shrinks.
    A module with a sparsity > 0 gets CSR linears."""
    for kind, width, level in (("attn", heads * head_dim, attn_sparsity), ("ffn", ffn, ffn_sparsity)):
        linears = slots(layer, kind)
        if width == 0:
            if linears:
                remove_(layer, kind)
            continue
        *producers, (cp, cn) = linears
        consumer = getattr(cp, cn)
        if consumer.in_features != width:
            for p, n in producers:
                lin = getattr(p, n)
                setattr(p, n, _linear_like(lin, out_features=lin.out_features // consumer.in_features * width))
            setattr(cp, cn, _linear_like(consumer, in_features=width))
    planner_sparsify_slots(layer, heads, ffn, attn_sparsity, ffn_sparsity, slots)
    if heads:
        set_heads_(layer, heads)


def planner_sparsify_slots(layer, heads, ffn, attn_sparsity, ffn_sparsity, slots):
    """Put CSR linears in every kept module of `layer` whose sparsity is > 0; slots(layer, kind) lists its
    linears as (parent, name)."""
    for kind, level, width in (("attn", attn_sparsity, heads), ("ffn", ffn_sparsity, ffn)):
        if level and width:
            for parent, name in slots(layer, kind):
                lin = getattr(parent, name)
                if not isinstance(lin, PlannerCsrLinear):
                    setattr(parent, name, csr_like(lin, level))
