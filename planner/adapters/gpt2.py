"""GPT-2 decoders: pre-LN blocks, multi-head attention with a fused q/k/v projection, biases everywhere.

Block i: h = h + attn(ln_1(h)); h = h + mlp(ln_2(h)). `prepare_` turns the blocks' Conv1D layers (weight
(in, out)) into nn.Linear (weight (out, in)), so every algorithm sees ordinary linears. Attention unit = one
head: its columns [h*hd, (h+1)*hd) of attn.c_proj (the consumer) and the same rows in each of the q, k and v
thirds of c_attn. FFN unit = one neuron: a row of c_fc, a column of mlp.c_proj. A removed module leaves its
consumer's bias on the residual stream; its input LayerNorm becomes an identity (modeling_planner_gpt2.py).
"""
from __future__ import annotations

from ..errors import UnsupportedModel
from . import register
from .decoder import DecoderAdapter
from .remote import modeling_planner_gpt2 as remote


class GPT2Adapter(DecoderAdapter):
    family = "gpt2"
    model_types = ("gpt2",)
    remote = remote

    def check_config(self, config):
        super().check_config(config)
        if config.add_cross_attention:
            raise UnsupportedModel("gpt2 with add_cross_attention (an encoder-decoder's decoder) is not supported: "
                                   "only its self-attention would be prunable")

    def ffn_width(self, config):
        return config.n_inner or 4 * config.hidden_size

    def max_positions(self, config):
        return config.n_positions

    def layers(self, model):
        return self.base(model).h

    def residual_point(self, layer, kind):
        """Pre-LN: after attention the residual is ln_2's input (an identity once the FFN is removed: still a
        module); after the FFN it is the block's output."""
        return (layer.ln_2, "input") if kind == "attn" else (layer, "output")

    def embedding_parameters(self, model):
        b = self.base(model)
        return [*b.wte.parameters(), *b.wpe.parameters()]      # a tied lm_head shares wte's weight


register(GPT2Adapter())
