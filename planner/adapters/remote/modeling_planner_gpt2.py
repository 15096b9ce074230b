"""Structurally pruned GPT-2 models, written by `planner apply`.

This file is copied next to the weights so that the checkpoint loads with plain Hugging Face transformers
(`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`), without the planner installed. It only
depends on torch and transformers.

GPT-2 stores its block linears as `Conv1D` with transposed weights (in, out). The planner turns them into
`nn.Linear` (weight (out, in)) before doing anything else, and these classes do the same in `__init__`
before the weights are loaded: the saved `c_attn.weight` etc. are Linear weights, under GPT-2's key names.
`config.planner_layers[i]` gives layer i's kept attention heads and FFN neurons. The fused `c_attn`
(d -> 3 * heads * head_dim) keeps the q, k and v rows of the kept heads. 0 means the module is removed: the
block is pre-LN (h + module(ln(h))), so only the module's output bias remains and its input LayerNorm, whose
output nothing reads any more, becomes an identity. An "attn_sparsity" / "ffn_sparsity" entry means that
module's linears were sparsified: they load as dense weights with zeros and run on a CSR matmul in eval mode.
"""
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .planner_common import RemovedDecoderAttention as RemovedAttention  # noqa: F401
from .planner_common import RemovedProjection as RemovedMLP  # noqa: F401
from .planner_common import planner_layer_specs, planner_portable_classes, planner_reshape_by_slots
from .planner_compat import cache_from_kwargs  # noqa: F401  (imported here so that it is copied alongside)


def _linear_from_conv1d(conv):
    """An nn.Linear computing what `conv` computes: weight (out, in) = conv.weight (in, out) transposed."""
    nx, nf = conv.weight.shape
    lin = nn.Linear(nx, nf, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin.train(conv.training)


def planner_prepare_(model):
    """Every Conv1D in the blocks (c_attn, attn.c_proj, c_fc, mlp.c_proj) becomes an nn.Linear, in place."""
    for block in model.base_model.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    setattr(parent, name, _linear_from_conv1d(child))
    return model


def planner_slots(layer, kind):
    """(parent, name) of every linear of `kind` ("attn" or "ffn") in a block, the consumer last; [] if removed."""
    if kind == "attn":
        a = layer.attn
        return [] if isinstance(a, RemovedAttention) else [(a, "c_attn"), (a, "c_proj")]
    m = layer.mlp
    return [] if isinstance(m, RemovedMLP) else [(m, "c_fc"), (m, "c_proj")]


def planner_remove_(layer, kind):
    """Replace module `kind` by its stand-in (and its input LayerNorm by an identity); returns the stand-in
    (bias zero: the caller copies the consumer's bias into it)."""
    consumer = getattr(*planner_slots(layer, kind)[-1])
    d, to = consumer.out_features, dict(device=consumer.weight.device, dtype=consumer.weight.dtype)
    if kind == "attn":
        layer.attn = RemovedAttention(layer.attn.layer_idx, d, consumer.bias is not None).to(**to)
        layer.ln_1 = nn.Identity()
        return layer.attn
    layer.mlp = RemovedMLP(d, consumer.bias is not None).to(**to)
    layer.ln_2 = nn.Identity()
    return layer.mlp


def planner_set_heads_(layer, heads):
    """Size attributes of an attention that keeps `heads` heads: forward splits c_attn's output into q, k, v of
    `split_size` columns each and views them as (-1, head_dim); embed_dim (c_proj's output) is unchanged."""
    a = layer.attn
    a.num_heads = heads
    a.split_size = heads * a.head_dim


def planner_reshape_layer(layer, heads, ffn, config, attn_sparsity=0.0, ffn_sparsity=0.0):
    planner_reshape_by_slots(layer, heads, ffn, config.hidden_size // config.num_attention_heads, attn_sparsity,
                             ffn_sparsity, planner_slots, planner_remove_, planner_set_heads_)


def planner_reshape_model(model, config):
    specs = planner_layer_specs(model.base_model.h, config)
    for layer, heads, ffn, attn_sparsity, ffn_sparsity in specs:
        planner_reshape_layer(layer, heads, ffn, config, attn_sparsity, ffn_sparsity)


_FAMILIES = ("GPT2",)
_HEADS = ("Model", "LMHeadModel")
planner_portable_classes(globals(), __name__, _FAMILIES, _HEADS, planner_reshape_model, prepare=planner_prepare_)
