"""The adapter interface: what the algorithms may ask of a model family."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PlannerError
from ..types import ArchShape
from .remote.planner_common import _linear_like, csr_like


def rows_of(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    """A new Linear keeping output rows idx (producer side)."""
    new = _linear_like(lin, out_features=len(idx))
    with torch.no_grad():
        new.weight.copy_(lin.weight[idx])                 # (len(idx), d_in)
        if lin.bias is not None:
            new.bias.copy_(lin.bias[idx])
    return new


def cols_of(lin: nn.Linear, idx: torch.Tensor, weight: torch.Tensor | None) -> nn.Linear:
    """A new Linear keeping input columns idx (consumer side), optionally with corrected weights."""
    new = _linear_like(lin, in_features=len(idx))
    with torch.no_grad():
        w = lin.weight[:, idx] if weight is None else weight  # (d_out, len(idx))
        new.weight.copy_(w.to(new.weight.dtype))
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new


def already_removed(removed: bool, kept, kind: str) -> bool:
    """Whether module `kind` is already removed; a removed module cannot grow back, so nothing may be kept."""
    if removed:
        assert len(kept) == 0, f"cannot grow a removed {kind} module"
    return removed


def unit_indices(kept: torch.Tensor, width: int) -> torch.Tensor:
    """Column (or row) indices of the kept units, each `width` adjacent indices: (len(kept)*width,)."""
    return (kept[:, None] * width + torch.arange(width, device=kept.device)).reshape(-1)   # on kept's device


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Passage embedding: mean of h (B, T, d) over real tokens, L2-normalised: (B, d)."""
    m = attention_mask.unsqueeze(-1).to(h.dtype)                    # (B, T, 1)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)                   # (B, d)
    return torch.nn.functional.normalize(e, dim=-1)


@dataclass(frozen=True)
class LayerSpec:
    heads: int
    ffn: int
    attn_sparsity: float = 0.0      # > 0: the module's linears are sparse at this level (full width)
    ffn_sparsity: float = 0.0

    def to_dict(self) -> dict:
        d = {"heads": self.heads, "ffn": self.ffn}
        d.update({k: v for k, v in (("attn_sparsity", self.attn_sparsity), ("ffn_sparsity", self.ffn_sparsity)) if v})
        return d


