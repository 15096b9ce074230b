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
from torch import nn

from ..types import ArchShape
from . import register
from .base import Adapter, LayerSpec
from .bert import _cols, _rows
from .remote import modeling_planner_llama as remote

# class name suffix of a plain transformers model -> the Auto class that should load its pruned version
_AUTO_FOR_SUFFIX = {"Model": "AutoModel", "ForCausalLM": "AutoModelForCausalLM"}


def _units(kept: torch.Tensor, width: int) -> torch.Tensor:
    """Row/column indices of the kept units, each `width` wide: (len(kept)*width,)."""
    return (kept[:, None] * width + torch.arange(width)).reshape(-1)


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    remote_file = "modeling_planner_llama.py"
    causal_lm = True

    def forward_kwargs(self):
        return {"use_cache": False}

    def base(self, model):
        return model.base_model                                    # model.model for *ForCausalLM

    def layers(self, model):
        return self.base(model).layers

    def shape(self, model) -> ArchShape:
        c = model.config
        return ArchShape(family=self.family, hidden=c.hidden_size, n_layers=c.num_hidden_layers,
                         n_heads=c.num_attention_heads, head_dim=remote.planner_head_dim(c),
                         ffn=c.intermediate_size, vocab=c.vocab_size, kv_heads=c.num_key_value_heads)

    def layer_spec(self, layer) -> LayerSpec:
        sa, mlp = layer.self_attn, layer.mlp
        heads = 0 if isinstance(sa, remote.RemovedAttention) else sa.k_proj.out_features // sa.head_dim
        ffn = 0 if isinstance(mlp, remote.RemovedMLP) else mlp.gate_proj.out_features
        sp = {k: float(getattr(self.consumer(layer, k), "sparsity", 0.0)) for k in ("attn", "ffn")}
        return LayerSpec(int(heads), int(ffn), sp["attn"], sp["ffn"])

    def spec(self, model) -> list[LayerSpec]:
        return [self.layer_spec(l) for l in self.layers(model)]

    def group_size(self, model, kind):
        c = model.config
        return c.num_attention_heads // c.num_key_value_heads * remote.planner_head_dim(c) if kind == "attn" else 1

    def consumer(self, layer, kind):
        if kind == "attn":
            return None if isinstance(layer.self_attn, remote.RemovedAttention) else layer.self_attn.o_proj
        return None if isinstance(layer.mlp, remote.RemovedMLP) else layer.mlp.down_proj

    def linear_slots(self, layer, kind):
        if self.consumer(layer, kind) is None:
            return []
        return remote.planner_sparse_slots(layer, kind)

    def sparsify_(self, layer, kind, level, weights=None):
        slots = self.linear_slots(layer, kind)
        weights = weights if weights is not None else [None] * len(slots)
        for (parent, name), w in zip(slots, weights):
            setattr(parent, name, remote.csr_like(getattr(parent, name), level, w))

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
            if isinstance(sa, remote.RemovedAttention):
                assert len(kept) == 0, "cannot grow a removed attention module"
                return
            if len(kept) == 0:
                self._remove(remote.planner_remove_attention(layer, sa.layer_idx, config.hidden_size), sa.o_proj)
                return
            hd = sa.head_dim
            kv_rows = _units(kept, hd)                            # (k*hd,) rows of k_proj, v_proj
            q_cols = _units(kept, sa.num_key_value_groups * hd)   # (k*G*hd,) rows of q_proj / columns of o_proj
            sa.q_proj = _rows(sa.q_proj, q_cols)
            sa.k_proj, sa.v_proj = _rows(sa.k_proj, kv_rows), _rows(sa.v_proj, kv_rows)
            sa.o_proj = _cols(sa.o_proj, q_cols, consumer_weight)
        else:
            mlp = layer.mlp
            if isinstance(mlp, remote.RemovedMLP):
                assert len(kept) == 0, "cannot grow a removed FFN"
                return
            if len(kept) == 0:
                self._remove(remote.planner_remove_mlp(layer, config.hidden_size), mlp.down_proj)
                return
            mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, kept), _rows(mlp.up_proj, kept)
            mlp.down_proj = _cols(mlp.down_proj, kept, consumer_weight)

    @staticmethod
    def _remove(stand_in: nn.Module, consumer: nn.Linear) -> None:
        """The removed module still adds its consumer's bias to the residual stream."""
        if stand_in.bias is not None:
            with torch.no_grad():
                stand_in.bias.copy_(consumer.bias)

    # --- use ---------------------------------------------------------------------------------------
    def embed(self, model, input_ids, attention_mask):
        """Passage embedding: mean of the last hidden state (after the final norm) over real tokens, L2-normalised."""
        out = self.base(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.pool(out.last_hidden_state, attention_mask)

    @staticmethod
    def pool(h, attention_mask):
        m = attention_mask.unsqueeze(-1).to(h.dtype)                # (B, T, 1)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)               # (B, d) mean over real tokens
        return torch.nn.functional.normalize(e, dim=-1)

    def head_kind(self, model) -> str | None:
        return "token" if type(model).__name__.endswith("ForCausalLM") else None

    def distill_outputs(self, model, input_ids, attention_mask):
        """hidden: L x (B, T, d), the outputs of blocks 0..L-2 and, last, the final norm's output (what the LM head
        reads): transformers 5 replaces the last block's raw output by `last_hidden_state` in hidden_states."""
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        hidden = list(out.hidden_states[1:])                        # [0] is the embedding output
        head = self.head_kind(model)
        return {"hidden": hidden, "logits": out.logits if head else None, "head": head, "embedding": None}

    def embedding_parameters(self, model):
        return list(self.base(model).embed_tokens.parameters())

    def save_config_(self, model):
        c = model.config
        c.planner_layers = [s.to_dict() for s in self.spec(model)]
        cls = type(model).__name__.removeprefix("Planner")
        family = next((f for f in remote._FAMILIES if cls.startswith(f) and cls[len(f):] in _AUTO_FOR_SUFFIX), None)
        if family is None:
            raise ValueError(f"cannot save a pruned {cls}: no portable class for it (supported: "
                             f"{', '.join(f + h for f in remote._FAMILIES for h in _AUTO_FOR_SUFFIX)})")
        module = self.remote_file.removesuffix(".py")
        suffix = cls[len(family):]
        c.architectures = ["Planner" + cls]
        c.auto_map = {"AutoModel": f"{module}.Planner{family}Model",
                      _AUTO_FOR_SUFFIX[suffix]: f"{module}.Planner{cls}"}

    def portable_class(self, arch: str):
        """The class from the remote file for a saved architecture name, or None."""
        return getattr(remote, arch, None)


register(LlamaAdapter())
