"""What the decoder LM adapters share. GPT-2 and OPT use all of it: multi-head attention whose prunable units
are one head and one FFN neuron, with the family's module layout in its remote model file. The Llama family
(llama.py) shares the use and save side and brings its own layout, KV-group units and gated FFN.

The remote file (also copied next to saved weights) knows the layout: `planner_prepare_` (bring a loaded model
into the form below), `planner_slots(layer, kind)` (the module's linears, consumer last; [] once removed),
`planner_remove_` (stand-ins for a removed module) and `planner_set_heads_`. Everything here works on those:
a producer keeps the rows of the kept units, stacked blocks of them included (GPT-2's fused q, k, v), the
consumer keeps their columns.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedModel
from ..types import ArchShape
from .base import Adapter, LayerSpec, already_removed, cols_of, mean_pool, rows_of, unit_indices


def _head_dim(config) -> int:
    return config.hidden_size // config.num_attention_heads


def _stacked(rows: torch.Tensor, lin, width: int) -> torch.Tensor:
    """Rows of a producer whose output stacks out_features // width blocks of `width` rows (GPT-2's c_attn:
    q, k, v): the same rows in every block."""
    return torch.cat([rows + j * width for j in range(lin.out_features // width)])


class DecoderAdapter(Adapter):
    causal_lm = True

    @property
    def lm_suffix(self) -> str:
        """Class name suffix of the LM-head model ("LMHeadModel", "ForCausalLM"): the remote file's last head."""
        return self.remote._HEADS[-1]

    def forward_kwargs(self):
        return {"use_cache": False}

    def prepare_(self, model):
        """Refuse what the remote file cannot represent, then the family's in-place conversion (same outputs)."""
        self.check_config(model.config)
        return self.remote.planner_prepare_(model)

    def check_config(self, config) -> None:
        if config.hidden_size % config.num_attention_heads:
            raise UnsupportedModel(f"{self.family}: hidden_size {config.hidden_size} is not a multiple of "
                                   f"num_attention_heads {config.num_attention_heads}")

    # --- structure -------------------------------------------------------------------------------
    def base(self, model):
        return model.base_model

    def ffn_width(self, config) -> int:
        raise NotImplementedError

    def shape(self, model_or_config) -> ArchShape:
        c = getattr(model_or_config, "config", model_or_config)
        return ArchShape(family=self.family, hidden=c.hidden_size, n_layers=c.num_hidden_layers,
                         n_heads=c.num_attention_heads, head_dim=_head_dim(c),
                         ffn=self.ffn_width(c), vocab=c.vocab_size)

    def layer_spec(self, layer, config) -> LayerSpec:
        """Kept heads and neurons (0: removed), read off the consumers' widths, and their sparsity levels."""
        w = {k: (lin.in_features if (lin := self.consumer(layer, k)) is not None else 0) for k in ("attn", "ffn")}
        sp = {k: float(getattr(self.consumer(layer, k), "sparsity", 0.0)) for k in ("attn", "ffn")}
        return LayerSpec(w["attn"] // _head_dim(config), w["ffn"], sp["attn"], sp["ffn"])

    def group_size(self, model, kind):
        return _head_dim(model.config) if kind == "attn" else 1

    def consumer(self, layer, kind):
        slots = self.linear_slots(layer, kind)
        return getattr(*slots[-1]) if slots else None

    def shrink_(self, layer, kind, kept, consumer_weight, config):
        kept = torch.as_tensor(kept, dtype=torch.long).sort().values
        slots = self.linear_slots(layer, kind)
        if already_removed(not slots, kept, kind):
            return
        (cp, cn), consumer = slots[-1], getattr(*slots[-1])
        if len(kept) == 0:
            self._remove(self.remote.planner_remove_(layer, kind), consumer)
            return
        cols = unit_indices(kept, _head_dim(config) if kind == "attn" else 1)   # (k*group,) consumer columns, producer rows
        for p, n in slots[:-1]:
            lin = getattr(p, n)
            setattr(p, n, rows_of(lin, _stacked(cols, lin, consumer.in_features)))
        setattr(cp, cn, cols_of(consumer, cols, consumer_weight))
        if kind == "attn":
            self.remote.planner_set_heads_(layer, len(kept))

    @staticmethod
    def _remove(stand_in, consumer) -> None:
        """The removed module still adds its consumer's bias to the residual stream."""
        if stand_in.bias is not None:
            with torch.no_grad():
                stand_in.bias.copy_(consumer.bias)

    # --- use ---------------------------------------------------------------------------------------
    def embed(self, model, input_ids, attention_mask):
        """Passage embedding: mean of the last hidden state (what the LM head reads) over real tokens,
        L2-normalised."""
        out = self.base(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return mean_pool(out.last_hidden_state, attention_mask)

    def head_kind(self, model) -> str | None:
        return "token" if type(model).__name__.endswith(self.lm_suffix) else None

    def distill_outputs(self, model, input_ids, attention_mask):
        """hidden: L x (B, T, ·): the outputs of blocks 0..L-2 and, last, `last_hidden_state` (what the LM head
        reads: after the final LayerNorm, and for OPT with word_embed_proj_dim != hidden after project_out, so of
        that width): transformers 5 puts it in place of the last block's raw output in hidden_states."""
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        hidden = list(out.hidden_states[1:])                        # [0] is the embedding output
        head = self.head_kind(model)
        return {"hidden": hidden, "logits": out.logits if head else None, "head": head, "embedding": None}

    def save_config_(self, model):
        c = model.config
        c.planner_layers = [s.to_dict() for s in self.spec(model)]
        cls = type(model).__name__.removeprefix("Planner")
        family = next((f for f in self.remote._FAMILIES if cls in (f + "Model", f + self.lm_suffix)), None)
        if family is None:
            raise ValueError(f"cannot save a pruned {cls}: no portable class for it (supported: "
                             f"{', '.join(f + h for f in self.remote._FAMILIES for h in self.remote._HEADS)})")
        module = self.remote_file.removesuffix(".py")
        c.architectures = ["Planner" + cls]
        c.auto_map = {"AutoModel": f"{module}.Planner{family}Model",
                      "AutoModelForCausalLM": f"{module}.Planner{family}{self.lm_suffix}"}
