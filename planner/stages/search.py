"""The search stage: from the DP's plan for a target to the plan whose deployed model is best end to end
(algorithms/search.py: level-switch mutations, multi-fidelity selection).

A candidate is scored as `apply` would deploy it: its kept structures from the OBS order, their weights refitted
sequentially on calibration passages (each block on the inputs the already-compressed blocks before it produce),
then run on held-back calibration passages that no weight was fitted on, and compared with the dense model by the
output the user consumes: the per-token logit KL for models with an LM (or classification) head, the cosine
distance of the sentence embeddings for bare encoders. Fidelity 0 fits on `FIDELITY[0]` passages and scores on as
many held-back ones; fidelity 1 uses more of each. The candidates' times come from the profile as the closed loop
corrected it for this target, so every candidate keeps the budget the measurement set.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from .. import io
from ..algorithms.search import evolve
from ..config import PlanConfig
from ..types import LatencyProfile, Plan
from .apply import apply_
from .distill import embed_loss, logit_kl

SEARCH_KIND, SEARCH_VERSION = "EndToEndSearch", 1
FIDELITY = ((64, 64), (256, 128))       # (calibration passages refitted on, held-back passages scored), per level


def split_for_search(fit: list[dict], held: list[dict]) -> list[tuple[list[dict], list[dict]]]:
    """Per fidelity, (batches to refit on, held-back batches to score): the first batches holding the
    FIDELITY sizes' passages (or windows)."""
    def take(batches, n):
        out, got = [], 0
        for b in batches:
            if got >= n:
                break
            out.append(b)
            got += len(b["input_ids"])
        return out or batches[:1]
    return [(take(fit, nf), take(held, ns)) for nf, ns in FIDELITY]


class DeployLoss:
    """plan, fidelity -> loss of the model `apply` deploys for the plan against the dense model (module
    docstring). The dense model's outputs on the scored batches are computed once."""

    def __init__(self, dense, adapter, db, damp: float, data: list[tuple[list[dict], list[dict]]], device=None,
                 offload: bool = False, refit: str = "stream"):
        """device, offload: where each candidate's sequential refit runs (apply_'s; default: the dense model's
        device). The scoring forwards run where the dense model is."""
        self.dense, self.adapter, self.db, self.damp, self.data = dense, adapter, db, damp, data
        self.dev = next(dense.parameters()).device
        self.fit_device, self.offload, self.refit = device or self.dev, offload, refit
        self.ref = [[self._outputs(dense, b) for b in held] for _, held in data]

    @torch.no_grad()
    def _outputs(self, model, b) -> dict:
        ids, mask = b["input_ids"].to(self.dev), b["attention_mask"].to(self.dev)
        out = self.adapter.distill_outputs(model, ids, mask)
        return {"logits": out["logits"], "head": out["head"], "embedding": out["embedding"], "mask": mask.bool()}

    def loss_of(self, s: dict, t: dict) -> float:
        if t["logits"] is not None:                   # a head: KL of its distribution (per token for LM heads)
            return float(logit_kl(s["logits"], t["logits"], 1.0, t["mask"] if t["head"] == "token" else None))
        return float(embed_loss(s["embedding"], t["embedding"]))

    def __call__(self, plan: Plan, fidelity: int) -> float:
        fit, held = self.data[fidelity]
        m = copy.deepcopy(self.dense)
        apply_(m, self.adapter, plan, select="obs", weights="sequential", db=self.db, batches=fit, damp=self.damp,
               progress=False, device=self.fit_device, offload=self.offload, refit=self.refit)
        with torch.no_grad():
            losses = [self.loss_of(self._outputs(m, b), t) for b, t in zip(held, self.ref[fidelity])]
        return sum(losses) / len(losses)


def choices_of(plan: Plan, opts) -> list[int]:
    """The option index, per group of `opts` (the DP's (groups, widths, levels, times, errors)), that `plan` takes."""
    groups, widths, levels = opts[:3]
    out = []
    for (l, kind), w, lv in zip(groups, widths, levels):
        key = "heads" if kind == "attn" else "ffn"
        want = (plan.layers[l][key], plan.layers[l].get(f"{kind}_sparsity", 0.0))
        out.append(next(i for i, (a, b) in enumerate(zip(w, lv)) if (int(a), float(b)) == want))
    return out


def searched(plain: Plan, cprof: LatencyProfile, loss_of: DeployLoss, opts, make_plan, cfg: PlanConfig,
             out_dir: Path, progress: bool) -> Plan:
    """The search for one target, from the plan `plain` (the DP's, as the closed loop left it), on the corrected
    profile `cprof`. opts: the DP's (groups, widths, levels, times, errors) on cprof; make_plan(choices) builds a
    Plan. Resumable: every evaluation goes to OUT/search/search-<t>x.json."""
    times = opts[3]
    seed = choices_of(plain, opts)
    budget = cprof.base["median"] / plain.target_speedup - cprof.constant
    by_key: dict[tuple, Plan] = {}

    def plan_of(cand: tuple) -> Plan:
        if cand not in by_key:
            by_key[cand] = make_plan(list(cand))
        return by_key[cand]

    state_path = out_dir / "search" / f"search-{plain.target_speedup:g}x.json"
    want = {"kind": SEARCH_KIND, "schema_version": SEARCH_VERSION, "seed": seed, "budget": budget,
            "fidelity": [list(f) for f in FIDELITY], "identity": {"database": plain.database, "norm": cfg.error_norm, "refit": cfg.refit}}
    state = {**want, "history": []}
    if state_path.exists():
        old = io.read_json(state_path, "search state")
        if all(old.get(k) == v for k, v in want.items()):
            state = old                                          # resume: the same search, continue its history

    def keep(record):
        state["history"].append(record)
        io.write_json(state_path, state)

    res = evolve(seed, times, budget, lambda cand, fid: loss_of(plan_of(cand), fid), fidelities=(0, 1),
                 max_candidates=cfg.search, seconds=cfg.search_minutes * 60 if cfg.search_minutes else None,
                 history=state["history"], on_record=keep, progress=progress)
    best = plan_of(tuple(res.choice))
    record = {"candidates": res.n_candidates, "evaluated": res.n_evaluated, "generations": res.generations,
              "improvements": res.improvements, "loss_seed": res.loss_seed, "loss": res.loss,
              "seed_total_error": plain.total_error, "fidelity": [list(f) for f in FIDELITY],
              "scored_by": "logit KL" if loss_of.ref[0][0]["logits"] is not None else "embedding cosine distance"}
    return dataclasses.replace(best, options={**plain.options, "search": record},
                               profile=plain.profile, database=plain.database)
