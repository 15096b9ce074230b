"""Structurally pruned Llama-family decoders (Llama, Mistral, Qwen2), written by `planner apply`.

This file is copied next to the weights so that the checkpoint loads with plain Hugging Face transformers
(`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`), without the planner installed. It only
depends on torch and transformers. `config.planner_layers[i]` gives layer i's kept attention units and FFN
neurons. An attention unit is one KV group: a key/value head and the G = num_attention_heads //
num_key_value_heads query heads that read it, so the kept widths are q: heads*G*head_dim, k/v: heads*head_dim
rows, and `num_key_value_groups` (G) is unchanged. 0 means the module is removed: the block is pre-norm
(h + module(norm(h))), so only the module's output bias (if any) remains, and its input norm, whose output
nothing reads any more, becomes an identity. An "attn_sparsity" / "ffn_sparsity" entry means that module's
linears were sparsified: they load as dense weights with zeros and run on a CSR matmul in eval mode.
"""
from torch import nn

from .planner_common import RemovedDecoderAttention as RemovedAttention  # noqa: F401
from .planner_common import RemovedProjection as RemovedMLP  # noqa: F401
from .planner_common import _linear_like, planner_layer_specs, planner_portable_classes, planner_sparsify_slots
from .planner_compat import cache_from_kwargs  # noqa: F401  (imported here so that it is copied alongside)


def planner_head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def planner_slots(layer, kind):
    """(parent, name) of every linear of `kind` ("attn" or "ffn") in a decoder layer, the consumer last; [] if
    removed."""
    if kind == "attn":
        sa = layer.self_attn
        return [] if isinstance(sa, RemovedAttention) else [(sa, "q_proj"), (sa, "k_proj"), (sa, "v_proj"),
                                                             (sa, "o_proj")]
    mlp = layer.mlp
    return [] if isinstance(mlp, RemovedMLP) else [(mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]


def planner_remove_attention(layer, layer_idx, hidden):
    """Replace the layer's attention (and its now unread input norm) by what is left of it; returns the new
    module so the caller can copy o_proj's bias into it."""
    o = layer.self_attn.o_proj
    layer.self_attn = RemovedAttention(layer_idx, hidden, o.bias is not None).to(o.weight.device, o.weight.dtype)
    layer.input_layernorm = nn.Identity()
    return layer.self_attn


def planner_remove_mlp(layer, hidden):
    """Replace the layer's FFN (and its now unread input norm) by what is left of it; returns the new module."""
    down = layer.mlp.down_proj
    layer.mlp = RemovedMLP(hidden, down.bias is not None).to(down.weight.device, down.weight.dtype)
    layer.post_attention_layernorm = nn.Identity()
    return layer.mlp


def planner_reshape_layer(layer, layer_idx, heads, ffn, config, attn_sparsity=0.0, ffn_sparsity=0.0):
    """Give `layer` the module shapes of `heads` kept KV groups and `ffn` kept neurons (weights uninitialised);
    a module with a sparsity > 0 gets CSR linears."""
    d, hd = config.hidden_size, planner_head_dim(config)
    group = config.num_attention_heads // config.num_key_value_heads       # query heads per KV head
    if heads == 0:
        if not isinstance(layer.self_attn, RemovedAttention):
            planner_remove_attention(layer, layer_idx, d)
    elif layer.self_attn.k_proj.out_features != heads * hd:
        sa = layer.self_attn
        sa.q_proj = _linear_like(sa.q_proj, out_features=heads * group * hd)
        sa.k_proj = _linear_like(sa.k_proj, out_features=heads * hd)
        sa.v_proj = _linear_like(sa.v_proj, out_features=heads * hd)
        sa.o_proj = _linear_like(sa.o_proj, in_features=heads * group * hd)
    if ffn == 0:
        if not isinstance(layer.mlp, RemovedMLP):
            planner_remove_mlp(layer, d)
    elif layer.mlp.gate_proj.out_features != ffn:
        mlp = layer.mlp
        mlp.gate_proj = _linear_like(mlp.gate_proj, out_features=ffn)
        mlp.up_proj = _linear_like(mlp.up_proj, out_features=ffn)
        mlp.down_proj = _linear_like(mlp.down_proj, in_features=ffn)
    planner_sparsify_slots(layer, heads, ffn, attn_sparsity, ffn_sparsity, planner_slots)


def planner_reshape_model(model, config):
    specs = planner_layer_specs(model.base_model.layers, config)
    for i, (layer, heads, ffn, attn_sparsity, ffn_sparsity) in enumerate(specs):
        planner_reshape_layer(layer, i, heads, ffn, config, attn_sparsity, ffn_sparsity)


_FAMILIES = ("Llama", "Mistral", "Qwen2")
_HEADS = ("Model", "ForCausalLM")
planner_portable_classes(globals(), __name__, _FAMILIES, _HEADS, planner_reshape_model)
