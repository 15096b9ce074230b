"""OPT decoders: multi-head attention with separate q/k/v projections; pre-LN (`do_layer_norm_before`, most
sizes) or post-LN (opt-350m) blocks.

Pre-LN:  h = h + attn(ln_a(h));  h = h + fc2(act(fc1(ln_f(h)))).
Post-LN: h = ln_a(h + attn(h));  h = ln_f(h + fc2(act(fc1(h)))).
Attention unit = one head: rows [h*hd, (h+1)*hd) of q_proj, k_proj, v_proj, the same columns of out_proj (the
consumer). FFN unit = one neuron: a row of fc1, a column of fc2. A removed module leaves its consumer's bias
on the residual stream; pre-LN its input LayerNorm becomes an identity, post-LN the LayerNorm after it stays.
transformers runs OPT's FFN on the tokens flattened to (B*T, d); calibration lines activations up with the
token mask either way (calibration.real_tokens). A config with
word_embed_proj_dim != hidden_size (project_in / project_out around the stack, opt-350m) is supported: the
blocks have width hidden_size; the last hidden state has width word_embed_proj_dim.
"""
from __future__ import annotations

from . import register
from .decoder import DecoderAdapter
from .remote import modeling_planner_opt as remote


class OPTAdapter(DecoderAdapter):
    family = "opt"
    model_types = ("opt",)
    remote = remote

    def ffn_width(self, config):
        return config.ffn_dim

    def max_positions(self, config):
        return config.max_position_embeddings

    def layers(self, model):
        return self.base(model).decoder.layers

    def residual_point(self, layer, kind):
        """The residual right after `kind` writes into it. Post-LN: the input of the LayerNorm that follows the
        module. Pre-LN: after attention the pre-FFN LayerNorm's input (an identity once the FFN is removed: still
        a module); after the FFN the layer's output."""
        if not layer.do_layer_norm_before:
            return (layer.self_attn_layer_norm if kind == "attn" else layer.final_layer_norm), "input"
        return (layer.final_layer_norm, "input") if kind == "attn" else (layer, "output")

    def embedding_parameters(self, model):
        d = self.base(model).decoder
        return [*d.embed_tokens.parameters(), *d.embed_positions.parameters()]   # a tied lm_head shares embed_tokens


register(OPTAdapter())
