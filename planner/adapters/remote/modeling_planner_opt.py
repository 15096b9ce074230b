"""Structurally pruned OPT models, written by `planner apply`.

This file is copied next to the weights so that the checkpoint loads with plain Hugging Face transformers
(`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`), without the planner installed. It only
depends on torch and transformers. `config.planner_layers[i]` gives layer i's kept attention heads and FFN
neurons; 0 means the module is removed and only its output projection's bias remains on the residual stream.
Pre-LN OPT (`do_layer_norm_before`, opt-125m and most sizes): the removed module's input LayerNorm, whose
output nothing reads any more, becomes an identity. Post-LN OPT (opt-350m): the LayerNorm after the module
stays and normalises residual + bias. An "attn_sparsity" / "ffn_sparsity" entry means that module's linears
were sparsified: they load as dense weights with zeros and run on a CSR matmul in eval mode.
"""
from torch import nn

from .planner_common import RemovedDecoderAttention as RemovedAttention  # noqa: F401
from .planner_common import RemovedProjection as RemovedFc2  # noqa: F401
from .planner_common import planner_layer_specs, planner_portable_classes, planner_reshape_by_slots
from .planner_compat import cache_from_kwargs  # noqa: F401  (imported here so that it is copied alongside)


class RemovedFc1(nn.Module):
    """fc1 of an FFN with zero neurons: (..., d) -> (..., 0), so the activation has nothing to compute."""

    def forward(self, hidden_states):
        return hidden_states[..., :0]


def planner_prepare_(model):
    """Nothing to convert: OPT's layers are used as transformers defines them (its FFN runs on the tokens
    flattened to (B*T, d), which the planner's calibration lines up with the token mask)."""
    return model


def planner_slots(layer, kind):
    """(parent, name) of every linear of `kind` ("attn" or "ffn") in a layer, the consumer last; [] if removed."""
    if kind == "attn":
        a = layer.self_attn
        return [] if isinstance(a, RemovedAttention) else [(a, "q_proj"), (a, "k_proj"), (a, "v_proj"), (a, "out_proj")]
    return [] if isinstance(layer.fc2, RemovedFc2) else [(layer, "fc1"), (layer, "fc2")]


def planner_remove_(layer, kind):
    """Replace module `kind` by its stand-in (pre-LN: its input LayerNorm by an identity; post-LN keeps the
    LayerNorm after it); returns the stand-in (bias zero: the caller copies the consumer's bias into it)."""
    consumer = getattr(*planner_slots(layer, kind)[-1])
    d, to = consumer.out_features, dict(device=consumer.weight.device, dtype=consumer.weight.dtype)
    if kind == "attn":
        layer.self_attn = RemovedAttention(layer.self_attn.layer_idx, d, consumer.bias is not None).to(**to)
        if layer.do_layer_norm_before:
            layer.self_attn_layer_norm = nn.Identity()
        return layer.self_attn
    layer.fc1, layer.fc2 = RemovedFc1(), RemovedFc2(d, consumer.bias is not None).to(**to)
    if layer.do_layer_norm_before:
        layer.final_layer_norm = nn.Identity()
    return layer.fc2


def planner_set_heads_(layer, heads):
    """Size attributes of an attention that keeps `heads` heads: forward views q, k, v as (num_heads, head_dim)."""
    layer.self_attn.num_heads = heads


def planner_reshape_layer(layer, heads, ffn, config, attn_sparsity=0.0, ffn_sparsity=0.0):
    planner_reshape_by_slots(layer, heads, ffn, config.hidden_size // config.num_attention_heads, attn_sparsity,
                             ffn_sparsity, planner_slots, planner_remove_, planner_set_heads_)


def planner_reshape_model(model, config):
    specs = planner_layer_specs(model.base_model.decoder.layers, config)
    for layer, heads, ffn, attn_sparsity, ffn_sparsity in specs:
        planner_reshape_layer(layer, heads, ffn, config, attn_sparsity, ffn_sparsity)


_FAMILIES = ("OPT",)
_HEADS = ("Model", "ForCausalLM")
planner_portable_classes(globals(), __name__, _FAMILIES, _HEADS, planner_reshape_model)
