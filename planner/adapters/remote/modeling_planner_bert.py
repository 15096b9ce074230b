"""Structurally pruned BERT-family models, written by `planner apply`.

This file is copied next to the weights so that the checkpoint loads with plain Hugging Face
transformers (`AutoModel.from_pretrained(dir, trust_remote_code=True)`), without the planner installed.
It only depends on torch and transformers. `config.planner_layers[i]` gives the kept attention heads
and FFN neurons of layer i; 0 means the module is removed and only its residual path (bias + LayerNorm,
BERT is post-LN) remains. An "attn_sparsity" / "ffn_sparsity" entry means that module's linears were
sparsified: they load as dense weights with zeros and run on a CSR matmul in eval mode.
"""
import torch
from torch import nn

from .planner_common import _linear_like, planner_layer_specs, planner_portable_classes, planner_sparsify_slots
from .planner_compat import cache_from_kwargs  # noqa: F401  (imported here so that it is copied alongside)


class ResidualNorm(nn.Module):
    """What is left of a removed post-LN sub-block: LayerNorm(residual + bias)."""

    def __init__(self, hidden, eps):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, hidden_states, input_tensor):
        # hidden_states is ignored (the module that produced it is gone); input_tensor: (B, T, d)
        return self.LayerNorm(input_tensor + self.bias)


class RemovedAttention(nn.Module):
    """Stands in for a BertAttention with zero heads: returns (LayerNorm(x + b_O), None)."""

    def __init__(self, hidden, eps):
        super().__init__()
        self.output = ResidualNorm(hidden, eps)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        return self.output(None, hidden_states), None


class RemovedIntermediate(nn.Module):
    def forward(self, hidden_states):
        return None


def planner_slots(layer, kind):
    """(parent, name) of every linear of `kind` ("attn" or "ffn") in a BERT layer, the consumer last; [] if
    removed."""
    if kind == "attn":
        if isinstance(layer.attention, RemovedAttention):
            return []
        sa = layer.attention.self
        return [(sa, "query"), (sa, "key"), (sa, "value"), (layer.attention.output, "dense")]
    return [] if isinstance(layer.intermediate, RemovedIntermediate) else [(layer.intermediate, "dense"),
                                                                            (layer.output, "dense")]


def planner_reshape_layer(layer, heads, ffn, config, attn_sparsity=0.0, ffn_sparsity=0.0):
    """Give `layer` the module shapes of `heads` kept heads and `ffn` kept neurons (weights uninitialised);
    a module with a sparsity > 0 gets CSR linears."""
    d = config.hidden_size
    eps = config.layer_norm_eps
    head_dim = d // config.num_attention_heads
    attn = layer.attention
    if heads == 0:
        if not isinstance(attn, RemovedAttention):
            layer.attention = RemovedAttention(d, eps).to(attn.output.dense.weight.device)
    else:
        sa = attn.self
        inner = heads * head_dim
        if sa.query.out_features != inner:
            sa.query = _linear_like(sa.query, out_features=inner)
            sa.key = _linear_like(sa.key, out_features=inner)
            sa.value = _linear_like(sa.value, out_features=inner)
            attn.output.dense = _linear_like(attn.output.dense, in_features=inner)
        sa.num_attention_heads = heads
        sa.all_head_size = inner
    if ffn == 0:
        if not isinstance(layer.intermediate, RemovedIntermediate):
            dev = layer.output.dense.weight.device
            layer.intermediate = RemovedIntermediate()
            layer.output = ResidualNorm(d, eps).to(dev)
    elif layer.intermediate.dense.out_features != ffn:
        layer.intermediate.dense = _linear_like(layer.intermediate.dense, out_features=ffn)
        layer.output.dense = _linear_like(layer.output.dense, in_features=ffn)
    planner_sparsify_slots(layer, heads, ffn, attn_sparsity, ffn_sparsity, planner_slots)


def planner_reshape_model(model, config):
    specs = planner_layer_specs(getattr(model, model.base_model_prefix, model).encoder.layer, config)
    for layer, heads, ffn, attn_sparsity, ffn_sparsity in specs:
        planner_reshape_layer(layer, heads, ffn, config, attn_sparsity, ffn_sparsity)


_FAMILIES = ("Bert", "Roberta", "XLMRoberta", "Electra")
_HEADS = ("Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
          "ForMaskedLM", "ForMultipleChoice", "ForPreTraining")
planner_portable_classes(globals(), __name__, _FAMILIES, _HEADS, planner_reshape_model)
