"""BERT-shaped encoders (bert, roberta, xlm-roberta, electra; MiniLM is a bert).

Block i: attention (Q,K,V produce heads of head_dim rows; the output projection W_O consumes them as
columns) and FFN (intermediate.dense produces neurons; output.dense consumes them). Post-LN: each
sub-block ends with LayerNorm(dense(h) + residual); a removed sub-block keeps LayerNorm(residual + bias).
"""
from __future__ import annotations

import torch

from ..types import ArchShape
from . import register
from .base import Adapter, LayerSpec, already_removed, cols_of, mean_pool, rows_of, unit_indices
from .remote import modeling_planner_bert as remote

# class name of a plain transformers model -> the Auto class that should load its pruned version
_AUTO_FOR_SUFFIX = {
    "Model": "AutoModel",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForQuestionAnswering": "AutoModelForQuestionAnswering",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForMultipleChoice": "AutoModelForMultipleChoice",
    "ForPreTraining": "AutoModelForPreTraining",
}


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "electra")
    remote = remote

    def base(self, model):
        return getattr(model, model.base_model_prefix, model)

    def max_positions(self, config):
        # RoBERTa-style models number positions from padding_idx + 1 (514 embeddings serve 512 tokens)
        offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
        return config.max_position_embeddings - offset

    def layers(self, model):
        return self.base(model).encoder.layer

    def shape(self, model_or_config) -> ArchShape:
        c = getattr(model_or_config, "config", model_or_config)
        return ArchShape(family=self.family, hidden=c.hidden_size, n_layers=c.num_hidden_layers,
                         n_heads=c.num_attention_heads, head_dim=c.hidden_size // c.num_attention_heads,
                         ffn=c.intermediate_size, vocab=c.vocab_size)

    def layer_spec(self, layer, config=None) -> LayerSpec:
        heads = 0 if isinstance(layer.attention, remote.RemovedAttention) else layer.attention.self.num_attention_heads
        ffn = 0 if isinstance(layer.intermediate, remote.RemovedIntermediate) else layer.intermediate.dense.out_features
        sp = {k: float(getattr(self.consumer(layer, k), "sparsity", 0.0)) for k in ("attn", "ffn")}
        return LayerSpec(int(heads), int(ffn), sp["attn"], sp["ffn"])

    def group_size(self, model, kind):
        return model.config.hidden_size // model.config.num_attention_heads if kind == "attn" else 1

    def consumer(self, layer, kind):
        if kind == "attn":
            return None if isinstance(layer.attention, remote.RemovedAttention) else layer.attention.output.dense
        return None if isinstance(layer.intermediate, remote.RemovedIntermediate) else layer.output.dense

    def residual_norm_input(self, layer, kind):
        return layer.attention.output.LayerNorm if kind == "attn" else layer.output.LayerNorm

    def shrink_(self, layer, kind, kept, consumer_weight, config):
        kept = torch.as_tensor(kept, dtype=torch.long).sort().values
        eps, d = config.layer_norm_eps, config.hidden_size
        if kind == "attn":
            attn = layer.attention
            if already_removed(isinstance(attn, remote.RemovedAttention), kept, kind):
                return
            if len(kept) == 0:
                new = remote.RemovedAttention(d, eps).to(attn.output.dense.weight.device, attn.output.dense.weight.dtype)
                with torch.no_grad():
                    new.output.bias.copy_(attn.output.dense.bias)
                new.output.LayerNorm.load_state_dict(attn.output.LayerNorm.state_dict())
                layer.attention = new
                return
            cols = unit_indices(kept, d // config.num_attention_heads)     # (k*hd,) rows of Q,K,V / cols of W_O
            sa = attn.self
            sa.query, sa.key, sa.value = rows_of(sa.query, cols), rows_of(sa.key, cols), rows_of(sa.value, cols)
            sa.num_attention_heads = len(kept)
            sa.all_head_size = len(cols)
            attn.output.dense = cols_of(attn.output.dense, cols, consumer_weight)
        else:
            if already_removed(isinstance(layer.intermediate, remote.RemovedIntermediate), kept, kind):
                return
            if len(kept) == 0:
                out = layer.output
                new = remote.ResidualNorm(d, eps).to(out.dense.weight.device, out.dense.weight.dtype)
                with torch.no_grad():
                    new.bias.copy_(out.dense.bias)
                new.LayerNorm.load_state_dict(out.LayerNorm.state_dict())
                layer.intermediate = remote.RemovedIntermediate()
                layer.output = new
                return
            layer.intermediate.dense = rows_of(layer.intermediate.dense, kept)
            layer.output.dense = cols_of(layer.output.dense, kept, consumer_weight)

    def module_call(self, layer, kind, hidden, args, kwargs):
        """BERT's sub-modules run alone on the block's input: the attention (with the block's mask arguments)
        or the FFN (intermediate + output, as transformers' feed_forward_chunk chains them)."""
        if kind == "attn":
            return lambda: layer.attention(hidden, *args, **kwargs)
        return lambda: layer.feed_forward_chunk(hidden)

    def embed(self, model, input_ids, attention_mask):
        """Sentence embedding: mean of the last hidden state over real tokens, L2-normalised."""
        out = self.base(model)(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def head_kind(self, model) -> str | None:
        """Which distribution the head's logits are: per sequence, per token, or none we distil."""
        cls = type(model).__name__.removeprefix("Planner")
        if cls.endswith(("ForSequenceClassification", "ForMultipleChoice")):
            return "sequence"
        if cls.endswith(("ForTokenClassification", "ForMaskedLM")):
            return "token"
        return None                                                 # bare encoder (or QA/pre-training heads)

    def distill_outputs(self, model, input_ids, attention_mask):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = list(out.hidden_states[1:])                        # L x (B, T, d); [0] is the embedding output
        head = self.head_kind(model)
        logits = out.logits if head else None
        emb = mean_pool(hidden[-1], attention_mask) if model is self.base(model) else None
        return {"hidden": hidden, "logits": logits, "head": head, "embedding": emb}

    def embedding_parameters(self, model):
        return list(self.base(model).embeddings.parameters())

    def save_config_(self, model):
        c = model.config
        c.planner_layers = [s.to_dict() for s in self.spec(model)]
        cls = type(model).__name__.removeprefix("Planner")
        family = next((f for f in remote._FAMILIES if cls.startswith(f) and cls[len(f):] in _AUTO_FOR_SUFFIX), None)
        if family is None:
            raise ValueError(f"cannot save a pruned {cls}: no portable class for it")
        module = self.remote_file.removesuffix(".py")
        c.architectures = ["Planner" + cls]
        auto = {"AutoModel": f"{module}.Planner{family}Model"}
        suffix = cls[len(family):]
        auto[_AUTO_FOR_SUFFIX[suffix]] = f"{module}.Planner{cls}"
        c.auto_map = auto

register(BertAdapter())