class Adapter:
    """Everything the stages may ask of a model family. A family's adapter fills in every method that raises
    NotImplementedError here; the rest have defaults that fit most families."""
    family: str = ""
    model_types: tuple[str, ...] = ()
    remote = None                  # the family's file in adapters/remote as a module: the portable classes saved
                                   # models load into; copied next to saved weights
    causal_lm: bool = False        # decoder LM: prefill / decode latency regimes, perplexity, token windows

    @property
    def remote_file(self) -> str:
        """The name of the family's model file, copied next to saved weights."""
        return self.remote.__name__.rpartition(".")[2] + ".py"

    def prepare_(self, model: nn.Module) -> nn.Module:
        """Called once on every loaded or profiled model, before anything else looks at it: bring it into the
        form the algorithms expect (e.g. GPT-2's transposed Conv1D layers become nn.Linear). Same outputs."""
        return model

    def max_positions(self, config) -> int | None:
        """The longest sequence the model's position embeddings cover (None: no hard limit, e.g. rotary)."""
        return None

    def check_positions(self, config, n: int, what: str, extra: int = 0) -> None:
        """Refuse `n` + `extra` tokens where the model has learned position embeddings for fewer. `what` names
        the option that set n; `extra`: positions added to it (a decode loop's new tokens)."""
        limit = self.max_positions(config)
        if limit is not None and n + extra > limit:
            fix = f"use {what.split()[0]} at most {limit - extra}" if limit > extra else "use fewer decode steps"
            raise PlannerError(f"{what} needs {n + extra} positions, but this {self.family} model has position "
                               f"embeddings for {limit} tokens: {fix}")

    def forward_kwargs(self) -> dict:
        """Extra keyword arguments for calibration and evaluation forwards (decoders: no KV cache)."""
        return {}

    # --- structure -------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def shape(self, model_or_config) -> ArchShape:
        """The block geometry latency depends on, from a model or its transformers config (no weights needed)."""
        raise NotImplementedError

    def layer_spec(self, layer: nn.Module, config) -> LayerSpec:
        """Kept attention units and FFN neurons of one block (0: removed), and their sparsity levels."""
        raise NotImplementedError

    def spec(self, model: nn.Module) -> list[LayerSpec]:
        return [self.layer_spec(layer, model.config) for layer in self.layers(model)]

    def group_size(self, model: nn.Module, kind: str) -> int:
        raise NotImplementedError

    def consumer(self, layer: nn.Module, kind: str) -> nn.Linear | None:
        """The linear whose input columns are the structures of `kind` (None if the module is removed)."""
        raise NotImplementedError

    def linear_slots(self, layer: nn.Module, kind: str) -> list[tuple[nn.Module, str]]:
        """Every linear of module `kind` as (parent, attribute name), so it can be swapped for another
        implementation (a sparse kernel), the consumer last; [] if the module is removed: the remote file's
        `planner_slots`, which every family's model file provides."""
        return self.remote.planner_slots(layer, kind)

    def sparsify_(self, layer: nn.Module, kind: str, level: float, weights: list[torch.Tensor] | None = None) -> None:
        """Run module `kind`'s linears (linear_slots order) on the portable sparse kernel at `level`, with
        `weights` (each (out, in), zeros included) if given, else the current weights."""
        slots = self.linear_slots(layer, kind)
        for (parent, name), w in zip(slots, weights if weights is not None else [None] * len(slots)):
            setattr(parent, name, csr_like(getattr(parent, name), level, w))

    def residual_norm_input(self, layer: nn.Module, kind: str) -> nn.Module:
        """The module whose forward input is the residual stream right after `kind` writes into it."""
        raise NotImplementedError

    def residual_point(self, layer: nn.Module, kind: str) -> tuple[nn.Module, str]:
        """(module, "input" | "output"): where the residual stream right after `kind` writes into it can be
        read, as that module's first forward input or its output (a tensor or a tuple whose [0] it is).
        Post-LN blocks: the LayerNorm's input. Pre-LN blocks: the next norm's input after attention, the
        block's own output after the FFN."""
        return self.residual_norm_input(layer, kind), "input"

    def shrink_(self, layer: nn.Module, kind: str, kept: torch.Tensor, consumer_weight: torch.Tensor | None,
                config) -> None:
        """Keep only groups `kept` (sorted group indices) of `kind`; drop producers' rows; set the consumer's
        kept columns to `consumer_weight` (d_out, len(kept)*group) if given. len(kept)==0 removes the module."""
        raise NotImplementedError

    def module_call(self, layer: nn.Module, kind: str, hidden: torch.Tensor, args: tuple, kwargs: dict):
        """A zero-argument callable running only module `kind` of `layer` on the block's captured inputs, for
        timing a module alone (profile --method module); None where the family does not support it."""
        return None

    # --- use ---------------------------------------------------------------------------------------
    def embed(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distill_outputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """What distillation compares: {"hidden": every block's output, L x (B, T, d);
        "logits": the head's output or None for a bare encoder; "head": "sequence" (B, C), "token" (B, T, C) or None;
        "embedding": the pooled sentence embedding (B, d), L2-normalised, for a bare encoder (else None)}."""
        raise NotImplementedError

    def head_kind(self, model: nn.Module) -> str | None:
        """Which distribution the head's logits are: "sequence" (B, C), "token" (B, T, C), or None (no head
        that distillation compares)."""
        raise NotImplementedError

    def embedding_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters of the input embeddings (never pruned; recovery may keep them frozen)."""
        raise NotImplementedError

    def save_config_(self, model: nn.Module) -> None:
        """Record the per-layer shapes and the remote-code entry points in model.config."""
        raise NotImplementedError

    def portable_class(self, arch: str):
        """The class from the remote file for a saved architecture name (config.architectures[0]), or None."""
        return getattr(self.remote, arch, None)
