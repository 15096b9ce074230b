"""Llama-family decoders (llama, mistral, qwen2): pre-norm blocks, grouped-query attention, gated FFN.

Block i: h = h + self_attn(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h)).
Attention unit = one KV group: key/value head u and the G query heads h with h // G == u (repeat_kv's
layout). Its o_proj columns and q rows are [u*G*hd, (u+1)*G*hd), its k/v rows [u*hd, (u+1)*hd); keeping whole
groups leaves num_key_value_groups = G valid, so RoPE, repeat_kv and the KV cache work unchanged.
FFN unit = one neuron: rows of gate_proj and up_proj, the column of down_proj (the consumer).
A removed module leaves its output bias (if any) on the residual; its input norm becomes an identity.
"""
from __future__ import annotations

import torch

from ..types import ArchShape
from . import register
from .base import LayerSpec, already_removed, cols_of, rows_of, unit_indices
from .decoder import DecoderAdapter
from .remote import modeling_planner_llama as remote


class LlamaAdapter(DecoderAdapter):
    """The decoder adapter's use and save side (embed, distil, portable classes); its own layout, GQA units
    and gated FFN."""
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    remote = remote

    def prepare_(self, model):
        return model                                              # loads as the algorithms expect it

    def layers(self, model):
        return self.base(model).layers

    def shape(self, model_or_config) -> ArchShape:
        c = getattr(model_or_config, "config", model_or_config)
        return ArchShape(family=self.family, hidden=c.hidden_size, n_layers=c.num_hidden_layers,
                         n_heads=c.num_attention_heads, head_dim=remote.planner_head_dim(c),
                         ffn=c.intermediate_size, vocab=c.vocab_size, kv_heads=c.num_key_value_heads)

    def layer_spec(self, layer, config=None) -> LayerSpec:
        sa, mlp = layer.self_attn, layer.mlp
        heads = 0 if isinstance(sa, remote.RemovedAttention) else sa.k_proj.out_features // sa.head_dim
        ffn = 0 if isinstance(mlp, remote.RemovedMLP) else mlp.gate_proj.out_features
        sp = {k: float(getattr(self.consumer(layer, k), "sparsity", 0.0)) for k in ("attn", "ffn")}
        return LayerSpec(int(heads), int(ffn), sp["attn"], sp["ffn"])

    def group_size(self, model, kind):
        c = model.config
        return c.num_attention_heads // c.num_key_value_heads * remote.planner_head_dim(c) if kind == "attn" else 1

    def consumer(self, layer, kind):
        if kind == "attn":
            return None if isinstance(layer.self_attn, remote.RemovedAttention) else layer.self_attn.o_proj
        return None if isinstance(layer.mlp, remote.RemovedMLP) else layer.mlp.down_proj

    def residual_norm_input(self, layer, kind):
        if kind == "attn":
            return layer.post_attention_layernorm                 # an identity once the FFN is removed: still a module
        raise NotImplementedError("pre-norm block: the residual after the FFN is the block's output, which no norm "
                                  "of this block reads; use residual_point(layer, 'ffn')")

    def residual_point(self, layer, kind):
        return (layer.post_attention_layernorm, "input") if kind == "attn" else (layer, "output")

    def shrink_(self, layer, kind, kept, consumer_weight, config):
        kept = torch.as_tensor(kept, dtype=torch.long).sort().values
        if kind == "attn":
            sa = layer.self_attn
            if already_removed(isinstance(sa, remote.RemovedAttention), kept, kind):
                return
            if len(kept) == 0:
                self._remove(remote.planner_remove_attention(layer, sa.layer_idx, config.hidden_size), sa.o_proj)
                return
            hd = sa.head_dim
            kv_rows = unit_indices(kept, hd)                            # (k*hd,) rows of k_proj, v_proj
            q_cols = unit_indices(kept, sa.num_key_value_groups * hd)   # (k*G*hd,) rows of q_proj / columns of o_proj
            sa.q_proj = rows_of(sa.q_proj, q_cols)
            sa.k_proj, sa.v_proj = rows_of(sa.k_proj, kv_rows), rows_of(sa.v_proj, kv_rows)
            sa.o_proj = cols_of(sa.o_proj, q_cols, consumer_weight)
        else:
            mlp = layer.mlp
            if already_removed(isinstance(mlp, remote.RemovedMLP), kept, kind):
                return
            if len(kept) == 0:
                self._remove(remote.planner_remove_mlp(layer, config.hidden_size), mlp.down_proj)
                return
            mlp.gate_proj, mlp.up_proj = rows_of(mlp.gate_proj, kept), rows_of(mlp.up_proj, kept)
            mlp.down_proj = cols_of(mlp.down_proj, kept, consumer_weight)

    def embedding_parameters(self, model):
        return list(self.base(model).embed_tokens.parameters())


register(LlamaAdapter())
